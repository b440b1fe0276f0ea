"""Records/s of batch prediction, batched vs one at a time, on the embedded model (one process, one run).

    python benchmarks/predict_throughput.py [--lora_dir saved_models/demo] [--records 32] [--batch_size 16]

Both settings answer the same held-out demo problems with greedy decoding, in the
same process, so the ratio is not skewed by the CPU's speed drifting between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_cot.cli import add_generation_arguments
from alpaca_cot.data import load_records
from alpaca_cot.data.catalog import resolve_data
from alpaca_cot.embedded import DEFAULT_MODEL
from alpaca_cot.infer.generation import generation_config_from_args
from alpaca_cot.infer.loading import load_for_inference
from alpaca_cot.infer.prediction import predict_file


def main(argv: list[str] | None = None) -> int:
    """Time prediction at batch 1 and at --batch_size over the same records; print both and the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_dir")
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    add_generation_arguments(p)
    p.set_defaults(max_new_tokens=64)
    args = p.parse_args(argv)

    [demo] = resolve_data(["demo"])
    records = load_records(demo.heldout)[: args.records]
    loaded = load_for_inference(args.lora_dir, None if args.lora_dir else DEFAULT_MODEL)
    # A fixed number of new tokens makes both settings do the same work.
    config = generation_config_from_args(loaded, args, min_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "in.json"
        data.write_text(json.dumps(records, ensure_ascii=False))
        rates = {}
        for batch in (1, args.batch_size):
            started = time.time()
            stats = predict_file(loaded, data, Path(tmp) / f"out{batch}.jsonl", config, batch_size=batch)
            rates[batch] = stats.written / (time.time() - started)
            print(f"batch {batch:>3}: {rates[batch]:.3f} records/s ({stats.written} records, "
                  f"{args.max_new_tokens} new tokens each)")
    print(f"speed-up at batch {args.batch_size}: {rates[args.batch_size] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
