"""Templates render the SPEC's exact text; masking is checked token by token."""

import pytest

from alpaca_cot.data import IGNORE_INDEX, encode_segments, special_prefix_ids, tokenize_record
from alpaca_cot.templates import EOS, Message, get_template

ALPACA = get_template("alpaca")


def test_alpaca_prompt_without_input_is_exact():
    assert ALPACA.render_single("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:"
    )


def test_alpaca_prompt_with_input_is_exact():
    assert ALPACA.render_single("Add.", "1 and 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:"
    )


def test_multi_turn_masks_every_human_turn_and_learns_every_answer():
    messages = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"),
                Message("assistant", "see you")]
    segments = ALPACA.render(messages)
    learned = [s.text for s in segments if s.learn]
    masked = [s.text for s in segments if not s.learn]
    assert learned == ["hello", EOS, "see you", EOS]
    assert masked[0].endswith("### Human: hi\n### Assistant: ")
    assert masked[1] == "\n### Human: bye\n### Assistant: "
    assert all("hello" not in m and "see you" not in m for m in masked)


def test_prompt_for_generation_ends_at_the_assistant_turn():
    segments = ALPACA.render([Message("user", "hi"), Message("assistant", "hello"), Message("user", "again")])
    assert not segments[-1].learn and segments[-1].text.endswith("### Human: again\n### Assistant: ")


def test_single_turn_masking_token_by_token(tiny_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "1 and 2", "output": "The answer is 3."}
    prefix = special_prefix_ids(tiny_tokenizer)
    example = tokenize_record(record, tiny_tokenizer, ALPACA, cutoff_len=1024, prefix_ids=prefix)
    prompt_ids = tiny_tokenizer(ALPACA.render_single("Add the numbers.", "1 and 2"), add_special_tokens=False)[
        "input_ids"]
    answer_ids = tiny_tokenizer("The answer is 3.", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert prefix == [tiny_tokenizer.bos_token_id]
    assert example["input_ids"] == prefix + prompt_ids + answer_ids + [eos]
    assert example["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + answer_ids + [eos]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_eos_is_an_id_not_text(tiny_tokenizer):
    ids, labels = encode_segments(tiny_tokenizer, ALPACA.render([Message("user", "q"), Message("assistant", "a")]),
                                  [])
    assert ids[-1] == tiny_tokenizer.eos_token_id and labels[-1] == tiny_tokenizer.eos_token_id
    assert "</s>" not in tiny_tokenizer.decode(ids[:-1])


def test_multi_turn_record_labels_token_by_token(tiny_tokenizer):
    record = {"instruction": "Human: hi\nAssistant: hello\nHuman: bye", "input": "", "output": "ciao"}
    example = tokenize_record(record, tiny_tokenizer, ALPACA, cutoff_len=1024, prefix_ids=[])
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    eos = tiny_tokenizer.eos_token_id
    hello = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"]
    ciao = tiny_tokenizer("ciao", add_special_tokens=False)["input_ids"]
    assert learned == hello + [eos] + ciao + [eos]
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE_INDEX, token)


def test_truncation_at_cutoff_len(tiny_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "", "output": "The answer is 3."}
    example = tokenize_record(record, tiny_tokenizer, ALPACA, cutoff_len=10, prefix_ids=[1])
    assert len(example["input_ids"]) == len(example["labels"]) == 10


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _as_ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_chat_template_matches_apply_chat_template_and_masks_answers(tiny_tokenizer):
    from alpaca_cot.data import encode_conversation

    tokenizer = _chat_tokenizer(tiny_tokenizer)
    chat = get_template("chat")
    messages = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"),
                Message("assistant", "ciao")]
    ids, labels = encode_conversation(tokenizer, chat, messages, "", prefix_ids=[1])
    turns = [{"role": m.role, "content": m.content} for m in messages]
    assert ids == _as_ids(tokenizer.apply_chat_template(turns, tokenize=True))  # no extra BOS either
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert learned == "hello<|im_end|>\nciao<|im_end|>\n"
    prompt, _ = encode_conversation(tokenizer, chat, messages[:3], "", prefix_ids=[1])
    assert prompt == _as_ids(tokenizer.apply_chat_template(turns[:3], tokenize=True, add_generation_prompt=True))


def test_chat_template_needs_one(tiny_tokenizer):

    from alpaca_cot.errors import UserError

    with pytest.raises(UserError, match="has no chat template; use --template alpaca"):
        get_template("chat").render([Message("user", "q")], "", tiny_tokenizer)


# The remote-code families' own templates, on their real tokenizers against the official chat code:
# tests/remote/test_remote_tokenizers.py.


def test_chat_template_generation_stops_at_its_end_of_turn_token(tiny_tokenizer):
    tokenizer = _chat_tokenizer(tiny_tokenizer)
    stops = get_template("chat").stop_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stops) == ["</s>", "<|im_end|>"]
    assert get_template("chat").stop_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]  # no chat template
