"""Latency of the HTTP API under load: N concurrent chat requests, then M sequential ones (official openai client).

    python benchmarks/api_load.py                       # serves a tiny random-weight model itself, then measures
    python benchmarks/api_load.py --url http://127.0.0.1:7860 --api_key KEY --max_tokens 64   # a running server

Every request must succeed (the client does not retry): any error fails the run with exit 1.
Latency is per request, client side, queueing included; generation is one at a time, so in
the concurrent phase the later requests wait for the earlier ones. One warm-up request goes first.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def started_server(flags: list[str], log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 180) -> Iterator[str]:
    """Run ``web.py FLAGS`` on a free port until the block ends; yields its base URL (``http://127.0.0.1:PORT``)."""
    port = free_port()
    with open(log_path, "w+") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "web.py"), *flags, "--port", str(port)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        try:
            deadline = time.time() + timeout
            while "OpenAI-compatible API" not in log_path.read_text():
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("web.py did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.3)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def tiny_model(folder: Path) -> Path:
    """A 2-layer random-weight LLaMA (context 512) with a small trained tokenizer: the test suite's tiny model."""
    from tests.conftest import _save_tiny_llama, _train_tokenizer

    return _save_tiny_llama(folder, _train_tokenizer(), hidden=32, kv_heads=2)


def timed_requests(url: str, api_key: str, requests: int, threads: int, max_tokens: int) -> list[float]:
    """Seconds each of ``requests`` chat requests took, ``threads`` at a time; raises on the first failure."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)

    def ask(i: int) -> float:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model="served", messages=[{"role": "user", "content": f"Add the numbers {i} and {i + 1}."}],
            max_tokens=max_tokens)
        if reply.choices[0].finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request {i}: finish_reason {reply.choices[0].finish_reason!r}")
        return time.perf_counter() - started

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(ask, range(requests)))


def summary(seconds: list[float]) -> str:
    """p50 / p95 / max (nearest rank) in milliseconds."""
    ranked = sorted(seconds)

    def rank(p: float) -> float:
        return ranked[max(0, math.ceil(p * len(ranked)) - 1)] * 1000

    return f"p50 {rank(0.50):7.1f} ms  p95 {rank(0.95):7.1f} ms  max {ranked[-1] * 1000:7.1f} ms"


def measure(url: str, api_key: str, concurrent: int, sequential: int, max_tokens: int) -> dict[str, list[float]]:
    """Both phases against a running server; prints one line per phase and returns the latencies."""
    timed_requests(url, api_key, 1, 1, max_tokens)  # not counted: the first generation pays one-off set-up
    phases = {}
    for name, requests, threads in ((f"{concurrent} concurrent", concurrent, concurrent),
                                    (f"{sequential} sequential", sequential, 1)):
        started = time.perf_counter()
        phases[name] = timed_requests(url, api_key, requests, threads, max_tokens)
        wall = time.perf_counter() - started
        print(f"{name:>15}: {summary(phases[name])}  ({requests / wall:.1f} requests/s)", flush=True)
    return phases


def main(argv: list[str] | None = None) -> int:
    """Measure a running server (--url) or one started here on the tiny model; exit 1 on any failed request."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running web.py (default: start one on the tiny random-weight model)")
    p.add_argument("--api_key", default=os.environ.get("ALPACA_COT_API_KEY") or "load-test-key")
    p.add_argument("--concurrent", type=int, default=20)
    p.add_argument("--sequential", type=int, default=100)
    p.add_argument("--max_tokens", type=int, default=16, help="new tokens per answer")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; {args.max_tokens} new tokens per answer", flush=True)
    try:
        if args.url:
            measure(args.url, args.api_key, args.concurrent, args.sequential, args.max_tokens)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            model = tiny_model(Path(tmp) / "tiny")
            with started_server(["--model_name_or_path", str(model), "--max_queue", str(max(32, args.concurrent))],
                                Path(tmp) / "server.log", {"ALPACA_COT_API_KEY": args.api_key}) as url:
                measure(url, args.api_key, args.concurrent, args.sequential, args.max_tokens)
    except Exception as exc:  # the openai client's errors name the status and the server's message
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
