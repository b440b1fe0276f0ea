"""Fold a trained adapter into its base model and save a plain transformers checkpoint.

    python merge.py --lora_dir saved_models/demo --merged_dir merged/demo
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/demo')"
"""

from __future__ import annotations

import argparse
import sys

from alpaca_cot.cli import ArgumentParser, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: the adapter folder, the output folder, optional overrides of the saved run."""
    p = ArgumentParser(prog="merge.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_dir", required=True, help="folder written by uniform_finetune.py (or any PEFT adapter)")
    p.add_argument("--merged_dir", required=True, help="new folder for the merged model and its tokenizer")
    p.add_argument("--model_name_or_path", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--model_type", help="model family (default: from the run, else detected)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--size", help=argparse.SUPPRESS)  # the original's flag; the base comes from the run now
    return p


def main(argv: list[str] | None = None) -> int:
    """Merge and print where the merged model is."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.infer.merging import merge_adapter

        result = merge_adapter(args.lora_dir, args.merged_dir, args.model_name_or_path, args.model_type,
                               args.trust_remote_code)
        print(f"merged model saved to {result.path} (check: max logit difference vs base + adapter "
              f"{result.max_logit_difference:.2e}, tolerance {result.tolerance:g})")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
