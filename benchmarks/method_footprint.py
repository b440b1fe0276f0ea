"""Trainable parameters, peak memory and step time of every --peft_type on the embedded model.

    python benchmarks/method_footprint.py            # all methods, one fresh process each; prints a markdown table
    python benchmarks/method_footprint.py --one lora # a single method (what each child process runs)

Each method trains 4 steps of batch 4 on the demo data (cutoff 256) through the real training code;
peak memory is the process's peak resident set (CPU), so every method gets its own process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _one(method: str) -> dict:
    import logging

    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.train.plan import plan_run
    from alpaca_cot.train.recipe import run_finetune

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        args = parse_finetune_args(["--data", "demo", "--peft_type", method, "--max_steps", "4", "--cutoff_len", "256",
                                    "--per_gpu_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                                    "--val_set_size", "0", "--report_to", "none", "--save_steps", "1000",
                                    "--bottleneck_size", "64", "--output_dir", out])
        started = time.time()
        summary = run_finetune(plan_run(args))
    return {"method": method, "trainable": summary["trainable_params"], "total": summary["total_params"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_per_step": summary["train_seconds"] / 4, "wall": time.time() - started}


def main(argv: list[str] | None = None) -> int:
    """Run every method in its own process and print one table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help="measure this method only and print JSON")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one)))
        return 0
    from alpaca_cot.methods import METHODS

    print("| `--peft_type` | trainable parameters | % of model | peak memory (RSS) | s / step |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        child = subprocess.run([sys.executable, __file__, "--one", method], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"| `{method}` | failed: {child.stderr.strip().splitlines()[-1]} | | | |", flush=True)
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| `{method}` | {row['trainable']:,} | {100 * row['trainable'] / row['total']:.2f}% | "
              f"{row['peak_rss_mib']:,.0f} MiB | {row['seconds_per_step']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
