"""web.py: the real server in a subprocess, driven by the official openai client, plain HTTP and Chromium."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.api_load import started_server
from tests.conftest import ROOT

# The servers run as subprocesses: checking for gradio here spares the quick run its 4 s import.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """The demo run served with small caps and no key, on 127.0.0.1."""
    flags = ["--lora_dir", str(tiny_run), "--max_new_tokens", "12", "--max_new_tokens_cap", "16"]
    with started_server(flags, tmp_path_factory.mktemp("web") / "server.log", {"ALPACA_COT_API_KEY": ""}) as url:
        yield url


KEY = "test-key-0123"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama, tmp_path_factory):
    """The tiny base model (context 512) with the default caps (512 new tokens, 1 MiB bodies), key from the env."""
    flags = ["--model_name_or_path", str(tiny_llama)]
    with started_server(flags, tmp_path_factory.mktemp("keyed") / "server.log", {"ALPACA_COT_API_KEY": KEY}) as url:
        yield url


def _request(url, body=None, headers=None, method=None):
    """(status, JSON body, headers) of one request; ``body`` is JSON-encoded unless already bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def _post(url, body):
    status, answer, _ = _request(url, body)
    return status, answer


def _openai_error(body, kind="invalid_request_error"):
    """Whether ``body`` is shaped like OpenAI's errors (and nothing of FastAPI's ``detail``)."""
    return (set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            and body["error"]["type"] == kind and body["error"]["message"])


@pytest.mark.slow
def test_binds_to_loopback_only(server):
    from pathlib import Path

    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux's /proc/net/tcp to read the listening address")
    port = int(server.rsplit(":", 1)[1])
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only, not 0.0.0.0


@pytest.mark.slow
def test_openai_client_plain_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers."}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=6)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=6, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed.strip() == reply.choices[0].message.content  # greedy: same answer both ways
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


@pytest.mark.slow
def test_max_tokens_is_capped(server):
    status, body = _post(f"{server}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10_000})
    assert status == 200 and body["usage"]["completion_tokens"] <= 16


@pytest.mark.slow
def test_bad_requests_get_openai_style_errors(server):
    status, body = _post(f"{server}/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]})
    assert status == 400 and "user turn" in body["error"]["message"]
    status, body = _post(f"{server}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "word " * 5000}]})
    assert status == 400 and "this server accepts at most" in body["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("extra, named", [
    ({"max_tokens": "lots"}, "'max_tokens' must be an integer"),
    ({"max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"temperature": -1}, "'temperature' must be >= 0 and <= 2"),
    ({"top_p": 1.5}, "'top_p' must be > 0 and <= 1"),
    ({"stream": "yes"}, "'stream' must be true or false"),
    ({"n": 2}, "n > 1 is not supported"),
    ({"stop": ["\n"]}, "'stop' sequences are not supported"),
    ({"seed": 7}, "'seed' is not supported"),
])
def test_invalid_fields_are_refused_by_name_openai_style(server, extra, named):
    status, body = _post(f"{server}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], **extra})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(named), body


@pytest.mark.slow
def test_malformed_json_gets_an_openai_error_not_a_validation_dump(server):
    request = urllib.request.Request(f"{server}/v1/chat/completions", b'{"messages": [',
                                     {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400
    assert json.loads(raised.value.read()) == {"error": {"message": "the body is not valid JSON",
                                                         "type": "invalid_request_error", "param": None,
                                                         "code": None}}


@pytest.mark.slow
def test_models_endpoint_lists_the_served_model(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == "run" and model.owned_by == "alpaca-cot"


@pytest.mark.slow
def test_original_api(server):
    status, body = _post(server + "/", {"prompt": "Name a colour."})
    assert status == 200 and body["status"] == 200 and isinstance(body["response"], str)
    assert time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    status, body = _post(server + "/", {"question": "no prompt"})
    assert status == 400


@pytest.mark.slow
def test_twenty_concurrent_requests_are_all_answered(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300)

    def ask(i):
        return client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": f"Add the numbers {i} and {i}."}], max_tokens=4)

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(ask, range(20)))
    assert len(replies) == 20 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed")
def test_chat_page_in_headless_chromium(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 120)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#message textarea"))
        box.send_keys("Name a colour.")
        box.send_keys(Keys.ENTER)

        def bot_text(b):
            bubbles = b.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
            text = bubbles[-1].text.strip() if bubbles else ""
            return text or False

        shown = wait.until(bot_text)
        time.sleep(1)  # let the stream finish
        shown = bot_text(browser) or shown
    finally:
        browser.quit()
    status, body = _post(server + "/", {"prompt": "Name a colour."})
    assert status == 200
    assert shown.split()[0] in body["response"]  # the page shows the model's own (greedy) answer


def test_a_taken_port_is_one_line_naming_the_flag_before_loading(tmp_path, capsys):
    import socket

    import web

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as owner:
        owner.bind(("127.0.0.1", 0))
        owner.listen()
        port = owner.getsockname()[1]
        code = web.main(["--model_name_or_path", str(tmp_path / "never-loaded"), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --port {port}: 127.0.0.1:{port} is not free") and "pick another --port" in err[0]
    assert web.main(["--model_name_or_path", str(tmp_path / "x"), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be between 1 and 65535 (got 70000)"


@pytest.mark.slow
def test_completions_plain_and_streaming_continue_the_raw_prompt(server, tiny_tokenizer):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    text = "Add the numbers 3 and 4."
    reply = client.completions.create(model="run", prompt=text, max_tokens=6)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tiny_tokenizer(text)["input_ids"])  # as is: no template around it
    assert 0 < reply.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model="run", prompt=text, max_tokens=6, stream=True))
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert "".join(chunk.choices[0].text for chunk in chunks) == reply.choices[0].text  # greedy, not stripped
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    status, body = _post(f"{server}/v1/completions", {"prompt": [text], "max_tokens": 6})
    assert status == 200 and body["choices"][0]["text"] == reply.choices[0].text


@pytest.mark.slow
@pytest.mark.parametrize("extra, named", [
    ({"echo": True}, "'echo' is not supported"),
    ({"logprobs": 2}, "'logprobs' is not supported"),
    ({"best_of": 3}, "'best_of' > 1 is not supported"),
    ({"suffix": "the end"}, "'suffix' is not supported"),
    ({"n": 2}, "n > 1 is not supported"),
    ({"stop": "\n"}, "'stop' sequences are not supported"),
    ({"seed": 7}, "'seed' is not supported"),
    ({"max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"prompt": ["one", "two"]}, "'prompt' lists one string per request (got 2)"),
    ({"prompt": [1, 2, 3]}, "'prompt' must be a string (or a list of one string)"),
    ({"prompt": None}, "'prompt' must be a string"),
])
def test_completion_fields_we_do_not_honour_are_refused_by_name(server, extra, named):
    status, body = _post(f"{server}/v1/completions", {"prompt": "hi", **extra})
    assert status == 400 and _openai_error(body) and body["error"]["message"].startswith(named), body


@pytest.mark.slow
@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/v1/nope", None, 404),
    ("POST", "/v1/chat", {"messages": []}, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("DELETE", "/v1/models", None, 405),
    ("POST", "/v1/chat/completions", b'{"temperature": NaN, "messages": []}', 400),
    ("POST", "/v1/completions", b"[" * 50_000 + b"]" * 50_000, 400),  # nested past Python's recursion limit
    ("POST", "/v1/completions", b'"a string, not an object"', 400),
    ("POST", "/v1/chat/completions", b"\xff\xfe not utf-8", 400),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400),
])
def test_every_invalid_request_gets_an_openai_shaped_error(server, method, path, body, status):
    got, answer, _ = _request(server + path, body, method=method)
    assert got == status and _openai_error(answer), answer


@pytest.mark.slow
def test_every_api_route_needs_the_key(keyed_server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                               ("POST", "/v1/completions", {"prompt": "hi"}), ("GET", "/v1/nope", None)):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
            status, answer, sent = _request(keyed_server + path, body, headers, method)
            assert status == 401 and _openai_error(answer) and sent["WWW-Authenticate"] == "Bearer", (path, headers)
    status, answer, _ = _request(keyed_server + "/", {"prompt": "hi"})
    assert status == 401 and answer["status"] == 401 and answer["error"]["type"] == "invalid_request_error"
    status, answer, _ = _request(keyed_server + "/", {"prompt": "hi"}, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and answer["status"] == 200


@pytest.mark.slow
def test_the_openai_client_with_the_key_and_with_a_wrong_one(keyed_server):
    openai = pytest.importorskip("openai")
    [model] = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY).models.list().data
    assert model.owned_by == "alpaca-cot"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong-key", max_retries=0).models.list()


@pytest.mark.slow
def test_a_512_token_model_answers_with_the_default_cap_of_512(keyed_server):
    """The prompt budget is the context minus the request's own answer, not minus the server's cap."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY)
    messages = [{"role": "user", "content": "Add the numbers 2 and 3."}]
    reply = client.chat.completions.create(model="tiny", messages=messages)  # the default answer: 256 tokens
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens <= 512
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=400)
    assert reply.usage.total_tokens <= 512
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=500)
    message = refused.value.body["message"]
    assert "this server accepts at most 12 here" in message and "context is 512 tokens and 500 are kept" in message


@pytest.mark.slow
def test_the_page_asks_for_the_key_as_password(keyed_server):
    status, _, _ = _request(keyed_server + "/config", method="GET")
    assert status == 401

    def login(password):
        form = urllib.parse.urlencode({"username": "anyone", "password": password}).encode()
        request = urllib.request.Request(keyed_server + "/login", form, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert login(KEY) == 200 and login("wrong-key") == 400


def _raw_post(base: str, path: str, headers: dict[str, str], chunks: list[bytes] = ()) -> tuple[int, dict]:
    """POST over a plain socket: the server may answer and close before the body is sent (a broken pipe for
    urllib), which is just what a limit checked early does; the answer is read either way."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            if chunks:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered already
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
            piece = sock.recv(65536)
            if not piece:
                break
            reply += piece
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.slow
def test_a_body_over_the_limit_is_413_before_it_is_parsed(keyed_server):
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    # Content-Length alone decides: the body is never sent, and the answer comes anyway.
    status, answer = _raw_post(keyed_server, "/v1/chat/completions", {**auth, "Content-Length": str(2 << 20)})
    assert status == 413 and _openai_error(answer)
    assert "limit of 1048576 bytes (Content-Length" in answer["error"]["message"]
    status, answer = _raw_post(keyed_server, "/v1/chat/completions",
                               {"content-type": "application/json", "Content-Length": str(2 << 20)})
    assert status == 401  # the key is checked before anything is read
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    status, answer = _raw_post(keyed_server, "/v1/completions", {**auth, "Transfer-Encoding": "chunked"},
                               [big[i:i + 65536] for i in range(0, len(big), 65536)])
    assert status == 413 and _openai_error(answer) and "Content-Length" not in answer["error"]["message"]


def test_an_exposed_host_without_a_key_is_refused_in_one_line_before_loading(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "ALPACA_COT_API_KEY"}
    for flags, line in (
        (["--host", "0.0.0.0"], "error: --host 0.0.0.0 exposes the API to the network: set --api_key (or "
                                "ALPACA_COT_API_KEY)"),
        (["--share"], "error: --share exposes the page and the API through a public link: set --api_key (or "
                      "ALPACA_COT_API_KEY)"),
    ):
        started = time.time()
        done = subprocess.run([sys.executable, "web.py", *flags, "--model_name_or_path", str(tmp_path / "never")],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done.stdout
        assert done.stderr.strip().splitlines() == [line]  # one line, no traceback, no loading messages
        assert time.time() - started < 30  # Python's start-up only: the model (absent anyway) is never loaded


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False),
    ("example.org", False),
])
def test_loopback_addresses(host, loopback):
    from alpaca_cot.checks import is_loopback

    assert is_loopback(host) is loopback


def test_server_flags_are_checked_before_loading(tmp_path, capsys, monkeypatch):
    import web

    monkeypatch.delenv("ALPACA_COT_API_KEY", raising=False)
    model = ["--model_name_or_path", str(tmp_path / "never-loaded")]
    # With a key, an exposed host passes: the next check (the port) is what stops it.
    assert web.main([*model, "--host", "0.0.0.0", "--api_key", KEY, "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be between 1 and 65535 (got 70000)"
    monkeypatch.setenv("ALPACA_COT_API_KEY", KEY)  # the key from the environment counts the same
    assert web.main([*model, "--host", "0.0.0.0", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be between 1 and 65535 (got 70000)"
    for flags, message in ((["--api_key", "two words"], "--api_key (or ALPACA_COT_API_KEY) must be printable ASCII"),
                           (["--max_queue", "-1"], "--max_queue must be at least 0 (got -1)"),
                           (["--max_request_bytes", "0"], "--max_request_bytes must be at least 1 (got 0)")):
        assert web.main([*model, *flags]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {message}")


def test_every_web_flag_problem_comes_in_one_line(tmp_path, capsys, monkeypatch):
    import web

    monkeypatch.delenv("ALPACA_COT_API_KEY", raising=False)
    assert web.main(["--model_name_or_path", str(tmp_path / "never-loaded"), "--host", "0.0.0.0", "--share",
                     "--max_queue", "-1", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for named in ("--host 0.0.0.0 exposes", "--share exposes", "--max_queue must be at least 0", "--port must be"):
        assert named in err[0], err[0]


def test_the_line_for_the_model_is_bounded(tiny_llama):
    from alpaca_cot.infer.loading import load_for_inference
    from alpaca_cot.serve.engine import Engine

    engine = Engine(load_for_inference(None, str(tiny_llama)), max_queue=1)
    first, second = engine.admit(), engine.admit()  # one generating, one waiting
    assert first and second and engine.admit() is None and engine.retry_after() >= 1
    first.release()
    first.release()  # given back once only
    third = engine.admit()
    assert third and engine.admit() is None


def test_a_closing_server_answers_503_with_retry_after(tiny_llama):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from alpaca_cot.infer.loading import load_for_inference
    from alpaca_cot.serve.engine import Engine, Unavailable
    from alpaca_cot.serve.webapp import add_api_routes, api_app_kwargs
    from alpaca_cot.templates import Message

    engine = Engine(load_for_inference(None, str(tiny_llama)), max_new_tokens_cap=4)
    app = FastAPI(**api_app_kwargs(engine, None, 1 << 20))
    add_api_routes(app, engine, "tiny")
    client = TestClient(app)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    engine.close()
    refused = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 503 and _openai_error(refused.json(), "server_error")
    assert int(refused.headers["Retry-After"]) >= 1
    with pytest.raises(Unavailable):  # a request already in line when the server began closing
        engine.complete([Message("user", "hi")])


def test_a_stream_closed_early_stops_generating_and_gives_the_model_back(tiny_llama):
    """A client that leaves mid-stream: the generation stops within a token instead of running on beside the
    next request (the lock is only free once it has stopped)."""
    from alpaca_cot.infer.loading import load_for_inference
    from alpaca_cot.serve.engine import Completion, Engine
    from alpaca_cot.templates import Message

    engine = Engine(load_for_inference(None, str(tiny_llama)))
    config = engine.generation_config(max_new_tokens=400)
    ids = engine.prompt([Message("user", "Count.")], config)
    result = Completion("", 0, 0, "")
    started = time.perf_counter()
    "".join(engine.stream(ids, config, result))
    whole = time.perf_counter() - started
    assert result.completion_tokens == 400 and result.finish_reason == "length"  # random weights: no end marker
    pieces = engine.stream(ids, config)
    next(pieces)
    started = time.perf_counter()
    pieces.close()
    assert time.perf_counter() - started < whole / 4 and not engine.lock.locked()
