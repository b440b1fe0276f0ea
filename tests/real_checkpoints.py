"""Tiny random-weight checkpoints of the real remote-code families, built from ``../shared/remote_code``.

Each is the upstream folder byte for byte (code, tokenizer, config) with the config shrunk by the folder's
``tiny_config_edits.json`` and random weights (normal, std 0.02) saved by the checkpoint's own model class, so a
test walks the path a user with the real checkpoint walks. Tests that need them skip when ``../shared`` is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REAL_CODE = Path(__file__).resolve().parent.parent.parent / "shared" / "remote_code"
REAL_FAMILIES = ("chatglm", "chatglm2", "chatglm3", "moss", "internlm", "internlm2", "baichuan", "baichuan2")
needs_real_code = pytest.mark.skipif(
    not REAL_CODE.is_dir(), reason="../shared/remote_code (real upstream code and tokenizers) is not present"
)
_NOT_COPIED = ("PROVENANCE.md", "tiny_config_edits.json", "reconstructed")


def copy_real_files(family: str, folder: Path) -> Path:
    """The upstream files of ``family`` in ``folder``, config shrunk: enough to load its tokenizer.

    MOSS's ``reconstructed/`` vocabulary files (no public copy exists) go next to its upstream files.
    """
    source = REAL_CODE / family
    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name not in _NOT_COPIED:
            shutil.copy(file, folder / file.name)
    for file in (source / "reconstructed").glob("*") if (source / "reconstructed").is_dir() else ():
        shutil.copy(file, folder / file.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    for key, value in json.loads((source / "tiny_config_edits.json").read_text(encoding="utf-8")).items():
        if value == "<removed>":
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build_real_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    """Copy the real files of ``family`` into ``folder`` and save random weights from its own model class
    (normal, std 0.02; norm weights 1, norm biases 0)."""
    import torch

    from alpaca_cot.models import FAMILIES
    from alpaca_cot.remote import remote_model_class

    copy_real_files(family, folder)
    shipped_config = (folder / "config.json").read_text(encoding="utf-8")
    cls = remote_model_class(str(folder), FAMILIES[family])
    config = cls.config_class.from_pretrained(folder)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and ("norm" in name or ".ln_" in name):
                # norms as a trained model has them: at std 0.02 each layer shrinks its input fifty-fold and the
                # tiny model's gradients vanish below what fp32 resolves at a loss of ~11
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.normal_(0.0, 0.02)  # some of these classes' own init leaves weights empty
    model.save_pretrained(folder)
    (folder / "config.json").write_text(shipped_config, encoding="utf-8")  # the config as the checkpoint ships it
    for code in folder.glob("*.py"):  # save_pretrained may rewrite code files: keep upstream's bytes
        shutil.copy(REAL_CODE / family / code.name, code)
    return folder


def adamw_losses(model, input_ids, attention_mask, steps: int = 5, lr: float = 1e-2, labels=None, **inputs) -> list:
    """The losses of ``steps`` AdamW steps of ``model``'s trainable weights on one batch (labels: the ids, pads
    masked, unless given); the model is left in training mode."""
    import torch

    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def own_code_model(folder, name: str):
    """``name``'s checkpoint in ``folder`` through its own (fixed) classes, fp32, in eval mode: the reference."""
    import torch

    from alpaca_cot.models import FAMILIES
    from alpaca_cot.remote import remote_model_class

    model_class = remote_model_class(str(folder), FAMILIES[name])
    return model_class.from_pretrained(str(folder), dtype=torch.float32).eval()


def loaded_model(folder, name: str):
    """``name``'s checkpoint in ``folder`` as every script loads it (native copy or fixed classes), fp32, eval."""
    import torch

    from alpaca_cot.models import FAMILIES, load_model

    return load_model(str(folder), FAMILIES[name], torch.float32, trust_remote_code=True).eval()
