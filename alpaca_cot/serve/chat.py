"""Multi-turn chat sessions: history through the run's template, trimmed to fit, answers streamed.

Used by the console chat (``server.py``) and the web demo (``web.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..infer.generation import prompt_ids, stop_token_ids
from ..infer.loading import LoadedModel
from ..templates import Message

logger = logging.getLogger(__name__)


def context_window(loaded: LoadedModel, cap: int | None = None) -> int:
    """Tokens the model attends over (its ``max_position_embeddings``), optionally capped."""
    window = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
    return min(window, cap) if cap else window


def fit_history(loaded: LoadedModel, messages: list[Message], budget: int) -> tuple[list[int], int]:
    """Prompt ids for ``messages`` (ending with a user turn) within ``budget`` tokens.

    Whole exchanges are dropped oldest first; a single turn still too long keeps its end.
    Returns the ids and how many earlier messages were dropped.
    """
    dropped = 0
    while True:
        ids = prompt_ids(loaded, messages[dropped:])
        if len(ids) <= budget or len(messages) - dropped <= 1:
            return ids[-budget:], dropped
        dropped += 2  # one user turn and its answer


def answer_streamer(tokenizer: Any, stops: set[int]) -> Any:
    """A ``TextIteratorStreamer`` of the answer (not the prompt) that never prints a stop token: a family's end
    marker may be no special token to its tokenizer (ChatGLM3's ``<|user|>``), so skipping special tokens misses it."""
    import torch
    from transformers import TextIteratorStreamer

    class StopFreeStreamer(TextIteratorStreamer):
        def put(self, value: Any) -> None:
            if stops and (value.dim() == 1 or value.shape[0] == 1):  # larger batches: the base class refuses them
                value = value.reshape(-1)
                value = value[~torch.isin(value, torch.tensor(sorted(stops), dtype=value.dtype))]
            super().put(value)

    return StopFreeStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _stop_switch() -> Any:
    """A stopping criterion that ends generation once its ``stop`` event is set, keeping the ids seen last."""
    import torch
    from transformers import StoppingCriteria

    class StopSwitch(StoppingCriteria):
        def __init__(self) -> None:
            self.stop = threading.Event()
            self.last: Any = None

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.last = input_ids
            return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopSwitch()


def stream_generate(loaded: LoadedModel, ids: list[int], generation_config: Any,
                    produced: list[int] | None = None) -> Iterator[str]:
    """Yield the answer to prompt ``ids`` piece by piece as the model produces it.

    Closing the iterator early (a client that left) stops the generation within one token, so nothing keeps
    generating for nobody. ``produced``, when given, receives the answer's token ids once it is complete.
    """
    import torch
    from transformers import StoppingCriteriaList

    streamer = answer_streamer(loaded.tokenizer, stop_token_ids(generation_config))
    stopper = _stop_switch()
    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=generation_config, streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([stopper]))
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stopper.stop.set()  # a no-op after a complete answer
        worker.join()
    if errors:
        raise errors[0]
    if produced is not None and stopper.last is not None:
        produced.extend(stopper.last[0, len(ids):].tolist())


@dataclass
class ChatSession:
    """One conversation: history of finished turns, answered through the run's template."""

    loaded: LoadedModel
    generation_config: Any
    max_context: int | None = None
    history: list[Message] = field(default_factory=list)

    def clear(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    def stream_reply(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text`` given the history; the exchange joins the history at the end."""
        messages = [*self.history, Message("user", text)]
        budget = context_window(self.loaded, self.max_context) - self.generation_config.max_new_tokens
        ids, dropped = fit_history(self.loaded, messages, max(budget, 16))
        if dropped:
            logger.info("history trimmed: %d oldest messages no longer fit the context", dropped)
        pieces: list[str] = []
        for piece in stream_generate(self.loaded, ids, self.generation_config):
            if not pieces:
                piece = piece.lstrip()  # the template leaves the answer's leading space/newline to the model
                if not piece:
                    continue
            pieces.append(piece)
            yield piece
        self.history += [Message("user", text), Message("assistant", "".join(pieces).strip())]
