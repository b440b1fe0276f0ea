"""Answer instructions with a base model + adapter saved by uniform_finetune.py.

    python generate.py --lora_dir saved_models/demo --instruction "..." [--input "..."]
    echo "Name three primary colors." | python generate.py --lora_dir saved_models/demo
"""

from __future__ import annotations

import argparse
import sys

from alpaca_cot.cli import add_generation_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: the adapter folder, optional overrides of the saved run, and generation settings."""
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--lora_dir", help="folder written by uniform_finetune.py (omit to use the base model alone)")
    p.add_argument("--model_name_or_path", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--model_type", help="model family (default: from the run, else detected)")
    p.add_argument("--template", help="prompt template (default: the run's)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--instruction", help="one instruction; without it, one instruction per line from stdin")
    p.add_argument("--input", default="", help="optional input/context for --instruction")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the model once, then answer --instruction or every stdin line."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.errors import UserError
        from alpaca_cot.inference import answer, build_generation_config, load_for_inference

        if args.lora_dir is None and args.model_name_or_path is None:
            raise UserError("give --lora_dir (a trained adapter) or --model_name_or_path (a base model)")
        loaded = load_for_inference(args.lora_dir, args.model_name_or_path, args.model_type, args.template,
                                    args.trust_remote_code)
        config = build_generation_config(
            loaded, args.preset, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams,
            repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
        if args.instruction is not None:
            print(answer(loaded, args.instruction, args.input, config))
            return 0
        for line in sys.stdin:
            if line.strip():
                print(answer(loaded, line.strip(), "", config), flush=True)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
