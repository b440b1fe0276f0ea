"""The web demo: a Gradio chat page and, on the same server, the HTTP APIs.

- ``GET /``: the chat page (streaming, multi-turn, generation sliders, clear/regenerate)
- ``POST /v1/chat/completions``: OpenAI-compatible, streaming (SSE) and not
- ``POST /`` with ``{"prompt": ...}``: the original's API, ``{"response", "status", "time"}``
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .errors import UserError
from .serving import Engine, messages_from_openai
from .templates import Message


def _openai_error(message: str, status: int = 400) -> Any:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


# OpenAI request fields we honour, with their valid ranges: (field, kind, lowest, lowest allowed, highest)
_NUMBER_FIELDS = (("temperature", float, 0, True, 2), ("top_p", float, 0, False, 1),
                  ("max_tokens", int, 1, True, None), ("max_completion_tokens", int, 1, True, None))
# Fields we do not honour: refused by name rather than silently ignored.
_REFUSED_FIELDS = {
    "n": (lambda value: value not in (None, 1), "n > 1 is not supported: send one request per answer"),
    "stop": (lambda value: bool(value), "'stop' sequences are not supported: answers end at the model's own end "
                                        "marker"),
    "seed": (lambda value: value is not None, "'seed' is not supported: use temperature 0 for reproducible "
                                              "answers"),
}


def _checked_number(body: dict, field: str, kind: type, lowest: float, inclusive: bool, highest: float | None) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise UserError(f"'{field}' must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if (value < lowest if inclusive else value <= lowest) or (highest is not None and value > highest):
        upper = f" and <= {highest}" if highest is not None else ""
        raise UserError(f"'{field}' must be {'>=' if inclusive else '>'} {lowest}{upper} (got {value})")
    return value


def chat_request(body: Any) -> tuple[list[Message], dict[str, Any], bool]:
    """Messages, generation overrides and ``stream`` of an OpenAI chat request, every field checked by name."""
    if not isinstance(body, dict):
        raise UserError("the body must be a JSON object with 'messages'")
    for field, (refused, why) in _REFUSED_FIELDS.items():
        if refused(body.get(field)):
            raise UserError(why)
    numbers = {field: _checked_number(body, field, *limits) for field, *limits in _NUMBER_FIELDS}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise UserError(f"'stream' must be true or false (got {stream!r})")
    overrides = {"temperature": numbers["temperature"], "top_p": numbers["top_p"],
                 "max_new_tokens": numbers["max_completion_tokens"] or numbers["max_tokens"]}
    return messages_from_openai(body.get("messages")), overrides, stream


def add_api_routes(app: Any, engine: Engine, model_name: str) -> None:
    """Register the JSON APIs on ``app`` (a FastAPI app, Gradio's own included)."""
    created = int(time.time())

    def complete(messages: list[Message], overrides: dict[str, Any]) -> dict[str, Any]:
        done = engine.complete(messages, **overrides)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                      "total_tokens": done.prompt_tokens + done.completion_tokens},
        }

    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _openai_error("the body is not valid JSON")
        try:
            messages, overrides, stream = chat_request(body)
            if not stream:
                return await run_in_threadpool(complete, messages, overrides)
            config = engine.generation_config(**overrides)
            ids = engine.prompt(messages, trim=False)
        except (UserError, ValueError) as exc:
            return _openai_error(str(exc))
        return StreamingResponse(_sse_chunks(engine.stream(ids, config), model_name),
                                 media_type="text/event-stream")

    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "alpaca-cot"}]}

    async def original_api(request: Request) -> Any:
        started = time.time()
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
            return JSONResponse({"response": "", "status": 400, "error": 'send JSON {"prompt": "..."}'},
                                status_code=400)
        try:
            done = await run_in_threadpool(engine.complete, [Message("user", body["prompt"])])
        except UserError as exc:
            return JSONResponse({"response": "", "status": 400, "error": str(exc)}, status_code=400)
        return {"response": done.text, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/", original_api, methods=["POST"])


def _sse_chunks(pieces: Iterator[str], model_name: str) -> Iterator[str]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict, finish: str | None) -> str:
        chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""}, None)
    for piece in pieces:
        if piece:
            yield event({"content": piece}, None)
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


def build_chat_page(engine: Engine, title: str) -> Any:
    """The Gradio Blocks page: chatbot, input box, sliders, send / regenerate / clear."""
    import gradio as gr

    config = engine.generation_config()

    def conversation(history: list[dict]) -> list[Message]:
        return [Message(m["role"], m["content"] if isinstance(m["content"], str) else str(m["content"]))
                for m in history if m.get("role") in ("user", "assistant")]

    def answer(history: list[dict], temperature: float, top_p: float, max_new_tokens: int) -> Iterator:
        settings = engine.generation_config(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        ids = engine.prompt(conversation(history), trim=True)
        history = [*history, {"role": "assistant", "content": ""}]
        for piece in engine.stream(ids, settings):
            history[-1]["content"] += piece
            yield history
        history[-1]["content"] = history[-1]["content"].strip()
        yield history

    def send(message: str, history: list[dict], *settings: Any) -> Iterator:
        if not message.strip():
            yield history, message
            return
        history = [*history, {"role": "user", "content": message}]
        for updated in answer(history, *settings):
            yield updated, ""

    def regenerate(history: list[dict], *settings: Any) -> Iterator:
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if history:
            yield from answer(history, *settings)

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}")
        chatbot = gr.Chatbot(label="conversation", elem_id="chatbot", height=420)
        box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, elem_id="message")
        with gr.Row():
            send_button = gr.Button("Send", variant="primary", elem_id="send")
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(0.0, 2.0, value=getattr(config, "temperature", None) or 0.0, step=0.05,
                                    label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=getattr(config, "top_p", None) or 0.9, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(1, engine.max_new_tokens_cap, value=config.max_new_tokens, step=1,
                                       label="max new tokens")
        settings = [temperature, top_p, max_new_tokens]
        box.submit(send, [box, chatbot, *settings], [chatbot, box])
        send_button.click(send, [box, chatbot, *settings], [chatbot, box])
        regenerate_button.click(regenerate, [chatbot, *settings], [chatbot])
        clear_button.click(lambda: [], None, [chatbot])
    return page


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``--port`` out of range or already taken on ``host``, naming the flag (before anything loads)."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535 (got {port})")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: {host}:{port} is not free ({exc.strerror}); stop what uses it or pick "
                            "another --port") from exc
