"""Prompt templates: how a conversation becomes text, and which parts are learned.

A template renders a conversation into *segments*: pieces of text (or the EOS
marker) flagged as learned or masked. Tokenization turns each segment into ids,
so the prompt a model sees at generation time is token-for-token the prompt it
was trained on. Add a template by adding a row to ``TEMPLATES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import UserError, unknown_name
from .registry import build_registry

Role = Literal["user", "assistant"]
EOS = object()  # marker segment: the tokenizer's EOS *id* (the original appended "</s>" as text)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    """A rendered piece: text (or ``EOS``) and whether the loss learns it."""

    text: str | object
    learn: bool


@dataclass(frozen=True)
class Template:
    """A prompt format for single-turn records and multi-turn conversations."""

    name: str
    header: str  # single-turn, no input
    header_with_input: str  # single-turn, with input
    single_turn: str  # format with {instruction}
    single_turn_with_input: str  # format with {instruction} and {input}
    chat_header: str  # multi-turn
    user_turn: str  # format with {content}; ends where the assistant's answer starts
    turn_separator: str  # after each assistant answer's EOS

    def render_single(self, instruction: str, input_text: str = "") -> str:
        """The prompt of a single-turn record (everything before the response)."""
        if input_text:
            return self.header_with_input + self.single_turn_with_input.format(
                instruction=instruction, input=input_text
            )
        return self.header + self.single_turn.format(instruction=instruction)

    text_has_special_tokens = False  # the tokenizer's own prefix (e.g. BOS) goes first

    def render(self, messages: list[Message], input_text: str = "", tokenizer: Any = None) -> list[Segment]:
        """Segments of a conversation; the last message may be a user turn (a prompt to answer).

        A conversation of one user turn (and its answer) uses the single-turn form,
        with ``input_text`` as the record's input; longer ones use the chat form,
        where every assistant answer is learned and every user turn masked.
        """
        if not messages or messages[0].role != "user":
            raise ValueError("a conversation starts with a user turn")
        segments: list[Segment] = []
        if len(messages) <= 2:
            segments.append(Segment(self.render_single(messages[0].content, input_text), learn=False))
            if len(messages) == 2:
                segments += [Segment(messages[1].content, learn=True), Segment(EOS, learn=True)]
            return segments
        prompt = self.chat_header
        for message in messages:
            if message.role == "user":
                prompt += self.user_turn.format(content=message.content)
            else:
                segments += [Segment(prompt, learn=False), Segment(message.content, learn=True),
                             Segment(EOS, learn=True)]
                prompt = self.turn_separator
        if messages[-1].role == "user":
            segments.append(Segment(prompt, learn=False))
        return segments



@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``), turn by turn.

    Each assistant turn is the text the template adds after the generation prompt (its
    end-of-turn marker included), so masking follows whatever format the model ships.
    """

    name: str
    text_has_special_tokens = True  # the template writes BOS/role markers itself

    def render(self, messages: list[Message], input_text: str = "", tokenizer: Any = None) -> list[Segment]:
        """Segments of a conversation rendered by the tokenizer's chat template."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("--template chat: this tokenizer has no chat template; use --template alpaca")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if input_text and turns:
            turns[0] = {"role": "user", "content": f"{turns[0]['content']}\n\n{input_text}"}

        def text(upto: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(turns[:upto], tokenize=False, add_generation_prompt=generation_prompt)

        segments: list[Segment] = []
        done = ""
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prompt, full = text(index, True), text(index + 1, False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError("--template chat: the tokenizer's chat template does not extend turn by turn, "
                                "so answers cannot be masked; use --template alpaca")
            segments += [Segment(prompt[len(done):], learn=False), Segment(full[len(prompt):], learn=True)]
            done = full
        if turns[-1]["role"] == "user":
            prompt = text(len(turns), True)
            segments.append(Segment(prompt[len(done):], learn=False))
        return segments


TEMPLATES: dict[str, Template | ChatTemplate] = build_registry(
    "template",
    Template(
        name="alpaca",
        header=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
        header_with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
        ),
        single_turn="### Instruction:\n{instruction}\n\n### Response:",
        single_turn_with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        chat_header=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.\n"
        ),
        user_turn="### Human: {content}\n### Assistant: ",
        turn_separator="\n",
    ),
    ChatTemplate(name="chat"),
)


def get_template(name: str) -> Template | ChatTemplate:
    """Return the template for ``--template name``."""
    if name not in TEMPLATES:
        raise unknown_name("template", name, TEMPLATES, "--template")
    return TEMPLATES[name]
