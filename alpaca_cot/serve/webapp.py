"""The web demo: a Gradio chat page and, on the same server, the HTTP APIs.

- ``GET /``: the chat page (streaming, multi-turn, generation sliders, clear/regenerate)
- ``POST /v1/chat/completions``: OpenAI-compatible chat, streaming (SSE) and not
- ``POST /v1/completions``: OpenAI's legacy text completions (raw prompt, no template), streaming and not
- ``GET /v1/models``: the served model
- ``POST /`` with ``{"prompt": ...}``: the original's API, ``{"response", "status", "time"}``

In front of the APIs: an optional API key (``Authorization: Bearer``), a request size cap and a
bounded line for the model. Every refusal is an OpenAI-shaped error, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from ..checks import check_web_flags
from ..errors import UserError
from ..templates import Message
from .engine import Completion, Engine, Ticket, Unavailable, messages_from_openai

logger = logging.getLogger(__name__)

API_ROUTES = "GET /v1/models, POST /v1/chat/completions, POST /v1/completions and POST / (the original's)"


class ApiError(Exception):
    """A refused API request: HTTP status, message, optional OpenAI error code and headers (Retry-After...)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def error_response(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                   original: bool = False) -> JSONResponse:
    """An OpenAI-shaped error; for the original's ``POST /`` also its ``response`` and ``status`` fields."""
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": None, "code": code}
    body = {"response": "", "status": status, "error": error} if original else {"error": error}
    return JSONResponse(body, status_code=status, headers=headers)


def is_api_request(path: str, method: str) -> bool:
    """Whether a request is for the JSON APIs (guarded, answered with OpenAI-shaped errors) or the page."""
    return path == "/v1" or path.startswith("/v1/") or (path == "/" and method == "POST")


def parse_json(raw: bytes) -> Any:
    """The JSON of a request body; anything else (NaN and Infinity included) is a 400."""
    def no_constants(name: str) -> Any:
        raise ApiError(400, f"the body is not valid JSON: {name} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "the body is not valid JSON") from None


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
_COMPLETION_REFUSED_FIELDS = {
    **_REFUSED_FIELDS,
    "echo": (lambda value: bool(value), "'echo' is not supported: the answer never repeats the prompt"),
    "logprobs": (lambda value: value not in (None, False), "'logprobs' is not supported"),
    "best_of": (lambda value: value not in (None, 1), "'best_of' > 1 is not supported: send one request per "
                                                      "answer"),
    "suffix": (lambda value: bool(value), "'suffix' is not supported: the model only continues the prompt"),
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


def _sampling(body: dict, refused: dict) -> tuple[dict[str, Any], bool]:
    """Generation overrides and ``stream`` of a request, every field checked by name."""
    for field, (is_refused, why) in refused.items():
        if is_refused(body.get(field)):
            raise UserError(why)
    numbers = {field: _checked_number(body, field, *limits) for field, *limits in _NUMBER_FIELDS}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise UserError(f"'stream' must be true or false (got {stream!r})")
    overrides = {"temperature": numbers["temperature"], "top_p": numbers["top_p"],
                 "max_new_tokens": numbers["max_completion_tokens"] or numbers["max_tokens"]}
    return overrides, stream


def chat_request(body: Any) -> tuple[list[Message], dict[str, Any], bool]:
    """Messages, generation overrides and ``stream`` of an OpenAI chat request, every field checked by name."""
    if not isinstance(body, dict):
        raise UserError("the body must be a JSON object with 'messages'")
    overrides, stream = _sampling(body, _REFUSED_FIELDS)
    return messages_from_openai(body.get("messages")), overrides, stream


def completion_request(body: Any) -> tuple[str, dict[str, Any], bool]:
    """Prompt text, generation overrides and ``stream`` of an OpenAI (legacy) completion request."""
    if not isinstance(body, dict):
        raise UserError("the body must be a JSON object with 'prompt'")
    overrides, stream = _sampling(body, _COMPLETION_REFUSED_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    elif isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        raise UserError(f"'prompt' lists one string per request (got {len(prompt)}): send one request per prompt")
    if not isinstance(prompt, str):
        raise UserError("'prompt' must be a string (or a list of one string)")
    return prompt, overrides, stream


class ApiGuard:
    """ASGI middleware in front of the APIs: API key (401), shutting down (503) and body size (413).

    The body is read here, chunk by chunk up to the cap, before any route parses or tokenizes it;
    a Content-Length over the cap is refused without reading anything.
    """

    def __init__(self, app: Any, engine: Engine, api_key: str | None, max_request_bytes: int) -> None:
        self.app, self.engine, self.max_request_bytes = app, engine, max_request_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Refuse or pass on one request; the routes see the body as if read from the client."""
        if scope["type"] != "http" or not is_api_request(scope["path"], scope["method"]):
            await self.app(scope, receive, send)
            return
        try:
            headers = dict(scope["headers"])
            self._check_key(headers.get(b"authorization"))
            if self.engine.closing:
                raise ApiError(503, "the server is shutting down", "service_unavailable",
                               {"Retry-After": str(self.engine.retry_after())})
            body = await self._read_body(headers.get(b"content-length"), receive)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.headers, original=scope["path"] == "/")
            await response(scope, receive, send)
            return
        if body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _check_key(self, header: bytes | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer":
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip(), self.api_key):  # constant time: no guessing by timing
            raise ApiError(401, "incorrect API key", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, length: bytes | None, receive: Callable) -> bytes | None:
        too_large = f"the request body is larger than this server's limit of {self.max_request_bytes} bytes"
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "the Content-Length header is not a number")
            if int(length) > self.max_request_bytes:
                raise ApiError(413, f"{too_large} (Content-Length {int(length)})", "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:  # a chunked body says its size only by arriving
                raise ApiError(413, too_large, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect a stream listens for

    return replayed


async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
    """404, 405... from the router: OpenAI-shaped on the API paths, FastAPI's own elsewhere (the page)."""
    path, method = request.url.path, request.method
    if not is_api_request(path, method):
        return await http_exception_handler(request, exc)
    message = {404: f"no route {method} {path}: this server serves {API_ROUTES}",
               405: f"{method} is not allowed on {path}"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, headers=exc.headers, original=path == "/")


async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
    """FastAPI's validation errors as a 400 naming the fields, OpenAI-shaped (not its 422) on the API paths."""
    if not is_api_request(request.url.path, request.method):
        return await request_validation_exception_handler(request, exc)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(400, f"invalid request: {problems}", original=request.url.path == "/")


def api_app_kwargs(engine: Engine, api_key: str | None, max_request_bytes: int) -> dict[str, Any]:
    """Arguments for the FastAPI app the APIs run on (Gradio's ``launch(app_kwargs=...)``): the guard and the
    error handlers must be there when the app is built, as Starlette takes no middleware once it has started."""
    return {"middleware": [Middleware(ApiGuard, engine=engine, api_key=api_key, max_request_bytes=max_request_bytes)],
            "exception_handlers": {StarletteHTTPException: _http_error, RequestValidationError: _validation_error}}


Handler = Callable[[Request], Awaitable[Any]]


def _answered(handler: Handler, original: bool = False) -> Handler:
    """Every refusal of ``handler`` as an error response; an unexpected failure is logged, not shown."""
    async def endpoint(request: Request) -> Any:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.code, exc.headers, original)
        except UserError as exc:
            return error_response(400, str(exc), original=original)
        except Unavailable as exc:
            return error_response(503, str(exc), "service_unavailable", {"Retry-After": "5"}, original)
        except Exception:  # a bug or a device failure: the traceback goes to the server's log only
            logger.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "the server failed to answer this request; its log has the details",
                                  original=original)

    return endpoint


class _Chunks:
    """Server-sent events of one streamed answer, as ``chat.completion.chunk`` or ``text_completion``."""

    def __init__(self, chat: bool, model_name: str) -> None:
        self.chat, self.model_name = chat, model_name
        self.id, self.created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def event(self, text: str | None, finish: str | None, role: bool = False) -> str:
        """One ``data:`` line with ``text`` (or the end, with ``finish``)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model_name, "choices": [choice]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class _Api:
    """The JSON routes over one engine."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name, self.created = engine, model_name, int(time.time())

    def admit(self) -> Ticket:
        """A place in line for the model, or a 429 telling the client when to come back."""
        ticket = self.engine.admit()
        if ticket is None:
            raise ApiError(429, f"the server is busy: {self.engine.max_queue} requests are already waiting for the "
                                "model; retry later", "rate_limit_exceeded",
                           {"Retry-After": str(self.engine.retry_after())})
        return ticket

    async def chat_completions(self, request: Request) -> Any:
        """``POST /v1/chat/completions``."""
        messages, overrides, stream = chat_request(parse_json(await request.body()))
        config = self.engine.generation_config(**overrides)
        return await self.answer(partial(self.engine.prompt, messages, config), config, stream, chat=True)

    async def completions(self, request: Request) -> Any:
        """``POST /v1/completions``: the prompt is raw text, continued as is."""
        text, overrides, stream = completion_request(parse_json(await request.body()))
        config = self.engine.generation_config(**overrides)
        return await self.answer(partial(self.engine.text_prompt, text, config), config, stream, chat=False)

    async def generate(self, make_ids: Callable[[], list[int]], config: Any, stream: bool,
                       raw: bool = False) -> Completion | tuple[list[int], Ticket]:
        """Take a place in line (or 429), tokenize, then the whole answer; for ``stream`` the prompt ids and the
        place, which the stream gives back. Tokenizing waits for a place: a busy server spends nothing on it."""
        ticket = self.admit()
        handed_over = False
        try:
            ids = await run_in_threadpool(make_ids)  # a long prompt takes a while: not on the event loop
            if stream:
                handed_over = True
                return ids, ticket
            return await run_in_threadpool(self.engine.complete_ids, ids, config, raw)
        finally:
            if not handed_over:
                ticket.release()

    async def answer(self, make_ids: Callable[[], list[int]], config: Any, stream: bool, chat: bool) -> Any:
        """A whole OpenAI answer, or a stream of server-sent events."""
        done = await self.generate(make_ids, config, stream, raw=not chat)
        if stream:
            ids, ticket = done
            return StreamingResponse(self.events(ids, config, ticket, _Chunks(chat, self.model_name)),
                                     media_type="text/event-stream",
                                     background=BackgroundTask(ticket.release))  # also when never started
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": usage}

    async def events(self, ids: list[int], config: Any, ticket: Ticket, chunks: _Chunks) -> AsyncIterator[str]:
        """The answer as server-sent events; a failure after the headers went out ends it with an error event."""
        result = Completion("", len(ids), 0, "stop")
        pieces = self.engine.stream(ids, config, result)
        try:
            if chunks.chat:
                yield chunks.event(None, None, role=True)
            while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                if piece:
                    yield chunks.event(piece, None)
            yield chunks.event(None, result.finish_reason)
            yield "data: [DONE]\n\n"
        except Exception as exc:
            if not isinstance(exc, Unavailable):
                logger.exception("streaming an answer failed")
            message = str(exc) if isinstance(exc, Unavailable) else "the server failed while answering"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # a client that left: stop generating, give the model back
                await run_in_threadpool(pieces.close)
            ticket.release()

    async def models(self, request: Request) -> Any:
        """``GET /v1/models``."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "alpaca-cot"}]}

    async def original(self, request: Request) -> Any:
        """``POST /`` with ``{"prompt": ...}``: the original's API."""
        started = time.time()
        body = parse_json(await request.body())
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
            raise ApiError(400, 'send JSON {"prompt": "..."}')
        config = self.engine.generation_config()
        done = await self.generate(partial(self.engine.prompt, [Message("user", body["prompt"])], config), config,
                                   stream=False)
        return {"response": done.text, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


def add_api_routes(app: Any, engine: Engine, model_name: str) -> None:
    """Register the JSON APIs on ``app`` (a FastAPI app built with ``api_app_kwargs``, Gradio's own included)."""
    api = _Api(engine, model_name)
    app.add_api_route("/v1/chat/completions", _answered(api.chat_completions), methods=["POST"])
    app.add_api_route("/v1/completions", _answered(api.completions), methods=["POST"])
    app.add_api_route("/v1/models", _answered(api.models), methods=["GET"])
    app.add_api_route("/", _answered(api.original, original=True), methods=["POST"])


def build_chat_page(engine: Engine, title: str) -> Any:
    """The Gradio Blocks page: chatbot, input box, sliders, send / regenerate / clear."""
    import gradio as gr

    config = engine.generation_config()

    def conversation(history: list[dict]) -> list[Message]:
        return [Message(m["role"], m["content"] if isinstance(m["content"], str) else str(m["content"]))
                for m in history if m.get("role") in ("user", "assistant")]

    def answer(history: list[dict], temperature: float, top_p: float, max_new_tokens: int) -> Iterator:
        settings = engine.generation_config(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        ids = engine.prompt(conversation(history), settings, trim=True)
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


@dataclass
class ServerOptions:
    """Where and how ``web.py`` serves: address, exposure and the limits in front of the model."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_queue: int = 32


def check_server_options(options: ServerOptions) -> None:
    """Refuse, before anything loads, an API exposed without a key, bad limits (``checks.check_web_flags``, all
    at once) and a port that is taken."""
    check_web_flags(options)
    check_port_free(options.host, options.port)


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``--port`` already taken on ``host``, naming the flag (before anything loads)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: {host}:{port} is not free ({exc.strerror}); stop what uses it or pick "
                            "another --port") from exc


def serve(engine: Engine, model_name: str, options: ServerOptions) -> None:
    """Serve the page and the APIs on one server until Ctrl-C or SIGTERM."""
    page = build_chat_page(engine, f"Alpaca-CoT chat: {model_name}")
    page.queue(default_concurrency_limit=1, max_size=max(1, options.max_queue))  # the page's own line
    key = options.api_key
    try:
        app, local_url, share_url = page.launch(
            server_name=options.host, server_port=options.port, share=options.share, prevent_thread_lock=True,
            quiet=True, max_threads=40 + options.max_queue,  # requests waiting for the model each hold a thread
            auth=(lambda _user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None,
            auth_message="Log in with any user name and the server's API key as password." if key else None,
            app_kwargs=api_app_kwargs(engine, key, options.max_request_bytes))
    except OSError as exc:  # taken between the check and the launch; Gradio's message names its env variable
        raise UserError(f"--port {options.port}: cannot serve on {options.host}:{options.port} ({exc}); pick "
                        "another --port") from exc
    add_api_routes(app, engine, model_name)
    print(f"serving {model_name} on {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
    print(f"OpenAI-compatible API: {local_url.rstrip('/')}/v1/chat/completions"
          + (" (send 'Authorization: Bearer <key>'; the page asks for the key as password)" if key else ""),
          flush=True)
    _serve_until_stopped(page, engine)


def _serve_until_stopped(page: Any, engine: Engine) -> None:
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop drains like Ctrl-C
    try:
        while page.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping: requests still waiting for the model get 503", flush=True)
    finally:
        engine.close()
        page.close()
