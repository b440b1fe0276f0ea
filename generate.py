"""Answer instructions with a base model + adapter saved by uniform_finetune.py.

    python generate.py --lora_dir saved_models/demo --instruction "..." [--input "..."]
    echo "Name three primary colors." | python generate.py --lora_dir saved_models/demo
"""

from __future__ import annotations

import argparse
import sys

from alpaca_cot.cli import ArgumentParser, add_generation_arguments, add_model_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: the adapter folder, optional overrides of the saved run, and generation settings."""
    p = ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_model_arguments(p)
    p.add_argument("--instruction", help="one instruction; without it, one instruction per line from stdin")
    p.add_argument("--input", default="", help="optional input/context for --instruction")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the model once, then answer --instruction or every stdin line."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.infer.generation import answer, generation_config_from_args
        from alpaca_cot.infer.loading import load_from_args

        loaded = load_from_args(args)
        config = generation_config_from_args(loaded, args)
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
