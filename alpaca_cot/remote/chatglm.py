"""ChatGLM-6B (THUDM/chatglm-6b, GLM version 1): the checkpoint's own classes, fixed in memory for transformers 5.

No native transformers architecture computes GLM v1 (two rotary position streams, the prompt attended
bidirectionally up to ``<sop>``, residual branches that add the normalised input times sqrt(2 * layers)), so
there is no conversion: :func:`native_conversion` returns None and the fixed remote classes are the product.

GLM reads its layout from the tokens: the prompt ends ``... [gMASK] <sop>``; every token from ``<sop>`` on takes
the position of ``[gMASK]`` in the first stream and 1, 2, ... in the second, and attends causally, while the
prompt before ``<sop>`` attends to the whole prompt. :func:`glm_layout` builds that layout from the tokens and a
2D padding mask (left or right padding), the way the official tokenizer lays out one unpadded prompt.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from .fixes import GENERATION_MIXIN_FIX, LAYER_COUNT_ALIAS_FIX, Fix, NativeConversion

IMPORT_FIXES: tuple[Fix, ...] = ()


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """None: no native transformers architecture is exactly GLM v1 (see the module's docstring)."""
    return None


# ----------------------------------------------------------------------------------------------- GLM layout


def glm_layout(input_ids: Any, padding_mask: Any, config: Any, query_length: int | None = None) -> tuple[Any, Any]:
    """GLM's attention mask and position ids for ``input_ids`` ([batch, length]) under a 2D ``padding_mask``
    (1 = token, 0 = pad; pads anywhere), numbered over each row's real tokens only.

    Returns ``(mask, position_ids)`` for the last ``query_length`` positions (all by default): ``mask`` is
    [batch, 1, queries, length], True where a query must not see a key (the upstream convention); position ids
    are [batch, 2, queries] (2D rotary) or [batch, queries]. A row without ``<sop>`` is all prompt and one
    without a mask token keeps plain positions, as the official tokenizer lays them out.
    """
    import torch

    keep = padding_mask.bool() if padding_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    length = input_ids.shape[1]
    columns = torch.arange(length, device=input_ids.device)
    rank = (keep.long().cumsum(-1) - 1).clamp(min=0)  # each token's index among its row's real tokens
    prompt_end = _first(input_ids == config.bos_token_id, keep, default=length)  # <sop>'s column
    prompt_length = (keep & (columns < prompt_end[:, None])).sum(-1)
    gmask_hits, mask_hits = (input_ids == config.gmask_token_id) & keep, (input_ids == config.mask_token_id) & keep
    uses_gmask = gmask_hits.any(-1)  # the model's own code prefers [gMASK] over [MASK]
    mask_hits = torch.where(uses_gmask[:, None], gmask_hits, mask_hits)
    mask_rank = rank.gather(1, _first(mask_hits, keep, default=0)[:, None])
    answer = columns[None, :] >= prompt_end[:, None]
    if config.position_encoding_2d:
        moved = answer & mask_hits.any(-1)[:, None]
        block = torch.where(answer, rank - prompt_length[:, None] + 1, 0)
        position_ids = torch.stack([torch.where(moved, mask_rank, rank), block], dim=1)
    else:  # 1D GLM moves the answer onto [MASK] only, not onto [gMASK]
        moved = answer & mask_hits.any(-1)[:, None] & ~uses_gmask[:, None]
        position_ids = torch.where(moved, mask_rank, rank)
    position_ids = torch.where(keep[:, None] if position_ids.dim() == 3 else keep, position_ids, 0)
    queries = columns[length - (query_length or length):]
    visible = (columns[None, :] <= queries[:, None])[None] | (columns < prompt_end[:, None])[:, None, :]
    mask = ~(visible & keep[:, None, :])
    return mask[:, None], position_ids[..., length - (query_length or length):]


def _first(hits: Any, keep: Any, default: int) -> Any:
    """Column of each row's first hit among real tokens, ``default`` where there is none."""
    import torch

    hits = hits & keep
    return torch.where(hits.any(-1), hits.int().argmax(-1), default)


# ----------------------------------------------------------------------------------------------- probes


def _sibling(cls: type, name: str) -> Any:
    """A class defined next to ``cls`` in the checkpoint's modelling file (None if upstream renamed it)."""
    return getattr(sys.modules[cls.__module__], name, None)


def _concrete_models(cls: type) -> list[type]:
    """The model classes of the checkpoint's file that build layers (the pretrained base class does not)."""
    from transformers import PreTrainedModel

    module = sys.modules[cls.__module__]
    return [value for value in vars(module).values() if isinstance(value, type) and issubclass(value, PreTrainedModel)
            and value.__module__ == module.__name__ and "forward" in vars(value)]


def _probe_config(cls: type) -> Any:
    """A one-layer config with a 16-token vocabulary, for building probe models in milliseconds."""
    return cls.config_class(vocab_size=16, hidden_size=8, num_layers=1, num_attention_heads=2, inner_hidden_size=16,
                            bos_token_id=4, eos_token_id=5, mask_token_id=2, gmask_token_id=3, pad_token_id=0,
                            max_sequence_length=64)


def _meta_probe(cls: type) -> Any:
    """``cls`` built without memory (meta device), to look at what its constructor makes."""
    import torch

    with torch.device("meta"):
        return cls(_probe_config(cls))


# ----------------------------------------------------------------------------------------------- construction


def _then(init: Any, after: Any) -> Any:
    """``init`` followed by ``after(self)``."""
    import functools

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        after(self)

    return __init__


def _builds_half_weights(cls: type) -> bool:
    import torch

    return any(parameter.dtype != torch.get_default_dtype() for parameter in _meta_probe(cls).parameters())


def _cast_to_default_dtype(model: Any) -> None:
    """What ``from_pretrained(dtype=...)`` asked for is the default dtype while the model is built."""
    import torch

    torch.nn.Module.to(model, torch.get_default_dtype())


def _build_in_default_dtype(cls: type) -> None:
    for model_class in _concrete_models(cls):
        model_class.__init__ = _then(model_class.__init__, _cast_to_default_dtype)


def _skips_post_init(cls: type) -> bool:
    return not hasattr(_meta_probe(cls), "all_tied_weights_keys")


def _call_post_init(cls: type) -> None:
    for model_class in _concrete_models(cls):
        model_class.__init__ = _then(model_class.__init__, lambda model: model.post_init())


# ----------------------------------------------------------------------------------------------- rotary


def _leaves_rotary_uninitialised(cls: type) -> bool:
    import torch

    rotary = _sibling(cls, "RotaryEmbedding")
    if rotary is None:
        return False
    probe = rotary(4)
    probe.inv_freq.zero_()  # what transformers 5 hands _init_weights for a buffer missing from the checkpoint
    cls._init_weights(_meta_probe(cls), probe)
    return not torch.equal(probe.inv_freq, _rotary_frequencies(probe.inv_freq))


def _rotary_frequencies(inv_freq: Any) -> Any:
    """Upstream's rotary frequencies (base 10000, rounded through float16 as its constructor does)."""
    import torch

    dim = 2 * inv_freq.numel()
    exact = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=inv_freq.device).float() / dim))
    return exact.half().to(inv_freq.dtype)


def _initialise_rotary(cls: type) -> None:
    for model_class in _concrete_models(cls):
        model_class._init_weights = _also_rotary(model_class._init_weights, _sibling(cls, "RotaryEmbedding"))


def _also_rotary(init_weights: Any, rotary: type) -> Any:
    """``init_weights`` that also gives rotary modules upstream's frequencies."""
    import functools

    @functools.wraps(init_weights)
    def _init_weights(self: Any, module: Any) -> None:
        if isinstance(module, rotary):
            module.inv_freq.copy_(_rotary_frequencies(module.inv_freq))
        init_weights(self, module)

    return _init_weights


def _rotary_table_in_model_dtype(cls: type) -> bool:
    """Upstream numbers positions in the rotary buffer's dtype: in bfloat16, 256 and 257 are one number."""
    import torch

    rotary = _sibling(cls, "RotaryEmbedding")
    if rotary is None:
        return False
    probe = rotary(4).to(torch.bfloat16)
    probe.inv_freq.copy_(_rotary_frequencies(probe.inv_freq))
    cos, _ = probe(torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16), seq_len=258)
    return torch.equal(cos[256], cos[257])


def _rotary_table_in_float32(cls: type) -> None:
    _sibling(cls, "RotaryEmbedding").forward = _float32_rotary_forward


def _float32_rotary_forward(self: Any, x: Any, seq_dim: int = 1, seq_len: int | None = None) -> tuple[Any, Any]:
    """Upstream's cos/sin table ([positions, 1, rotary dim]), computed in float32 and kept in ``x``'s dtype:
    the float32 model's table in every dtype."""
    import torch

    seq_len = int(seq_len if seq_len is not None else x.shape[seq_dim])
    stale = self.cos_cached is None or self.cos_cached.dtype != x.dtype or self.cos_cached.device != x.device
    if stale or self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
        # a product, not torch.outer: autocast would run a matmul in bfloat16
        angles = torch.arange(seq_len, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq.float()[None]
        table = torch.cat((angles, angles), dim=-1)[:, None, :]
        self.cos_cached, self.sin_cached = table.cos().to(x.dtype), table.sin().to(x.dtype)
        self.max_seq_len_cached = seq_len
    return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


# ----------------------------------------------------------------------------------------------- forward


def _arguments(forward: Any, model: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``forward``'s arguments by name, defaults filled in (callers may pass them positionally)."""
    bound = inspect.signature(forward).bind(model, *args, **kwargs)
    bound.apply_defaults()
    return {name: value for name, value in list(bound.arguments.items())[1:]}


def _presented_as(wrapper: Any, forward: Any, keyword: str | None = None) -> Any:
    """``wrapper`` advertising ``forward``'s parameters, plus ``keyword`` if given: generate and the Trainer read
    forward's signature to decide what to pass (no ``**kwargs``, so no loss kwargs and no logits_to_keep)."""
    signature = inspect.signature(forward)
    if keyword:
        extra = inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY, default=None)
        signature = signature.replace(parameters=[*signature.parameters.values(), extra])
    wrapper.__signature__ = signature
    wrapper.__doc__, wrapper.__name__, wrapper.__qualname__ = forward.__doc__, forward.__name__, forward.__qualname__
    return wrapper


def _cached_length(cache: Any, past: Any) -> int:
    """Tokens already cached: in a transformers ``Cache``, or in upstream's tuples ([length, batch, ...])."""
    for held in (cache, past):
        if hasattr(held, "get_seq_length"):
            return held.get_seq_length()
    return len(past[0][0]) if past else 0


_UPSTREAM_FORWARD = {"input_ids", "position_ids", "attention_mask", "past_key_values", "use_cache", "return_dict"}


def _has_upstream_forward(cls: type) -> bool:
    """The forward the cures below wrap: upstream's parameters, by these names."""
    return _UPSTREAM_FORWARD <= set(inspect.signature(cls.forward).parameters)


def _takes_no_cache(cls: type) -> bool:
    return _has_upstream_forward(cls) and "cache" not in inspect.signature(cls.forward).parameters


def _accept_cache(cls: type) -> None:
    cls.forward = _forward_with_cache(cls.forward)


def _forward_with_cache(forward: Any) -> Any:
    """Upstream's forward fed from and feeding a transformers ``Cache`` (what transformers 5 generate passes as
    ``cache``); upstream's own tuples (``past_key_values``) still work as before."""

    def forward_with_cache(self: Any, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        from transformers.cache_utils import Cache, DynamicCache

        inputs = _arguments(forward, self, args, kwargs)
        if isinstance(inputs["past_key_values"], Cache):
            cache, inputs["past_key_values"] = inputs["past_key_values"], None
        use_cache = inputs["use_cache"] if inputs["use_cache"] is not None else self.config.use_cache
        if cache is None and use_cache and inputs["past_key_values"] is None:
            cache = DynamicCache()
        return_dict = inputs["return_dict"] if inputs["return_dict"] is not None else self.config.return_dict
        if cache is None:
            inputs["use_cache"] = use_cache
            outputs = forward(self, **{**inputs, "return_dict": True})
        else:
            cached = cache.get_seq_length()
            outputs = forward(self, **{**inputs, "past_key_values": _upstream_past(cache) if cached else None,
                                       "use_cache": True, "return_dict": True})
            _store_new_keys(cache, outputs.get("cache"), cached)
            outputs["cache"] = cache
        return outputs if return_dict else outputs.to_tuple()

    return _presented_as(forward_with_cache, forward, "cache")


def _upstream_past(cache: Any) -> tuple:
    """A ``Cache``'s keys and values per layer in upstream's layout, [length, batch, heads, head size]."""
    return tuple((layer.keys.permute(2, 0, 1, 3), layer.values.permute(2, 0, 1, 3)) for layer in cache.layers)


def _store_new_keys(cache: Any, presents: tuple | None, cached: int) -> None:
    """Append to ``cache`` the positions past ``cached`` of upstream's ``presents`` (None when upstream turned
    the cache off, as it does under gradient checkpointing)."""
    for layer, (keys, values) in enumerate(presents or ()):
        cache.update(keys[cached:].permute(1, 2, 0, 3), values[cached:].permute(1, 2, 0, 3), layer)


def _misreads_padding_masks(cls: type) -> bool:
    """Upstream takes any mask for its own [batch, 1, length, length] one (True = masked): a left-padded row with
    a 2D mask must give the logits of the same row unpadded."""
    import torch

    if not _has_upstream_forward(cls):
        return False
    model = cls(_probe_config(cls)).float().eval()
    generator = torch.Generator().manual_seed(0)  # the caller's random state stays as it was
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        try:
            alone = model(torch.tensor([[7, 8, 3, 4, 9]]), use_cache=False).logits[0, -1]
            padded = model(torch.tensor([[0, 7, 8, 3, 4, 9]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]),
                           use_cache=False).logits[0, -1]
        except (RuntimeError, ValueError, IndexError, TypeError):
            return True
    return not torch.allclose(alone, padded, atol=1e-5)


def _read_padding_masks(cls: type) -> None:
    cls.forward = _forward_with_layout(cls.forward)


def _forward_with_layout(forward: Any) -> Any:
    """Upstream's forward given GLM's mask and positions built by :func:`glm_layout` from the tokens and a 2D
    padding mask (or none); upstream's own [batch, 1, length, length] mask passes through unchanged."""

    def forward_with_layout(self: Any, *args: Any, **kwargs: Any) -> Any:
        inputs = _arguments(forward, self, args, kwargs)
        mask = inputs["attention_mask"]
        if mask is not None and mask.dim() != 2:
            return forward(self, **inputs)
        cached = _cached_length(inputs.get("cache"), inputs["past_key_values"])
        if cached and (mask is not None or inputs["position_ids"] is None):
            raise ValueError("ChatGLM-6B after a cache: pass the new tokens' GLM attention mask ([batch, 1, new, "
                             "all], True = masked) and position ids, from glm_layout(); generate() does")
        if not cached and inputs["input_ids"] is not None:
            inputs["attention_mask"], positions = glm_layout(inputs["input_ids"], mask, self.config)
            if inputs["position_ids"] is None:
                inputs["position_ids"] = positions
        return forward(self, **inputs)

    return _presented_as(forward_with_layout, forward)


# ----------------------------------------------------------------------------------------------- checkpointing


def _checkpoints_the_old_way(cls: type) -> bool:
    """transformers' own test for the pre-4.35 hook, which it calls without gradient_checkpointing_kwargs."""
    return "value" in inspect.signature(cls._set_gradient_checkpointing).parameters


def _checkpoint_blocks_through_transformers(cls: type) -> None:
    """Blocks checkpoint themselves with the function transformers hands them (use_reentrant and the rest as the
    caller asked); the stack's own call of torch.utils.checkpoint is never taken."""
    from transformers import PreTrainedModel

    stack, block = _sibling(cls, "ChatGLMModel"), _sibling(cls, "GLMBlock")
    for model_class in _concrete_models(cls):
        model_class._set_gradient_checkpointing = PreTrainedModel._set_gradient_checkpointing
    stack.gradient_checkpointing = property(lambda self: False, lambda self, value: None)
    stack.forward = _stack_without_cache_under_checkpointing(stack.forward)
    block.gradient_checkpointing = False
    block.forward = _block_forward_checkpointed(block.forward)


def _checkpointing(module: Any) -> bool:
    import torch

    return bool(module.gradient_checkpointing and module.training and torch.is_grad_enabled())


def _block_forward_checkpointed(forward: Any) -> Any:
    import functools

    @functools.wraps(forward)
    def checkpointed_forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if not _checkpointing(self):
            return forward(self, hidden_states, *args, **kwargs)
        kwargs.update(layer_past=None, use_cache=False)  # a replayed layer must not cache twice
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), hidden_states, *args)

    return checkpointed_forward


def _stack_without_cache_under_checkpointing(forward: Any) -> Any:
    """The stack's forward asking its blocks for no keys while they checkpoint (upstream's own rule)."""

    def stack_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        inputs = _arguments(forward, self, args, kwargs)
        if any(_checkpointing(layer) for layer in self.layers):
            inputs["use_cache"] = False
        return forward(self, **inputs)

    return _presented_as(stack_forward, forward)


# ----------------------------------------------------------------------------------------------- generate


def _generates_for_transformers_4(cls: type) -> bool:
    if not _has_upstream_forward(cls) or not hasattr(cls, "prepare_inputs_for_generation"):
        return False
    prepare = inspect.signature(cls.prepare_inputs_for_generation).parameters
    update = inspect.signature(cls._update_model_kwargs_for_generation).parameters
    return "cache" not in prepare or "num_new_tokens" not in update or "_reorder_cache" in vars(cls)


def _generate_for_transformers_5(cls: type) -> None:
    from transformers import GenerationMixin

    cls.prepare_inputs_for_generation = _prepare_inputs_for_generation
    cls._update_model_kwargs_for_generation = GenerationMixin._update_model_kwargs_for_generation
    if "_reorder_cache" in vars(cls):  # beam search then reorders the Cache itself
        del cls._reorder_cache


def _prepare_inputs_for_generation(self: Any, input_ids: Any, next_sequence_length: int | None = None,
                                   cache: Any = None, attention_mask: Any = None, inputs_embeds: Any = None,
                                   is_first_iteration: bool | None = False, **kwargs: Any) -> dict[str, Any]:
    """transformers' inputs for the tokens not yet cached, with GLM's mask and positions for them, numbered over
    the whole sequence so far (the prompt's [gMASK] and <sop> are in it)."""
    from transformers import GenerationMixin

    kwargs.pop("position_ids", None)  # GLM numbers positions from the tokens, below
    new = input_ids.shape[1] - (cache.get_seq_length() if cache is not None else 0)
    inputs = GenerationMixin.prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=new, cache=cache, inputs_embeds=inputs_embeds,
        is_first_iteration=is_first_iteration, **kwargs)
    inputs["attention_mask"], inputs["position_ids"] = glm_layout(input_ids, attention_mask, self.config,
                                                                  query_length=new)
    return inputs


MODEL_FIXES: tuple[Fix, ...] = (
    LAYER_COUNT_ALIAS_FIX,
    GENERATION_MIXIN_FIX,
    Fix("ChatGLM-6B builds its embeddings, linear layers and output head in float16 whatever dtype is asked "
        "(float32 on CPU then fails in LayerNorm)", _builds_half_weights, _build_in_default_dtype),
    Fix("ChatGLM-6B's model classes never call post_init(): from_pretrained fails with no attribute "
        "'all_tied_weights_keys'", _skips_post_init, _call_post_init),
    Fix("ChatGLM-6B's rotary inv_freq is left uninitialised (values like 1e-36) when the checkpoint does not hold "
        "it: its _init_weights does nothing, and transformers 5 no longer runs the constructor's values",
        _leaves_rotary_uninitialised, _initialise_rotary),
    Fix("ChatGLM-6B computes its rotary table in the model's dtype: in bfloat16 positions above 256 collide (256 and "
        "257 get one angle) and the angles drift", _rotary_table_in_model_dtype, _rotary_table_in_float32),
    Fix("ChatGLM-6B's forward takes no `cache` (transformers 5 generate's name for the KV cache) and returns its keys "
        "as tuples generate never feeds back: every new token recomputes the whole sequence", _takes_no_cache,
        _accept_cache),
    Fix("ChatGLM-6B's forward takes a 2D padding mask (1 = token) for its own 4D mask (True = masked) and numbers "
        "positions from the first pad", _misreads_padding_masks, _read_padding_masks),
    Fix("ChatGLM-6B's generation hooks are written for transformers 4: they read `past_key_values`, call the "
        "removed _extract_past_from_model_output, drop 2D padding masks, place positions by padded columns and "
        "reorder beams' caches as tuples (generate fails with IndexError: too many indices for tensor of dimension 2)",
        _generates_for_transformers_4, _generate_for_transformers_5),
    Fix("ChatGLM-6B checkpoints its layers itself, with torch's deprecated reentrant default, behind the pre-4.35 "
        "_set_gradient_checkpointing(module, value) hook: transformers drops gradient_checkpointing_kwargs "
        "(use_reentrant=False) and torch warns it will refuse the call", _checkpoints_the_old_way,
        _checkpoint_blocks_through_transformers),
)
