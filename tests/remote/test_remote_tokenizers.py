"""The 8 real remote-code tokenizers under transformers 5, and each family's own template against its official code.

The tokenizers are the checkpoints' own files (``../shared/remote_code``), loaded as a user loads them
(``load_tokenizer`` with the named in-memory fixes of ``alpaca_cot.remote.tokenizers``). The official prompt
builders are the upstream functions themselves, compiled from the real files on their own (their modelling
modules need weights and import more than a tokenizer test should), bound to a stand-in ``self`` that carries
the checkpoint's own config / generation config, and compared with our one encoding path id for id.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple  # noqa: UP035 - the names the upstream functions are written with

import pytest

from alpaca_cot.data import IGNORE_INDEX, encode_conversation, special_prefix_ids, tokenize_batch, tokenize_record
from alpaca_cot.models import FAMILIES, load_tokenizer, resolve_template
from alpaca_cot.remote.fixes import apply_fixes
from alpaca_cot.remote.tokenizers import TOKENIZER_FIXES, TOKENIZER_IMPORT_FIXES
from alpaca_cot.templates import EOS, MOSS_META_INSTRUCTION, Message, SpecialToken, get_template
from tests.real_checkpoints import REAL_CODE, REAL_FAMILIES, copy_real_files, needs_real_code

pytestmark = needs_real_code

# Ids of ROUND_TRIP_TEXT (with the tokenizer's own special tokens) from the same files under transformers 4.33
# (4.38 for InternLM2, whose slow tokenizer needs >= 4.34): the versions these checkpoints were written for.
ROUND_TRIP_TEXT = "你好世界! Hello  world\n第二行 mixed 中英文 text 123"
IDS_UNDER_TRANSFORMERS_4 = {
    "chatglm": [5, 74874, 64097, 35, 19316, 130009, 4664, 4, 64866, 64027, 2952, 5, 107968, 739, 5, 9, 10, 13,
                130001, 130004],
    "chatglm2": [64790, 64792, 36474, 54591, 31661, 30992, 13755, 265, 8515, 13, 31736, 54560, 7332, 34001, 33408,
                 2254, 30910, 30939, 30943, 30966],
    "chatglm3": [64790, 64792, 36474, 54591, 31661, 30992, 13755, 265, 8515, 13, 31736, 54560, 7332, 34001, 33408,
                 2254, 30910, 30939, 30943, 30966],
    "moss": [60237, 51113, 0, 18435, 106058, 6894, 198, 51138, 50327, 7668, 60074, 54425, 2420, 17031],
    "internlm": [1, 76379, 67488, 346, 22190, 387, 14748, 364, 67483, 60408, 9649, 262, 60363, 68579, 1614, 262,
                 4575],
    "internlm2": [1, 77230, 68339, 346, 22190, 387, 14748, 364, 68334, 60412, 9649, 262, 60366, 69430, 1614, 262,
                  4575],
    "baichuan": [9875, 31213, 2781, 80, 24568, 31106, 1275, 5, 3268, 31205, 8682, 13170, 15215, 3023, 31106, 53, 54,
                 55],
    "baichuan2": [16829, 2089, 73, 52594, 92311, 2063, 5, 2382, 92406, 13098, 100081, 10286, 4493, 92311, 92336,
                  92338, 92354],
}

# A two-exchange conversation in mixed Chinese and English, with a newline, code and digits.
U1, A1 = "你好！Please introduce yourself in 2 sentences.", "我是一个AI助手。I can help with math: 3 + 4 = 7.\n第二行"
U2, A2 = "用Python写一个hello world", "print('hello world')  # 打印"
# Answers whose first characters merge with the prompt's last ones when the whole string is encoded at once
AWKWARD_ANSWERS = (":) ok", "\n换行开头", "  两个空格", "**粗体**", "。句号")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {name: load_tokenizer(str(copy_real_files(name, tmp_path_factory.mktemp(name))), FAMILIES[name],
                                 trust_remote_code=True)
            for name in REAL_FAMILIES}


def _config(name: str, file: str = "config.json") -> dict:
    return json.loads((REAL_CODE / name / file).read_text(encoding="utf-8"))


def official(name: str, file: str, qualified_name: str, **names):
    """The upstream function ``qualified_name`` ("Class.method" or "function") of the real ``file``, compiled on
    its own with the typing names, torch and ``names`` as its globals."""
    import torch

    path = REAL_CODE / name / file
    body = ast.parse(path.read_text(encoding="utf-8")).body
    for part in qualified_name.split("."):
        node = next(item for item in body if getattr(item, "name", None) == part)
        body = getattr(node, "body", [])
    namespace = {"torch": torch, "List": List, "Tuple": Tuple, "Dict": Dict, "Optional": Optional,  # noqa: UP006
                 **names}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace[node.name]


class GenerateSpy:
    """Stands in for ``model.generate``: records its arguments and generates nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids=None, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        return input_ids


def _stand_in_model(name: str, **attributes):
    return types.SimpleNamespace(device="cpu", config=types.SimpleNamespace(**_config(name)),
                                 generation_config=types.SimpleNamespace(**_config(name, "generation_config.json"))
                                 if (REAL_CODE / name / "generation_config.json").is_file() else None, **attributes)


def official_prompt(name: str, tokenizer, query: str, history: list[tuple[str, str]]) -> list[int]:
    """The prompt ids the checkpoint's own chat code builds for ``query`` after ``history``."""
    if name == "chatglm":  # chat() writes the prompt inline: run it with generate recorded
        chat = official(name, "modeling_chatglm.py", "ChatGLMForConditionalGeneration.chat",
                        LogitsProcessorList=list, InvalidScoreLogitsProcessor=lambda: None)
        spy = GenerateSpy()
        chat(_stand_in_model(name, generate=spy, process_response=lambda text: text), tokenizer, query, history)
        return spy.calls[0]["input_ids"][0].tolist()
    if name == "chatglm3":
        turns = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
        return tokenizer.build_chat_input(query, history=turns)["input_ids"][0].tolist()
    if name in ("chatglm2", "internlm", "internlm2"):
        owner = {"chatglm2": "ChatGLMForConditionalGeneration", "internlm": "InternLMForCausalLM",
                 "internlm2": "InternLM2ForCausalLM"}[name]
        file = "modeling_chatglm.py" if name == "chatglm2" else f"modeling_{name}.py"
        build_inputs = official(name, file, f"{owner}.build_inputs")
        return build_inputs(_stand_in_model(name), tokenizer, query, history)["input_ids"][0].tolist()
    if name in ("baichuan", "baichuan2"):
        build = (official(name, "modeling_baichuan.py", "BaichuanForCausalLM._build_chat_input") if name == "baichuan"
                 else official(name, "generation_utils.py", "build_chat_input"))
        messages = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"),
                                                                                                   pair)]
        return build(_stand_in_model(name), tokenizer, [*messages, {"role": "user", "content": query}])[0].tolist()
    # MOSS ships no chat code: its README's format, the prompt and then each answer as MOSS writes it (" text<eom>")
    text = MOSS_META_INSTRUCTION + "".join(f"<|Human|>: {q}<eoh>\n<|MOSS|>: {a}<eom>\n" for q, a in history)
    return tokenizer(text + f"<|Human|>: {query}<eoh>\n<|MOSS|>:")["input_ids"]


def _ours(name: str, tokenizer, turns: list[str]) -> tuple[list[int], list[int]]:
    messages = [Message("user" if index % 2 == 0 else "assistant", text) for index, text in enumerate(turns)]
    template = resolve_template(FAMILIES[name].own_template, FAMILIES[name])
    return encode_conversation(tokenizer, template, messages, "", special_prefix_ids(tokenizer))


def _learned(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of learned labels."""
    runs, current = [], []
    for label in labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- 1. The tokenizers load, encode and decode as under the transformers they were written for -------------------


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_real_tokenizer_ids_are_those_of_transformers_4_and_decode_back(name, tokenizers):
    tokenizer = tokenizers[name]
    assert tokenizer(ROUND_TRIP_TEXT)["input_ids"] == IDS_UNDER_TRANSFORMERS_4[name]
    assert tokenizer.decode(_encode(tokenizer, ROUND_TRIP_TEXT)) == ROUND_TRIP_TEXT
    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    if name != "chatglm3":  # ChatGLM3 registers no special tokens: its [gMASK]sop decode as text
        assert tokenizer.decode(ids, skip_special_tokens=True) == ROUND_TRIP_TEXT


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_special_and_template_ids_lie_in_the_models_vocabulary(name, tokenizers):
    tokenizer = tokenizers[name]
    config = _config(name)
    rows = config.get("padded_vocab_size") or config["vocab_size"]
    template = get_template(FAMILIES[name].own_template)
    names = {*getattr(template, "special_tokens", ()), *(n for n in (template.answer_end,) if n)}
    template_ids = [tokenizer.convert_tokens_to_ids(token) for token in names]
    ids = [*tokenizer.all_special_ids, *template_ids, *template.stop_ids(tokenizer), tokenizer.pad_token_id,
           *IDS_UNDER_TRANSFORMERS_4[name]]
    assert all(isinstance(i, int) and 0 <= i < rows for i in ids), (ids, rows)


def test_internlm2_loads_its_slow_tokenizer_with_the_chat_tokens_at_their_ids(tokenizers):
    tokenizer = tokenizers["internlm2"]
    assert type(tokenizer).__name__ == "InternLM2Tokenizer"  # the fast one maps <|im_end|> to 92548
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [92543, 92542]
    assert _encode(tokenizer, "<|im_start|>user\n") == [92543, 1008, 364]


def test_moss_special_tokens_are_its_own_not_their_dicts_text(tokenizers):
    tokenizer = tokenizers["moss"]
    assert sorted(tokenizer.all_special_ids) == [106028, 106067, 106068, 106069, 106070, 106071]
    assert tokenizer.eos_token_id == 106068 and _encode(tokenizer, "a<eoh>\n") == [64, 106067, 198]
    assert tokenizer.decode([64, 106058, 65, 106068]) == "a  b<eom>"  # added tokens decode as their text


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_saved_tokenizer_loads_back_with_the_same_ids(name, tokenizers, tmp_path):
    tokenizer = tokenizers[name]
    tokenizer.save_pretrained(tmp_path)  # what a run folder holds: the code file comes along
    again = load_tokenizer(str(tmp_path), FAMILIES[name], trust_remote_code=True)
    text = f"{U1}\n{A1}"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    for attribute in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(again, attribute) == getattr(tokenizer, attribute), attribute
    template = resolve_template(FAMILIES[name].own_template, FAMILIES[name])
    assert template.stop_ids(again) == template.stop_ids(tokenizer)


@pytest.mark.parametrize("name", ["chatglm", "chatglm2", "chatglm3"])
def test_glm_tokenizers_pad_right_for_training_and_left_for_generation(name, tokenizers):
    from transformers import DataCollatorForSeq2Seq

    tokenizer, pad = tokenizers[name], tokenizers[name].pad_token_id
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
                {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    for side, row in (("right", [8, pad, pad]), ("left", [pad, pad, 8])):
        tokenizer.padding_side = side
        batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
            [dict(feature) for feature in features])
        assert batch["input_ids"].tolist() == [[5, 6, 7], row]
        assert batch["attention_mask"].tolist()[1] == [1 if token == 8 else 0 for token in row]
        assert batch["labels"].tolist()[1] == [8 if token == 8 else IGNORE_INDEX for token in row]
    tokenizer.padding_side = "right"
    left = tokenizer(["你好", "hello world there"], padding=True, padding_side="left")["input_ids"]
    assert left[0][0] == pad and left[1][0] != pad


# --- each fix cures a defect the real class has, and leaves other tokenizers alone ----------------------------------


def _fresh_upstream_class(name: str, folder: Path):
    """The checkpoint's tokenizer class from a fresh import of its file (no fix applied yet)."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    module_name, class_name = config["auto_map"]["AutoTokenizer"][0].split(".")
    spec = importlib.util.spec_from_file_location(f"fresh_{name}_{module_name}", folder / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, class_name)


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_every_tokenizer_fix_is_present_in_the_real_class_and_cured(name, tmp_path, tokenizers):
    support = FAMILIES[name].remote_support
    apply_fixes(TOKENIZER_IMPORT_FIXES.get(support, ()))
    cls = _fresh_upstream_class(name, copy_real_files(name, tmp_path))
    fixes = TOKENIZER_FIXES.get(support, ())
    if name == "chatglm2":  # build_chat_input (and its batch_encode_plus) came with ChatGLM3
        fixes = tuple(fix for fix in fixes if "build_chat_input" not in fix.defect)
    assert all(fix.present(cls) for fix in fixes), [fix.defect for fix in fixes if not fix.present(cls)]
    assert apply_fixes(fixes, cls) == [fix.defect for fix in fixes]
    assert cls.from_pretrained(tmp_path)(ROUND_TRIP_TEXT)["input_ids"] == IDS_UNDER_TRANSFORMERS_4[name]


def test_tokenizer_fixes_leave_tokenizers_without_the_defects_alone():
    from transformers import PreTrainedTokenizer

    class Sound(PreTrainedTokenizer):  # loads its vocabulary first, pads either side, decodes added tokens
        def __init__(self, vocab_file=None, **kwargs):
            self.sp_model = self.sp_tokenizer = self.encoder = {}
            super().__init__(**kwargs)

    defects = [fix.defect for fixes in TOKENIZER_FIXES.values() for fix in fixes
               if fix.present(Sound) and "save_pretrained" not in fix.defect and "dicts" not in fix.defect]
    assert defects == []


# --- 2. Each family's template = its official chat code, id for id ----------------------------------------------


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_family_prompt_is_the_official_one_for_one_turn_and_with_history(name, tokenizers):
    tokenizer = tokenizers[name]
    assert _ours(name, tokenizer, [U1])[0] == official_prompt(name, tokenizer, U1, [])
    assert _ours(name, tokenizer, [U1, A1, U2])[0] == official_prompt(name, tokenizer, U2, [(U1, A1)])
    for answer in AWKWARD_ANSWERS:  # where encoding the turns apart would differ from the official single string
        assert _ours(name, tokenizer, [U1, answer, U2])[0] == official_prompt(name, tokenizer, U2, [(U1, answer)])


def test_chatglm3_one_turn_is_the_documented_official_prompt(tokenizers):
    assert _ours("chatglm3", tokenizers["chatglm3"], ["你好"])[0] == [64790, 64792, 64795, 30910, 13, 36474, 54591,
                                                                        64796]


def _answer_ids(name: str, tokenizer, answer: str) -> list[int]:
    """How the official fine-tuning code encodes an answer and its end marker."""
    if name == "chatglm3":  # build_single_message("assistant", "", answer) after the <|assistant|> of the prompt
        return tokenizer.build_single_message("assistant", "", answer)[1:] + [tokenizer.eos_token_id]
    if name == "moss":
        return _encode(tokenizer, f" {answer}<eom>")
    end = {"chatglm": "<eop>", "internlm": "<eoa>", "internlm2": "<|im_end|>"}.get(name)
    return _encode(tokenizer, answer) + [tokenizer.convert_tokens_to_ids(end) if end else tokenizer.eos_token_id]


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_training_example_is_the_official_prompt_then_the_answer_and_its_end(name, tokenizers):
    tokenizer = tokenizers[name]
    ids, labels = _ours(name, tokenizer, [U1, A1, U2, A2])
    prompt = official_prompt(name, tokenizer, U2, [(U1, A1)])
    answer = _answer_ids(name, tokenizer, A2)
    assert ids == prompt + answer
    assert _learned(ids, labels)[-1] == answer


def test_chatglm_training_matches_its_tokenizers_own_pair_builders(tokenizers):
    # build_inputs_with_special_tokens(prompt ids, answer ids): the input of the official ptuning code
    for name, prompt in (("chatglm", U1), ("chatglm2", f"[Round 1]\n\n问：{U1}\n\n答：")):
        tokenizer = tokenizers[name]
        ids, labels = _ours(name, tokenizer, [U1, A1])
        answer = _encode(tokenizer, A1)
        assert ids == tokenizer.build_inputs_with_special_tokens(_encode(tokenizer, prompt), answer)
        assert _learned(ids, labels) == [answer + [tokenizer.eos_token_id]]


@pytest.mark.parametrize("name, earlier_answers_learned", [
    ("chatglm", []),  # its earlier answers sit in the bidirectional prefix, before [gMASK]<sop>
    ("chatglm2", [A1]), ("internlm", [A1 + "<eoa>"]), ("internlm2", [A1 + "<|im_end|>"]),
    ("moss", [" " + A1 + "<eom>"]), ("baichuan", [A1 + "</s>"]),
])
def test_earlier_answers_are_learned_with_their_end_marker(name, earlier_answers_learned, tokenizers):
    tokenizer = tokenizers[name]
    ids, labels = _ours(name, tokenizer, [U1, A1, U2, A2])
    learned = [tokenizer.decode(run).strip() for run in _learned(ids, labels)[:-1]]  # Baichuan decodes " 我..."
    assert learned == [answer.strip() for answer in earlier_answers_learned]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_chatglm3_learns_the_metadata_line_and_the_next_user_token_as_its_finetuning_code(tokenizers):
    tokenizer = tokenizers["chatglm3"]
    ids, labels = _ours("chatglm3", tokenizer, [U1, A1, U2, A2])
    user = tokenizer.get_command("<|user|>")
    first = tokenizer.build_single_message("assistant", "", A1)[1:] + [user]  # "\n", the answer, then <|user|>
    assert _learned(ids, labels) == [first, _answer_ids("chatglm3", tokenizer, A2)]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_baichuan2_learns_eos_where_the_next_user_token_follows_an_answer(tokenizers):
    tokenizer = tokenizers["baichuan2"]
    ids, labels = _ours("baichuan2", tokenizer, [U1, A1, U2, A2])
    user, eos = 195, tokenizer.eos_token_id
    second_user = ids.index(user, 1)
    assert ids[second_user - len(_encode(tokenizer, A1)):second_user] == _encode(tokenizer, A1)
    assert labels[second_user] == eos  # fine-tune.py: labels += [eos] + [ignore] * len(user text) for a user turn
    assert _learned(ids, labels) == [_encode(tokenizer, A1) + [eos], _encode(tokenizer, A2) + [eos]]


def test_single_turn_input_follows_the_instruction_on_a_new_line(tokenizers):
    tokenizer = tokenizers["chatglm3"]
    ids, _ = encode_conversation(tokenizer, get_template("chatglm3"), [Message("user", "翻译")], "hello",
                                 special_prefix_ids(tokenizer))
    assert ids == official_prompt("chatglm3", tokenizer, "翻译\nhello", [])


def test_internlm2_template_agrees_with_its_tokenizers_chat_template(tokenizers):
    tokenizer = tokenizers["internlm2"]
    turns = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    chat_ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    assert _ours("internlm2", tokenizer, [U1, A1, U2])[0] == chat_ids


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_batched_tokenization_equals_record_by_record(name, tokenizers):
    tokenizer = tokenizers[name]
    template = resolve_template(FAMILIES[name].own_template, FAMILIES[name])
    records = [{"instruction": U1, "input": "", "output": A1, "conversation": []},
               {"instruction": "", "input": "", "output": "", "conversation": [
                   {"role": "user", "content": U1}, {"role": "assistant", "content": AWKWARD_ANSWERS[0]},
                   {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]}]
    prefix = special_prefix_ids(tokenizer)
    batch = {key: [record[key] for record in records] for key in records[0]}
    batched = tokenize_batch(batch, tokenizer, template, 4096, prefix)
    for index, record in enumerate(records):
        single = tokenize_record(record, tokenizer, template, 4096, prefix)
        assert {key: batched[key][index] for key in single} == single


# --- 3. Generation stops where the official code stops ----------------------------------------------------------


def _official_chat_stop_ids(name: str, tokenizer) -> list[int]:
    """The eos_token_id list the official chat() hands generate (ChatGLM3, InternLM2)."""
    spy = GenerateSpy()
    if name == "chatglm3":
        chat = official(name, "modeling_chatglm.py", "ChatGLMForConditionalGeneration.chat",
                        LogitsProcessorList=list, InvalidScoreLogitsProcessor=lambda: None)
        model = _stand_in_model(name, generate=spy, process_response=lambda response, history: (response, history))
        chat(model, tokenizer, "你好")
    else:
        build_inputs = official(name, "modeling_internlm2.py", "InternLM2ForCausalLM.build_inputs")
        chat = official(name, "modeling_internlm2.py", "InternLM2ForCausalLM.chat", BaseStreamer=object)
        model = _stand_in_model(name, generate=spy)
        model.build_inputs = types.MethodType(build_inputs, model)
        chat(model, tokenizer, "你好")
    return list(spy.calls[0]["eos_token_id"])


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_generation_stops_at_the_official_end_markers(name, tokenizers):
    tokenizer = tokenizers[name]
    stops = get_template(FAMILIES[name].own_template).stop_ids(tokenizer)
    if name in ("chatglm3", "internlm2"):
        expected = _official_chat_stop_ids(name, tokenizer)  # [EOS, <|user|>, <|observation|>]; [EOS, <|im_end|>]
    elif name in ("baichuan", "baichuan2"):  # generation config's EOS; and the next user token
        generation = _config(name, "generation_config.json")
        expected = [generation["eos_token_id"], generation["user_token_id"]]
    elif name == "internlm":  # generation config's EOS; chat() cuts the answer at <eoa>
        expected = [_config(name, "generation_config.json")["eos_token_id"], tokenizer.convert_tokens_to_ids("<eoa>")]
    else:  # ChatGLM-6B <eop>, ChatGLM2 </s>, MOSS <eom>: the config's EOS
        expected = [_config(name)["eos_token_id"]]
    assert stops == expected
    assert tokenizer.eos_token_id == stops[0]


def test_special_tokens_are_single_ids_not_text(tokenizers):
    tokenizer = tokenizers["chatglm3"]
    assert _encode(tokenizer, "<|user|>") == [906, 31007, 4865, 31007, 30994]  # as text: five ordinary pieces
    segments = get_template("chatglm3").render([Message("user", "你好")])
    assert segments[0].text == SpecialToken("<|user|>") and segments[-1].text == SpecialToken("<|assistant|>")
    assert get_template("baichuan").render([Message("user", "q"), Message("assistant", "a")])[-1].text is EOS


def test_templates_pickle_and_repr_stably_for_tokenizing_workers_and_data_caches():
    import pickle

    template = get_template("baichuan2")  # holds the EOS marker as a field
    assert pickle.loads(pickle.dumps(template)) == template and pickle.loads(pickle.dumps(EOS)) is EOS
    assert "object at 0x" not in repr(template)  # the data cache key is repr(template)


def test_chatglm6b_answers_follow_gmask_sop_in_the_alpaca_template_too(tokenizers):
    """ChatGLM-6B finds where the answer starts by [gMASK]<sop>: its row puts them before every answer."""
    tokenizer = tokenizers["chatglm"]
    template = resolve_template("alpaca", FAMILIES["chatglm"])
    ids, labels = encode_conversation(tokenizer, template, [Message("user", "hi"), Message("assistant", "ok")], "",
                                      special_prefix_ids(tokenizer))
    gmask, sop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    answer = ids.index(sop) + 1
    assert ids[answer - 2:answer] == [gmask, sop] and ids.count(gmask) == 1
    assert all(label == IGNORE_INDEX for label in labels[:answer])
    assert labels[answer:] == ids[answer:] and ids[-1] == tokenizer.convert_tokens_to_ids("<eop>")


def test_answers_never_print_an_end_marker_that_is_no_special_token(tokenizers):
    """ChatGLM3 stops at <|user|> (64795), which its tokenizer does not skip as special: whole and streamed
    answers leave it out."""
    import torch

    from alpaca_cot.infer.generation import answer_text
    from alpaca_cot.infer.loading import LoadedModel
    from alpaca_cot.serve.chat import answer_streamer

    tokenizer = tokenizers["chatglm3"]
    stops = set(resolve_template("chatglm3", FAMILIES["chatglm3"]).stop_ids(tokenizer))
    answer = tokenizer("你好", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(answer + [64795], skip_special_tokens=True).endswith("<|user|>")  # the defect
    loaded = LoadedModel(None, tokenizer, FAMILIES["chatglm3"], None, "")
    assert answer_text(loaded, answer + [64795], stops) == "你好"
    streamer = answer_streamer(tokenizer, stops)
    streamer.put(torch.tensor([[64790, 64792, 64795]]))  # the prompt: skipped
    for token in [*answer, 64795]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(streamer).strip() == "你好"
