"""The model behind the web demo and HTTP API: one generation at a time, capped requests.

Requests queue on a lock instead of competing for the model; ``max_new_tokens`` is
clamped to a cap and prompts longer than the prompt cap are refused (API) or
trimmed from the oldest turn (chat page).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .chat import context_window, fit_history, stream_generate
from .errors import UserError
from .inference import (
    LoadedModel,
    answer_text,
    build_generation_config,
    generate_token_ids,
    prompt_ids,
    stop_token_ids,
)
from .templates import Message


@dataclass
class Completion:
    """A finished answer with OpenAI-style accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class Engine:
    """Serialised, capped generation over one loaded model."""

    def __init__(self, loaded: LoadedModel, preset: str = "greedy", defaults: dict[str, Any] | None = None,
                 max_new_tokens_cap: int = 512, max_prompt_tokens: int | None = None) -> None:
        self.loaded = loaded
        self.preset = preset
        self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens or max(16, context_window(loaded) - max_new_tokens_cap)
        self.lock = threading.Lock()

    def generation_config(self, **overrides: Any) -> Any:
        """Preset + server defaults + request overrides, with ``max_new_tokens`` clamped to the cap."""
        settings = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        config = build_generation_config(self.loaded, self.preset, **settings)
        config.max_new_tokens = max(1, min(config.max_new_tokens, self.max_new_tokens_cap))
        config.num_beams = 1  # answers are streamed
        return config

    def prompt(self, messages: list[Message], trim: bool) -> list[int]:
        """Prompt ids; too long a prompt is trimmed (chat page) or refused (API)."""
        if trim:
            return fit_history(self.loaded, messages, self.max_prompt_tokens)[0]
        ids = prompt_ids(self.loaded, messages)
        if len(ids) > self.max_prompt_tokens:
            raise UserError(f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}")
        return ids

    def stream(self, ids: list[int], config: Any) -> Iterator[str]:
        """Answer pieces as they come; waits for its turn if another request is generating."""
        with self.lock:
            yield from stream_generate(self.loaded, ids, config)

    def complete(self, messages: list[Message], trim: bool = False, **overrides: Any) -> Completion:
        """Whole answer to ``messages`` with token counts."""
        config = self.generation_config(**overrides)
        ids = self.prompt(messages, trim)
        with self.lock:
            [produced] = generate_token_ids(self.loaded, [ids], config, batch_size=1)
        stops = stop_token_ids(config)
        text = answer_text(self.loaded, produced, stops)
        stopped = bool(produced) and produced[-1] in stops
        reason = "stop" if stopped or len(produced) < config.max_new_tokens else "length"
        return Completion(text, len(ids), len(produced), reason)


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
