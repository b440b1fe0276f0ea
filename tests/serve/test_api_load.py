"""The HTTP API under load: a real web.py on the tiny model, driven by the official openai client.

The figures in docs/api.md come from ``python benchmarks/api_load.py`` run alone; this test runs the
same code and only checks that nothing fails (its timings share the CPU with pytest).
"""

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import api_load
from benchmarks.api_load import started_server

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed"),
              pytest.mark.slow]  # every test here runs subprocesses for 10-20 s: `-m "not slow"` leaves them out

KEY = "load-test-key"


def test_twenty_concurrent_then_a_hundred_sequential_requests_all_succeed(tiny_llama, tmp_path, capsys):
    with started_server(["--model_name_or_path", str(tiny_llama)], tmp_path / "server.log",
                        {"ALPACA_COT_API_KEY": KEY}) as url:
        code = api_load.main(["--url", url, "--api_key", KEY, "--concurrent", "20", "--sequential", "100",
                              "--max_tokens", "8"])  # the client never retries: any error is exit 1
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in out.splitlines() if "p50" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["20 concurrent", "100 sequential"]
    with capsys.disabled():  # for the record only: these timings share the CPU with pytest
        print("\n" + "\n".join(lines))


def test_a_full_line_answers_429_with_retry_after(tiny_llama, tmp_path):
    """With --max_queue 1 one request generates, one waits and the others are turned away at once."""
    flags = ["--model_name_or_path", str(tiny_llama), "--max_queue", "1"]
    with started_server(flags, tmp_path / "server.log", {"ALPACA_COT_API_KEY": KEY}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)

        def ask(i):  # ~400 new tokens: long enough that the eight requests overlap
            try:
                return client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=400)
            except openai.RateLimitError as refused:
                return refused

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(ask, range(8)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        answered = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
        assert refused and answered and len(refused) + len(answered) == 8
        for error in refused:
            assert int(error.response.headers["Retry-After"]) >= 1
            assert error.body["type"] == "rate_limit_error" and "requests are already waiting" in error.body["message"]
        # the places are given back: the next request is answered
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices
