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
    import pytest

    from alpaca_cot.errors import UserError

    with pytest.raises(UserError, match="has no chat template; use --template alpaca"):
        get_template("chat").render([Message("user", "q")], "", tiny_tokenizer)


# --- The remote-code families' own templates, on their fixture tokenizers (tests/fixtures/remote_code) ---

from alpaca_cot.models import FAMILIES, load_tokenizer, resolve_template  # noqa: E402
from alpaca_cot.templates import MOSS_META_INSTRUCTION  # noqa: E402
from tests.remote_checkpoints import copy_remote_code  # noqa: E402

TWO_EXCHANGES = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"),
                 Message("assistant", "ciao")]

# Hand-written from each family's chat code: the whole text and the learned answers (with their end marker).
# ChatGLM 1/2 and InternLM 1/2 write the conversation as one string: it is one tokenizer call, earlier answers
# learned where they lie in it (not ChatGLM-6B's: they sit in its bidirectional prefix). ChatGLM3 learns the
# answer's metadata line and the next <|user|>; Baichuan2 learns EOS where the next user token follows an answer
# (its fine-tune.py). The real tokenizers against the official code: tests/test_remote_tokenizers.py.
FAMILY_CONVERSATIONS = {
    "chatglm": ("[Round 0]\n问：hi\n答：hello\n[Round 1]\n问：bye\n答：[gMASK]<sop>ciao<eop>", ["ciao<eop>"]),
    "chatglm2": ("[gMASK]sop[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：bye\n\n答：ciao</s>",
                 ["hello", "ciao</s>"]),
    "chatglm3": ("[gMASK]sop<|user|>\nhi<|assistant|>\nhello<|user|>\nbye<|assistant|>\nciao</s>",
                 ["\nhello<|user|>", "\nciao</s>"]),
    "moss": (MOSS_META_INSTRUCTION
             + "<|Human|>: hi<eoh>\n<|MOSS|>: hello<eom>\n<|Human|>: bye<eoh>\n<|MOSS|>: ciao<eom>",
             [" hello<eom>", " ciao<eom>"]),
    "internlm": ("<s><|User|>:hi<eoh>\n<|Bot|>:hello<eoa>\n<|User|>:bye<eoh>\n<|Bot|>:ciao<eoa>",
                 ["hello<eoa>", "ciao<eoa>"]),
    "internlm2": ("<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                  "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|>",
                  ["hello<|im_end|>", "ciao<|im_end|>"]),
    "baichuan": ("<s><reserved_102>hi<reserved_103>hello</s><reserved_102>bye<reserved_103>ciao</s>",
                 ["hello</s>", "ciao</s>"]),
    "baichuan2": ("<reserved_106>hi<reserved_107>hello<reserved_106>bye<reserved_107>ciao</s>",
                  ["hello</s>", "ciao</s>"]),
}
LEARNED_AS_OTHER_TOKEN = {"baichuan2"}  # labels that are not the input token (EOS at the next user token)


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    return {name: load_tokenizer(str(copy_remote_code(name, tmp_path_factory.mktemp(f"tok-{name}-"))),
                                 FAMILIES[name], trust_remote_code=True)
            for name in FAMILY_CONVERSATIONS}


def _encode(name, tokenizer, messages, template_name=None):
    from alpaca_cot.data import encode_conversation, special_prefix_ids

    template = resolve_template(template_name or FAMILIES[name].own_template, FAMILIES[name])
    return encode_conversation(tokenizer, template, messages, "", special_prefix_ids(tokenizer))


def _learned_runs(tokenizer, ids, labels, same_tokens=True):
    """The learned labels, run by run, as text."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        assert label in (IGNORE_INDEX, token) or not same_tokens
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def test_every_remote_family_has_its_own_template_checked_here():
    assert {n for n, f in FAMILIES.items() if f.own_template} == set(FAMILY_CONVERSATIONS)


@pytest.mark.parametrize("name", sorted(FAMILY_CONVERSATIONS))
def test_family_template_text_and_masking_token_by_token(name, family_tokenizers):
    tokenizer = family_tokenizers[name]
    expected_text, expected_answers = FAMILY_CONVERSATIONS[name]
    ids, labels = _encode(name, tokenizer, TWO_EXCHANGES)
    assert tokenizer.decode(ids) == expected_text
    assert ids == tokenizer(expected_text, add_special_tokens=False)["input_ids"]  # special tokens are single ids
    assert _learned_runs(tokenizer, ids, labels, name not in LEARNED_AS_OTHER_TOKEN) == expected_answers
    # The generation prompt is exactly the training text up to the last answer.
    prompt, _ = _encode(name, tokenizer, TWO_EXCHANGES[:3])
    assert prompt == ids[:len(prompt)]
    answer_ids = tokenizer(expected_answers[-1], add_special_tokens=False)["input_ids"]
    assert ids[len(prompt):] == answer_ids


def test_baichuan2_single_turn_ids_by_hand(family_tokenizers):
    # Byte-level fixture vocabulary: 5 special tokens, then byte b has id 5 + b. <reserved_106> = 3, <reserved_107> = 4.
    tokenizer = family_tokenizers["baichuan2"]
    ids, labels = _encode("baichuan2", tokenizer, [Message("user", "hi"), Message("assistant", "ok")])
    assert ids == [3, 5 + ord("h"), 5 + ord("i"), 4, 5 + ord("o"), 5 + ord("k"), 2]
    assert labels == [IGNORE_INDEX] * 4 + [5 + ord("o"), 5 + ord("k"), 2]


def test_single_turn_record_with_input_in_a_family_template(family_tokenizers):
    tokenizer = family_tokenizers["internlm"]
    record = {"instruction": "Add.", "input": "1 and 2", "output": "3"}
    example = tokenize_record(record, tokenizer, resolve_template("internlm", FAMILIES["internlm"]), 1024,
                              special_prefix_ids(tokenizer))
    assert tokenizer.decode(example["input_ids"]) == "<s><|User|>:Add.\n1 and 2<eoh>\n<|Bot|>:3<eoa>"
    assert _learned_runs(tokenizer, example["input_ids"], example["labels"]) == ["3<eoa>"]


def test_chatglm6b_gets_gmask_sop_before_the_answer_in_alpaca_too(family_tokenizers):
    tokenizer = family_tokenizers["chatglm"]
    ids, labels = _encode("chatglm", tokenizer, [Message("user", "hi"), Message("assistant", "ok")], "alpaca")
    text = tokenizer.decode(ids)
    assert text.startswith("Below is an instruction") and text.endswith("### Response:[gMASK]<sop>ok<eop>")
    assert _learned_runs(tokenizer, ids, labels) == ["ok<eop>"]


def test_internlm2_template_matches_its_tokenizer_chat_template(family_tokenizers):
    tokenizer = family_tokenizers["internlm2"]
    turns = [{"role": m.role, "content": m.content} for m in TWO_EXCHANGES]
    ids, _ = _encode("internlm2", tokenizer, TWO_EXCHANGES)
    chat_ids = _as_ids(tokenizer.apply_chat_template(turns, tokenize=True))
    assert ids == chat_ids[:-1]  # the chat template adds the separator "\n" after the last <|im_end|> too
    prompt, _ = _encode("internlm2", tokenizer, TWO_EXCHANGES[:3])
    assert prompt == _as_ids(tokenizer.apply_chat_template(turns[:3], tokenize=True, add_generation_prompt=True))
    chat_prompt, _ = _encode("internlm2", tokenizer, TWO_EXCHANGES[:3], "chat")  # --template chat agrees
    assert chat_prompt == prompt


@pytest.mark.parametrize("name, stops", [("moss", ["<|endoftext|>", "<eom>"]), ("internlm", ["</s>", "<eoa>"]),
                                         ("chatglm3", ["</s>", "<|user|>", "<|observation|>"]),
                                         ("baichuan2", ["</s>", "<reserved_106>"]), ("chatglm", ["<eop>"])])
def test_generation_stops_at_the_templates_end_tokens(name, stops, family_tokenizers):
    tokenizer = family_tokenizers[name]
    template = resolve_template(FAMILIES[name].own_template, FAMILIES[name])
    assert tokenizer.convert_ids_to_tokens(template.stop_ids(tokenizer)) == stops


def test_chat_template_generation_stops_at_its_end_of_turn_token(tiny_tokenizer):
    tokenizer = _chat_tokenizer(tiny_tokenizer)
    stops = get_template("chat").stop_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stops) == ["</s>", "<|im_end|>"]
    assert get_template("chat").stop_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]  # no chat template
