"""Fine-tune an LLM on instruction data with a parameter-efficient method.

    python uniform_finetune.py                       # demo: LoRA on the embedded model, ~5 min on a CPU
    python uniform_finetune.py --model_type llama --model_name_or_path PATH \\
        --data alpaca-belle-cot --lora_target_modules q_proj v_proj \\
        --per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1
"""

from __future__ import annotations

import shlex
import sys
import time

from alpaca_cot.cli import build_finetune_parser, parse_finetune_args, run_cli


def build_parser():
    """The training flags (see ``alpaca_cot.cli``)."""
    return build_finetune_parser()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print the summary and the command to chat with the result."""

    def run() -> int:
        from alpaca_cot.train.plan import plan_run
        from alpaca_cot.train.recipe import run_finetune

        started = time.monotonic()
        plan = plan_run(parse_finetune_args(argv))
        summary = run_finetune(plan)
        if not summary["main_process"]:
            return 0  # under torchrun rank 0 reports for the job
        out = summary["output_dir"]
        print(f"trained {summary['global_step']} steps ({summary['train_seconds']:.0f} s training, "
              f"{time.monotonic() - started:.0f} s in all); "
              f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} (mean {summary['train_loss']:.4f})")
        if summary.get("heldout_after") is not None:
            print(f"held-out exact match on {summary['heldout_records']} problems: "
                  f"before {_percent(summary['heldout_before'])}, after {_percent(summary['heldout_after'])}")
        print(f"adapter saved to {out}")
        example = summary["example"]
        command = (f"python generate.py --lora_dir {shlex.quote(out)} "
                   f"--instruction {shlex.quote(example['instruction'])}")
        if example["input"]:
            command += f" --input {shlex.quote(example['input'])}"
        print(f"chat with it:  {command}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
