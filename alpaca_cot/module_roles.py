"""Where a model's attention and feed-forward layers are, found from its own module structure.

The generic family row (any causal LM that transformers loads natively and no row claims) cannot name
its adapter targets in advance; its target fields name *roles* instead (``ROLES``), and
``find_module_roles`` turns each role into PEFT target names from the loaded model:

- the decoder layers: the longest ``ModuleList`` of the decoder whose layers hold an attention module;
- in every layer, the attention module is the child whose class name says attention; the feed-forward
  layers are those of the children named or typed as an MLP / MoE / feed-forward block, plus Linear
  layers held by the decoder layer itself (OPT's fc1, fc2);
- each block's output projection writes the residual stream: of its layers with ``out == hidden`` the only
  one, else the last registered (q and o are both hidden x hidden in most attention modules; every
  transformers attention registers o last, Phi-3 registers it first but its fused qkv is wider), none
  if no layer writes it;
- mixture-of-experts routers (a ``gate``/``*_gate``/``router`` module) and per-expert layers (inside a
  numbered ``ModuleList``) are never default targets; fused experts are Parameters, not layers, and so
  are not seen at all.

A target is written as the shortest module-name suffix that matches exactly the modules of its role (PEFT
matches ``name == target`` or ``name.endswith("." + target)``): ``q_proj`` where it is unique, ``attn.c_proj``
for GPT-2, whose MLP has a ``c_proj`` too; full module names when no suffix is exact (a vision tower with the
same names).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

ROLES = ("attention", "attention_inputs", "attention_output",
         "feedforward", "feedforward_inputs", "feedforward_output")
_FEEDFORWARD = re.compile(r"mlp|moe|feed_?forward|ffn|expert", re.IGNORECASE)
_ROUTER = re.compile(r"(.*_)?gate|.*router.*")


def adaptable_shape(module: Any, linear_only: bool = False) -> tuple[int, int] | None:
    """``(in, out)`` features of a layer an adapter can wrap (``nn.Linear``, 4/8-bit included, or transformers'
    ``Conv1D`` unless ``linear_only``), else None."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D) and not linear_only:
        return module.nx, module.nf
    return None


def adaptable_layer_names(model: Any, linear_only: bool = False) -> list[str]:
    """Short names of the layers of ``model`` an adapter can wrap (what --lora_target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if adaptable_shape(module, linear_only)})


def _is_attention(module: Any) -> bool:
    return "attention" in type(module).__name__.lower()


def decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """``(full name, layer)`` of every decoder layer: the longest list of layers holding attention modules."""
    import torch

    try:  # the language model of a multimodal checkpoint, not its vision tower
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    names = {id(module): name for name, module in model.named_modules()}
    stacks = [stack for stack in (decoder or model).modules() if isinstance(stack, torch.nn.ModuleList)
              and any(_is_attention(child) for layer in stack for child in layer.children())]
    if not stacks:
        return []
    stack = max(stacks, key=len)
    return [(names[id(layer)], layer) for layer in stack]


def _is_router_or_expert(path: str) -> bool:
    return any(_ROUTER.fullmatch(part) or part.isdigit() for part in path.split("."))


def _block_layers(block_name: str, block: Any, linear_only: bool) -> list[tuple[str, tuple[int, int]]]:
    """The adaptable layers of one block (paths relative to the decoder layer), routers and experts left out."""
    found = []
    for name, module in block.named_modules():
        path = f"{block_name}.{name}" if name else block_name
        shape = adaptable_shape(module, linear_only)
        if shape and not _is_router_or_expert(path):
            found.append((path, shape))
    return found


def _split_output(layers: list[tuple[str, tuple[int, int]]], hidden: int) -> tuple[list[str], list[str]]:
    """(input-side paths, [output projection path]) of one block's layers."""
    writes_hidden = [path for path, (_, out) in layers if out == hidden]
    if not writes_hidden:  # e.g. JetMoE's attention: its output side is a mixture of experts, not a layer
        return [path for path, _ in layers], []
    output = writes_hidden[-1]
    return [path for path, _ in layers if path != output], [output]


def _layer_roles(layer: Any, hidden: int, linear_only: bool) -> dict[str, list[str]]:
    """Role -> layer paths (relative to the decoder layer) of one decoder layer."""
    attention: list[tuple[str, tuple[int, int]]] = []
    feedforward: list[tuple[str, tuple[int, int]]] = []
    for name, child in layer.named_children():
        if _is_attention(child):
            attention += _block_layers(name, child, linear_only)
        elif _FEEDFORWARD.search(name) or _FEEDFORWARD.search(type(child).__name__) or adaptable_shape(child):
            feedforward += _block_layers(name, child, linear_only)
    attention_inputs, attention_output = _split_output(attention, hidden)
    feedforward_inputs, feedforward_output = _split_output(feedforward, hidden)
    return {"attention": [path for path, _ in attention], "attention_inputs": attention_inputs,
            "attention_output": attention_output, "feedforward": [path for path, _ in feedforward],
            "feedforward_inputs": feedforward_inputs, "feedforward_output": feedforward_output}


def _hidden_size(model: Any, layers: list[tuple[str, Any]], linear_only: bool) -> int:
    """Width of the residual stream: the config's, else the commonest input width of the layers' projections."""
    try:
        return int(model.config.get_text_config().hidden_size)
    except (AttributeError, TypeError):
        widths = Counter(shape[0] for _, layer in layers for module in layer.modules()
                         if (shape := adaptable_shape(module, linear_only)))
        return widths.most_common(1)[0][0] if widths else 0


def _target_names(paths: dict[str, set[str]], module_names: list[str]) -> list[str]:
    """PEFT target names for layer paths: per path, the shortest suffix matching exactly its modules."""
    targets: list[str] = []
    for path, expected in paths.items():
        parts = path.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            if {n for n in module_names if n == suffix or n.endswith("." + suffix)} == expected:
                targets.append(suffix)
                break
        else:
            targets += sorted(expected)
    return targets


def find_module_roles(model: Any, linear_only: bool = False) -> dict[str, tuple[str, ...]]:
    """Role -> PEFT target names (see ``ROLES``), from every decoder layer of ``model``.

    ``linear_only`` leaves out ``Conv1D`` layers (for adapters that wrap ``nn.Linear`` only). A role the model
    lacks (no attention found, experts fused into Parameters) maps to ``()``.
    """
    layers = decoder_layers(model)
    hidden = _hidden_size(model, layers, linear_only)
    by_role: dict[str, dict[str, set[str]]] = {role: {} for role in ROLES}  # role -> path -> full names
    for layer_name, layer in layers:
        for role, paths in _layer_roles(layer, hidden, linear_only).items():
            for path in paths:
                by_role[role].setdefault(path, set()).add(f"{layer_name}.{path}")
    module_names = [name for name, _ in model.named_modules()]
    return {role: tuple(_target_names(paths, module_names)) for role, paths in by_role.items()}
