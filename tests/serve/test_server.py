"""server.py: multi-turn history through the template, trimming, a scripted session through a pipe."""

import subprocess
import sys

import pytest

from alpaca_cot.infer.generation import build_generation_config, prompt_ids
from alpaca_cot.infer.loading import load_for_inference
from alpaca_cot.serve.chat import ChatSession, fit_history
from alpaca_cot.templates import Message
from tests.conftest import ROOT


def test_second_turn_sees_the_first(tiny_run):
    loaded = load_for_inference(str(tiny_run))
    session = ChatSession(loaded, build_generation_config(loaded, max_new_tokens=4))
    first = "".join(session.stream_reply("My name is Ada."))
    assert session.history == [Message("user", "My name is Ada."), Message("assistant", first.strip())]
    ids, dropped = fit_history(loaded, [*session.history, Message("user", "What is my name?")], 10_000)
    text = loaded.tokenizer.decode(ids)
    assert dropped == 0 and "My name is Ada." in text and "What is my name?" in text
    assert text.index("My name is Ada.") < text.index("What is my name?")
    session.clear()
    assert session.history == []


def test_oldest_exchanges_are_trimmed_to_fit(tiny_run):
    loaded = load_for_inference(str(tiny_run))
    history = []
    for i in range(6):
        history += [Message("user", f"question number {i} " * 5), Message("assistant", f"answer {i} " * 5)]
    messages = [*history, Message("user", "last question")]
    full = len(prompt_ids(loaded, messages))
    ids, dropped = fit_history(loaded, messages, full - 1)
    assert dropped == 2 and len(ids) < full
    assert "question number 0" not in loaded.tokenizer.decode(ids)
    assert "last question" in loaded.tokenizer.decode(ids)


@pytest.mark.slow
def test_scripted_session_through_a_pipe(tiny_run):
    result = subprocess.run(
        [sys.executable, "server.py", "--lora_dir", str(tiny_run), "--max_new_tokens", "4"], cwd=ROOT,
        input="hello there\nclear\nagain\nstop\nnever answered\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "(history cleared)" in lines
    assert lines.index("(history cleared)") >= 1  # the first answer came before it


@pytest.mark.parametrize("flags", [["--num_beams", "4"], ["--preset", "original"]])
def test_beam_search_is_refused_before_the_model_loads(flags, tmp_path, capsys):
    import server

    assert server.main(["--model_name_or_path", str(tmp_path / "never-loaded"), *flags]) == 2
    assert capsys.readouterr().err.strip() == ("error: --num_beams: answers are streamed token by token, which "
                                               "needs --num_beams 1")


@pytest.mark.slow
def test_beam_search_cannot_stream(tiny_run):
    result = subprocess.run([sys.executable, "server.py", "--lora_dir", str(tiny_run), "--num_beams", "4"],
                            cwd=ROOT, input="hi\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "needs --num_beams 1" in result.stderr
