"""The model behind the web demo and HTTP API: one generation at a time, bounded line, capped requests.

Requests wait on one lock instead of competing for the model; at most ``max_queue`` API
requests wait at once (the rest are turned away so they can retry). ``max_new_tokens`` is
clamped to a cap; a prompt must leave room for its own answer in the model's context: too
long a prompt is refused (API) or trimmed from the oldest turn (chat page).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..infer.generation import answer_text, build_generation_config, generate_token_ids, prompt_ids, stop_token_ids
from ..infer.loading import LoadedModel
from ..presets import DEFAULT_PRESET
from ..templates import Message
from .chat import context_window, fit_history, stream_generate


@dataclass
class Completion:
    """A finished answer with OpenAI-style accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class Unavailable(Exception):
    """The server is shutting down: the request was not run (the API answers 503)."""


class Ticket:
    """One request's place in line for the model; given back exactly once, whoever gives it back first."""

    def __init__(self, leave: Any) -> None:
        self._leave = leave
        self._given_back = False
        self._guard = threading.Lock()

    def release(self) -> None:
        """Leave the line (idempotent)."""
        with self._guard:
            if self._given_back:
                return
            self._given_back = True
        self._leave()


class Engine:
    """Serialised, capped generation over one loaded model."""

    def __init__(self, loaded: LoadedModel, preset: str = DEFAULT_PRESET, defaults: dict[str, Any] | None = None,
                 max_new_tokens_cap: int = 512, max_prompt_tokens: int | None = None, max_queue: int = 32) -> None:
        self.loaded = loaded
        self.preset = preset
        self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
        self.max_new_tokens_cap = max_new_tokens_cap
        self.context = context_window(loaded)
        self.max_prompt_tokens = max_prompt_tokens  # None: the context minus each request's own answer
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.closing = False
        self._admitted = 0  # API requests generating or waiting for the lock
        self._counter = threading.Lock()
        self._seconds = 1.0  # running average of one generation, for Retry-After

    def admit(self) -> Ticket | None:
        """A place in line for the model, or ``None`` when ``max_queue`` requests already wait for it."""
        with self._counter:
            if self._admitted > self.max_queue:  # one generating plus max_queue waiting
                return None
            self._admitted += 1
        return Ticket(self._leave)

    def _leave(self) -> None:
        with self._counter:
            self._admitted -= 1

    def retry_after(self) -> int:
        """Seconds a turned-away client should wait: the line ahead of it at the average generation time."""
        return max(1, math.ceil(self._seconds * max(1, self._admitted)))

    def close(self) -> None:
        """Stop taking work: requests not yet generating raise ``Unavailable`` when their turn comes."""
        self.closing = True

    @contextmanager
    def _turn(self) -> Iterator[None]:
        with self.lock:
            if self.closing:
                raise Unavailable("the server is shutting down")
            started = time.monotonic()
            try:
                yield
            finally:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - started)

    def generation_config(self, **overrides: Any) -> Any:
        """Preset + server defaults + request overrides, with ``max_new_tokens`` clamped to the cap."""
        settings = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        config = build_generation_config(self.loaded, self.preset, **settings)
        config.max_new_tokens = max(1, min(config.max_new_tokens, self.max_new_tokens_cap))
        config.num_beams = 1  # answers are streamed
        return config

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Longest prompt that leaves room for ``max_new_tokens`` in the context (and obeys ``max_prompt_tokens``)."""
        room = self.context - max_new_tokens
        return room if self.max_prompt_tokens is None else min(room, self.max_prompt_tokens)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt too long for the context once its answer is reserved, naming every number."""
        budget = self.prompt_budget(max_new_tokens)
        if prompt_tokens <= budget:
            return
        if self.max_prompt_tokens is not None and budget == self.max_prompt_tokens:
            raise UserError(f"the prompt has {prompt_tokens} tokens; this server accepts at most {budget} "
                            "(--max_prompt_tokens): shorten the prompt")
        raise UserError(f"the prompt has {prompt_tokens} tokens; this server accepts at most {max(budget, 0)} here: "
                        f"the model's context is {self.context} tokens and {max_new_tokens} are kept for the answer "
                        f"(max_tokens, at most {self.max_new_tokens_cap}): shorten the prompt or lower max_tokens")

    def prompt(self, messages: list[Message], config: Any, trim: bool = False) -> list[int]:
        """Prompt ids through the run's template; too long a prompt is trimmed (chat page) or refused (API).

        Trimming keeps at least a quarter of the context for the prompt and shortens the answer
        (``config.max_new_tokens``) instead when the two do not fit together.
        """
        if not trim:
            ids = prompt_ids(self.loaded, messages)
            self.check_fits(len(ids), config.max_new_tokens)
            return ids
        budget = max(self.prompt_budget(config.max_new_tokens), self.context // 4, 1)
        ids = fit_history(self.loaded, messages, budget)[0]
        config.max_new_tokens = max(1, min(config.max_new_tokens, self.context - len(ids)))
        return ids

    def text_prompt(self, text: str, config: Any) -> list[int]:
        """Ids of raw ``text`` as the tokenizer encodes it (no template), refused when too long or empty."""
        ids = self.loaded.tokenizer(text)["input_ids"]
        if not ids:
            raise UserError("'prompt' is empty: give some text to continue")
        self.check_fits(len(ids), config.max_new_tokens)
        return ids

    def complete(self, messages: list[Message], trim: bool = False, **overrides: Any) -> Completion:
        """Whole answer to ``messages`` with token counts."""
        config = self.generation_config(**overrides)
        return self.complete_ids(self.prompt(messages, config, trim), config)

    def complete_ids(self, ids: list[int], config: Any, raw: bool = False) -> Completion:
        """Whole answer to prompt ``ids``; ``raw`` keeps the text as decoded (a continuation), else it is stripped."""
        with self._turn():
            [produced] = generate_token_ids(self.loaded, [ids], config, batch_size=1)
        stops = stop_token_ids(config)
        stopped = bool(produced) and produced[-1] in stops
        if raw:
            text = self.loaded.tokenizer.decode(produced[:-1] if stopped else produced, skip_special_tokens=True)
        else:
            text = answer_text(self.loaded, produced, stops)
        reason = "stop" if stopped or len(produced) < config.max_new_tokens else "length"
        return Completion(text, len(ids), len(produced), reason)

    def stream(self, ids: list[int], config: Any, result: Completion | None = None) -> Iterator[str]:
        """Answer pieces as they come; waits for its turn if another request is generating.

        Closing the iterator early (a client that left) stops the generation within one token,
        so the next request never runs beside an orphaned one. ``result``, when given, receives
        the token counts and finish reason once the answer is complete.
        """
        produced: list[int] = []
        with self._turn():
            yield from stream_generate(self.loaded, ids, config, produced)
        if result is not None:
            stops = stop_token_ids(config)
            stopped = bool(produced) and produced[-1] in stops
            result.prompt_tokens, result.completion_tokens = len(ids), len(produced)
            result.finish_reason = "stop" if stopped or len(produced) < config.max_new_tokens else "length"


def messages_from_openai(raw: Any) -> list[Message]:
    """Turn OpenAI ``messages`` into a conversation ending with a user turn; system text joins the first turn."""
    if not isinstance(raw, list) or not raw:
        raise UserError("'messages' must be a non-empty list of {role, content} objects")
    system: list[str] = []
    messages: list[Message] = []
    for index, item in enumerate(raw):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise UserError(f"messages[{index}] needs role system|user|assistant and string content")
        if role == "system":
            system.append(content)
        elif messages and messages[-1].role == role:  # merge consecutive turns of one speaker
            messages[-1] = Message(role, messages[-1].content + "\n" + content)
        else:
            messages.append(Message(role, content))
    if not messages or messages[0].role != "user" or messages[-1].role != "user":
        raise UserError("messages must start and end with a user turn (after any system messages)")
    if system:
        messages[0] = Message("user", "\n".join(system) + "\n\n" + messages[0].content)
    return messages
