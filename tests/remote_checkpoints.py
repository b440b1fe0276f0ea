"""Tiny local checkpoints of the remote-code families, built from ``tests/fixtures/remote_code``."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "remote_code"
SHARED_CODE = ("tiny_lm.py", "byte_tokenizer.py")
BORROWED_CODE = {"chatglm3": "chatglm2/modeling_chatglm.py", "baichuan2": "baichuan/modeling_baichuan.py"}
REMOTE_FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def copy_remote_code(family: str, folder: Path) -> Path:
    """The family's fixture files (configs and code) in ``folder``: enough to load its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [*(FIXTURES / family).iterdir(), *(FIXTURES / name for name in SHARED_CODE)]
    if family in BORROWED_CODE:
        sources.append(FIXTURES / BORROWED_CODE[family])
    for source in sources:
        shutil.copy(source, folder / source.name)
    return folder


def build_remote_checkpoint(family: str, folder: Path) -> Path:
    """Copy the family's fixture files into ``folder`` and save random weights for its config; returns folder."""
    import torch
    import transformers

    copy_remote_code(family, folder)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    loader = getattr(transformers, "AutoModel" if "AutoModelForCausalLM" not in config.auto_map
                     else "AutoModelForCausalLM")
    torch.manual_seed(0)
    loader.from_config(config, trust_remote_code=True).save_pretrained(folder)
    shutil.copy(FIXTURES / family / "config.json", folder / "config.json")  # the real-looking config, as shipped
    return folder
