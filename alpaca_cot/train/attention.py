"""Attention over packed rows (see ``alpaca_cot.data.packing`` for how rows are packed).

``PackedCollator`` pads rows and writes what keeps samples apart on every attention backend:
position ids that restart at 0 for each sample, and

- SDPA: a block-diagonal causal boolean mask of shape (batch, 1, L, L);
- eager (and any other backend that adds its mask to the scores): the same mask as 0 / -inf floats;
- flash / flex attention: no mask; the whole batch becomes one row whose position ids tell the
  varlen kernels where samples start (transformers derives ``cu_seqlens`` from them);
- ``sdpa_per_sample`` (what training picks on the CPU, see ``use_per_sample_attention``): the same
  single row, and one mask-free causal SDPA call per sample.

Position ids alone are not enough on SDPA/eager: transformers detects packing from position ids
only when no 2D mask and no cache is passed, so a plain training batch would attend across samples.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..data.encoding import IGNORE_INDEX
from ..data.packing import SEQ_LENS

PER_SAMPLE_ATTENTION = "sdpa_per_sample"


def packed_sample_lengths(position_ids: Any, tokens: int) -> list[int] | None:
    """Sample lengths of one flat packed row, read from its restarting position ids; None if it is not one."""
    if position_ids is None or tuple(position_ids.shape) != (1, tokens) or position_ids[0, 0].item() != 0:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [tokens]
    return [end - start for start, end in zip(starts[:-1], starts[1:])]


def per_sample_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                    scaling: float | None = None, position_ids: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """Attention of one flat packed row, computed sample by sample: causal SDPA within each, nothing across.

    An ``AttentionInterface`` function (query ``(1, heads, tokens, dim)``, output ``(1, tokens, heads, dim)``);
    samples start where the position ids restart at 0. On the CPU this beats one block-diagonal masked call
    over padded rows: each sample costs its own length squared instead of the row's, the causal kernel
    needs no mask, no padding is computed, and the inputs go to the kernel in fp32 because the CPU flash
    kernel's bf16 backward is slower than its fp32 one. Outside training (generation, evaluation) it is
    plain SDPA with the model's mask, which transformers builds block-diagonal from the same position ids.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if module.training and query.shape[0] == 1 and key.shape[2] == query.shape[2]:
        lengths = packed_sample_lengths(position_ids, query.shape[2])
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    grouped = key.shape[1] != query.shape[1]
    kernel_dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    # split, not slicing: its backward is one concatenation instead of a zero-filled copy per sample
    q, k, v = (t.to(kernel_dtype).split(lengths, dim=2) for t in (query, key, value))
    with torch.autocast(query.device.type, enabled=False):
        parts = [torch.nn.functional.scaled_dot_product_attention(
            q_part, k_part, v_part, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped
        ).transpose(1, 2) for q_part, k_part, v_part in zip(q, k, v)]
    return torch.cat(parts, dim=1).to(query.dtype), None


def use_per_sample_attention(model: Any) -> bool:
    """Switch an SDPA model to ``per_sample_sdpa`` for packed training; False when it cannot take it.

    Only models whose attention goes through transformers' ``AttentionInterface`` (every model
    transformers ships, not remote code) hand it the position ids.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(PER_SAMPLE_ATTENTION, per_sample_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_SAMPLE_ATTENTION, sdpa_mask)  # the fallback's masks
    model.set_attn_implementation(PER_SAMPLE_ATTENTION)
    return model.config._attn_implementation == PER_SAMPLE_ATTENTION


def _uses_single_row(attn_implementation: str) -> bool:
    """Backends that read sample boundaries from a single row's restarting position ids."""
    return ("flash" in attn_implementation or attn_implementation in ("flex_attention", PER_SAMPLE_ATTENTION))


class PackedCollator:
    """Collate packed rows (or plain samples) so that no token attends outside its own sample.

    ``attn_implementation`` is the model's ``config._attn_implementation``; it decides whether
    the boundaries travel as a 4D mask (sdpa: bool, eager: additive float) or as position ids
    of one flattened row (flash/flex varlen kernels, ``per_sample_sdpa``).
    """

    def __init__(self, pad_token_id: int, attn_implementation: str = "sdpa", pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation or "eager"
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: D102
        import torch

        rows = [(list(f["input_ids"]), list(f["labels"]), list(f.get(SEQ_LENS) or [len(f["input_ids"])]))
                for f in features]
        if _uses_single_row(self.attn_implementation):
            # One row, no padding at all: the kernel's cu_seqlens come from the restarting position ids.
            ids = [t for row in rows for t in row[0]]
            labels = [t for row in rows for t in row[1]]
            lens = [n for row in rows for n in row[2]]
            for start in itertools.accumulate(lens[:-1], initial=0):
                labels[start] = IGNORE_INDEX  # an unpacked sample's first token is never predicted either
            return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                    "position_ids": torch.tensor([[p for n in lens for p in range(n)]])}

        width = max(len(row[0]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        segment = torch.zeros((batch, width), dtype=torch.long)
        for b, (ids, row_labels, lens) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, :len(row_labels)] = torch.tensor(row_labels)
            start = 0
            for s, n in enumerate(lens + [width - len(ids)]):  # the padding tail is a segment of its own
                position_ids[b, start:start + n] = torch.arange(n)
                segment[b, start:start + n] = s
                start += n
        # Pad queries attend to earlier pads only: never a fully masked row, which would give NaN in SDPA.
        same = segment[:, :, None] == segment[:, None, :]
        allowed = (same & torch.ones(width, width, dtype=torch.bool).tril())[:, None]
        if self.attn_implementation == "sdpa":
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}
