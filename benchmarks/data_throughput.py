"""Data pipeline throughput and memory on a generated file of many records.

    python benchmarks/data_throughput.py --records 1000000                 # read + tokenize, then a cached rerun
    python benchmarks/data_throughput.py --records 1000000 --streaming     # the same file as a stream
    python benchmarks/data_throughput.py --records 1000000 --workers 2     # --preprocessing_num_workers 2

Generates a deterministic JSON Lines file (single-turn records with and without input, and 10%
three-turn conversations), runs ``prepare_data`` on it with the model's tokenizer and template, and
prints one JSON line: records/s, seconds per phase and peak resident memory (this process plus
its worker processes; RSS counts the touched pages of the memory-mapped Arrow files, RssAnon does
not). The generated file and caches live in --work_dir (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_cot.embedded import DEFAULT_MODEL

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has had not "
         "first one their its new after who they two her she been other when there all during into school time may "
         "years more most only over city some world would where later up such used many can state about national "
         "out known university united then made").split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate(path: Path, records: int, seed: int = 0) -> None:
    """Write ``records`` records in the unified format (JSON Lines), the same for the same seed."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(records):
            if i % 10 == 9:
                turns = [{"role": role, "content": _text(rng, 8, 40)}
                         for role in ("user", "assistant", "user", "assistant", "user", "assistant")]
                row = {"instruction": turns[0]["content"], "input": "", "output": turns[-1]["content"],
                       "conversation": turns}
            else:
                row = {"instruction": _text(rng, 5, 25), "input": _text(rng, 0, 30) if i % 2 else "",
                       "output": _text(rng, 10, 120)}
            f.write(json.dumps(row) + "\n")


class AnonMemorySampler:
    """Peak anonymous resident memory (RssAnon: heap, not the page cache of memory-mapped Arrow files)."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return round(self.peak_kib / 1024, 1)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and of its (finished) worker processes, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def _measure_streaming(args: argparse.Namespace, sources, tokenizer, template, options, anon) -> dict:
    """Examples per second read through the IterableDataset path."""
    from alpaca_cot.data import prepare_data

    started = time.perf_counter()
    prepared = prepare_data(sources, tokenizer, template, args.cutoff_len, 0, 0, options)
    count = 0
    for _ in prepared.train:
        count += 1
        if count >= args.stream_records:
            break
    seconds = time.perf_counter() - started
    return dict(mode="streaming", examples=count, seconds=round(seconds, 1), records_per_s=round(count / seconds),
                peak_rss_mib=peak_rss_mib(), peak_anon_rss_mib=anon.stop())


def _measure_arrow(args: argparse.Namespace, sources, tokenizer, template, options, anon) -> dict:
    """The first run (read into Arrow, tokenize) and a cached rerun of the same setting."""
    from alpaca_cot.data import prepare_data

    started = time.perf_counter()
    prepared = prepare_data(sources, tokenizer, template, args.cutoff_len, 2000, 0, options)
    first = time.perf_counter() - started
    rss_first, anon_first = peak_rss_mib(), anon.stop()
    started = time.perf_counter()
    again = prepare_data(sources, tokenizer, template, args.cutoff_len, 2000, 0, options)
    second = time.perf_counter() - started
    stats = prepared.stats
    return dict(mode="arrow", train_examples=len(prepared.train), first_run_s=round(first, 1),
                records_per_s=round(args.records / first), read_s=stats["read_seconds"],
                read_records_per_s=round(args.records / stats["read_seconds"]),
                tokenize_s=stats["tokenize_seconds"],
                tokenized_records_per_s=round(len(prepared.train) / stats["tokenize_seconds"]),
                cached_rerun_s=round(second, 1), cache_hit=again.cache_hit, peak_rss_mib=rss_first,
                peak_anon_rss_mib=anon_first, peak_rss_after_rerun_mib=peak_rss_mib())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer and template of this model")
    p.add_argument("--cutoff_len", type=int, default=512)
    p.add_argument("--workers", type=int, help="--preprocessing_num_workers")
    p.add_argument("--streaming", action="store_true", help="measure the IterableDataset path instead")
    p.add_argument("--stream_records", type=int, default=100_000, help="streamed examples to time")
    p.add_argument("--work_dir", help="where the generated file and caches go (default: a temp folder)")
    args = p.parse_args(argv)

    import datasets

    from alpaca_cot.data import DataOptions
    from alpaca_cot.data.catalog import resolve_data
    from alpaca_cot.models import load_tokenizer, resolve_family, resolve_model_path
    from alpaca_cot.templates import get_template

    datasets.disable_progress_bars()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="alpaca_cot_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"generated_{args.records}.jsonl"
    started = time.perf_counter()
    if not data.is_file():
        generate(data, args.records)
    generated = time.perf_counter() - started
    model_path = resolve_model_path(args.model)
    family = resolve_family(None, model_path)
    tokenizer = load_tokenizer(model_path, family)
    template = get_template(family.template)
    result = {"records": args.records, "file_mib": round(data.stat().st_size / 2**20, 1), "model": args.model,
              "template": template.name, "cutoff_len": args.cutoff_len, "workers": args.workers or 1,
              "generate_s": round(generated, 1)}
    options = DataOptions(cache_dir=work / "cache", num_proc=args.workers, streaming=args.streaming)
    sources = resolve_data([str(data)])
    measure = _measure_streaming if args.streaming else _measure_arrow
    result.update(measure(args, sources, tokenizer, template, options, AnonMemorySampler()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
