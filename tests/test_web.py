"""web.py: the real server in a subprocess, driven by the official openai client, plain HTTP and Chromium."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("web")
    run = tiny_run
    port = _free_port()
    log = open(folder / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "web.py", "--lora_dir", str(run), "--port", str(port),
                                "--max_new_tokens", "12", "--max_new_tokens_cap", "16"],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        log.seek(0)
        if "OpenAI-compatible API" in log.read():
            break
        assert process.poll() is None, open(folder / "server.log").read()[-3000:]
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("web.py did not start: " + open(folder / "server.log").read()[-3000:])
    yield url
    process.terminate()
    process.wait(timeout=30)


def _post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_binds_to_loopback_only(server):
    from pathlib import Path

    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux's /proc/net/tcp to read the listening address")
    port = int(server.rsplit(":", 1)[1])
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only, not 0.0.0.0


def test_openai_client_plain_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers."}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=6)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=6,
                                                                   stream=True))
    assert streamed.strip() == reply.choices[0].message.content  # greedy: same answer both ways


def test_max_tokens_is_capped(server):
    status, body = _post(f"{server}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10_000})
    assert status == 200 and body["usage"]["completion_tokens"] <= 16


def test_bad_requests_get_openai_style_errors(server):
    status, body = _post(f"{server}/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]})
    assert status == 400 and "user turn" in body["error"]["message"]
    status, body = _post(f"{server}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "word " * 5000}]})
    assert status == 400 and "this server accepts at most" in body["error"]["message"]


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


def test_malformed_json_gets_an_openai_error_not_a_validation_dump(server):
    request = urllib.request.Request(f"{server}/v1/chat/completions", b'{"messages": [',
                                     {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400
    assert json.loads(raised.value.read()) == {"error": {"message": "the body is not valid JSON",
                                                         "type": "invalid_request_error"}}


def test_models_endpoint_lists_the_served_model(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == "run" and model.owned_by == "alpaca-cot"


def test_original_api(server):
    status, body = _post(server + "/", {"prompt": "Name a colour."})
    assert status == 200 and body["status"] == 200 and isinstance(body["response"], str)
    assert time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    status, body = _post(server + "/", {"question": "no prompt"})
    assert status == 400


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
