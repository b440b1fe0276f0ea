"""Batch prediction: answer every record of a JSON/JSONL file with base model + adapter.

    python predict.py --lora_dir saved_models/demo --data data/demo/demo_heldout.json --result_dir out/pred.jsonl

Writes one JSON line per input record (the record plus a "generate" field), in input order.
Interrupted and rerun with the same flags, it continues after the last finished record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alpaca_cot.cli import ArgumentParser, add_generation_arguments, add_model_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: model (adapter and overrides), data in, results out, batch size, generation settings."""
    p = ArgumentParser(prog="predict.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="JSON array or JSON Lines file of records with 'instruction'")
    p.add_argument("--result_dir", required=True, help="output JSON Lines file (appended to when resuming)")
    p.add_argument("--predict_batch_size", type=int, default=16, help="prompts generated together (left-padded)")
    p.add_argument("--cutoff_len", type=int, default=512, help="longest prompt in tokens (the end is kept)")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the model once and predict the whole file."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.checks import check_predict_flags
        from alpaca_cot.infer.generation import generation_config_from_args
        from alpaca_cot.infer.loading import load_from_args
        from alpaca_cot.infer.prediction import predict_file

        check_predict_flags(args)  # before the model loads
        loaded = load_from_args(args)
        stats = predict_file(loaded, Path(args.data), Path(args.result_dir), generation_config_from_args(loaded, args),
                             args.predict_batch_size, args.cutoff_len)
        resumed = f" (resumed after {stats.already_done})" if stats.already_done else ""
        print(f"wrote {stats.written} predictions{resumed} to {args.result_dir}: "
              f"{stats.total} of {stats.total} done, {stats.records_per_second:.2f} records/s")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
