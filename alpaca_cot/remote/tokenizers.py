"""The remote-code tokenizers' defects under transformers 5 and their in-memory cures, by family module name (a
family row's ``remote_support``: chatglm, glm2 for ChatGLM2 and ChatGLM3, moss, internlm, internlm2, baichuan for
Baichuan 1 and 2).

Every cure is checked for by looking at the loaded class (its own source or signature), so a checkpoint whose
tokenizer was fixed upstream, or a tokenizer written for transformers 5, is left alone.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from collections.abc import Callable
from typing import Any

from .fixes import Fix

# --- init order: the vocabulary is loaded after PreTrainedTokenizer.__init__, which transformers >= 4.34 makes
# read it (get_vocab, to register the special tokens): "'property' object cannot be interpreted as an integer" ---


def _own_source(cls: type, name: str) -> str:
    """Source of ``name`` as the checkpoint's class defines it ('' when inherited or unreadable)."""
    function = vars(cls).get(name)
    try:
        return inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return ""


def _loads_vocabulary_after_base_init(attribute: str) -> Callable[[type], bool]:
    def present(cls: type) -> bool:
        source = _own_source(cls, "__init__")
        base_init, assigned = source.find("super().__init__("), source.find(f"self.{attribute} =")
        return 0 <= base_init < assigned
    return present


def _init_arguments(init: Callable[..., None], instance: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(init).bind(instance, *args, **kwargs)
    bound.apply_defaults()
    return {**bound.arguments, **bound.arguments.get("kwargs", {})}


def _load_vocabulary_first(load: Callable[[dict[str, Any], Any, dict[str, Any]], None]) -> Callable[[type], None]:
    """A cure running ``load(upstream module's globals, tokenizer, init arguments)`` before the checkpoint's own
    ``__init__``, which then loads the same vocabulary again once the base class is initialised (as upstream
    intends)."""
    def cure(cls: type) -> None:
        upstream_init = cls.__init__

        @functools.wraps(upstream_init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            load(upstream_init.__globals__, self, _init_arguments(upstream_init, self, args, kwargs))
            upstream_init(self, *args, **kwargs)

        cls.__init__ = __init__
    return cure


def _sentencepiece_model(upstream: dict[str, Any], tokenizer: Any, arguments: dict[str, Any]) -> None:
    import sentencepiece

    tokenizer.sp_model_kwargs = arguments.get("sp_model_kwargs") or {}
    tokenizer.sp_model = sentencepiece.SentencePieceProcessor(**tokenizer.sp_model_kwargs)
    tokenizer.sp_model.Load(arguments["vocab_file"])


def _chatglm6b_sp_tokenizer(upstream: dict[str, Any], tokenizer: Any, arguments: dict[str, Any]) -> None:
    tokenizer.sp_tokenizer = upstream["SPTokenizer"](arguments["vocab_file"],
                                                     num_image_tokens=arguments["num_image_tokens"])


def _moss_encoder(upstream: dict[str, Any], tokenizer: Any, arguments: dict[str, Any]) -> None:
    with open(arguments["vocab_file"], encoding="utf-8") as vocab:
        tokenizer.encoder = json.load(vocab)
    tokenizer.decoder = {index: token for token, index in tokenizer.encoder.items()}


def _init_order_fix(attribute: str, load: Callable[[dict[str, Any], Any, dict[str, Any]], None]) -> Fix:
    return Fix(defect=f"__init__ sets self.{attribute} (the vocabulary) only after PreTrainedTokenizer.__init__, "
                      "which reads the vocabulary since transformers 4.34 ('property' object cannot be interpreted "
                      "as an integer)",
               present=_loads_vocabulary_after_base_init(attribute), cure=_load_vocabulary_first(load))


# --- ChatGLM 1/2/3: _pad() has no padding_side parameter (transformers passes it) and asserts left padding -------


def _pad_lacks_padding_side(cls: type) -> bool:
    own_pad = vars(cls).get("_pad")
    return own_pad is not None and "padding_side" not in inspect.signature(own_pad).parameters


def _pad_value(key: str, tokenizer: Any) -> Any:
    return {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id,
            "special_tokens_mask": 1}.get(key, 0)


def _padded(values: Any, difference: int, side: str, pad_value: Any) -> Any:
    """``values`` grown by ``difference`` positions on ``side``: a list, or an array whose last axes are positions
    (ChatGLM-6B's 2D position ids, and its (1, n, n) boolean attention mask, where True means masked)."""
    if isinstance(values, list):
        return [pad_value] * difference + values if side == "left" else values + [pad_value] * difference
    import numpy

    widths = [(0, 0)] * values.ndim
    square = values.dtype == bool and values.ndim == 3
    for axis in (-2, -1) if square else (-1,):
        widths[axis] = (difference, 0) if side == "left" else (0, difference)
    return numpy.pad(values, widths, constant_values=True if square else pad_value)


_PADDING = threading.Lock()


def _pad_on_either_side(cls: type) -> None:
    from transformers.utils import PaddingStrategy

    upstream_pad = cls._pad

    def _pad(self: Any, encoded_inputs: Any, max_length: int | None = None,
             padding_strategy: Any = PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of: int | None = None,
             padding_side: str | None = None, return_attention_mask: bool | None = None) -> Any:
        """Upstream's _pad adds what its model reads (position ids; ChatGLM-6B: its 2D positions and, without an
        attention mask, its own square one) to the unpadded row; then every per-position input is padded on
        ``padding_side`` (default the tokenizer's), where upstream could only pad on the left."""
        with _PADDING:  # the side is flipped below: a concurrent request must not read the flipped one
            return _pad_row(self, encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side,
                            return_attention_mask)

    def _pad_row(self: Any, encoded_inputs: Any, max_length: int | None, padding_strategy: Any,
                 pad_to_multiple_of: int | None, padding_side: str | None, return_attention_mask: bool | None) -> Any:
        side = padding_side or self.padding_side
        length = len(encoded_inputs[self.model_input_names[0]])
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        saved_side, self.padding_side = self.padding_side, "left"  # upstream asserts it, but pads nothing here
        try:
            encoded_inputs = upstream_pad(self, encoded_inputs, max_length, PaddingStrategy.DO_NOT_PAD,
                                          None, return_attention_mask)
        finally:
            self.padding_side = saved_side
        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or length >= max_length:
            return encoded_inputs
        for key, values in list(encoded_inputs.items()):
            if key in ("input_ids", "attention_mask", "position_ids", "token_type_ids", "special_tokens_mask"):
                encoded_inputs[key] = _padded(values, max_length - length, side, _pad_value(key, self))
        return encoded_inputs

    cls._pad = _pad


_GLM_PAD_FIX = Fix(defect="_pad() takes no padding_side (transformers passes it: '_pad() got an unexpected keyword "
                          "argument 'padding_side'') and asserts left padding, so training cannot pad on the right",
                   present=_pad_lacks_padding_side, cure=_pad_on_either_side)


# --- MOSS: imports is_tf_available, which transformers 5 (no TensorFlow support any more) removed -------------


def _tf_check_removed() -> bool:
    import transformers.utils

    return not hasattr(transformers.utils, "is_tf_available")


def _tensorflow_unavailable() -> bool:
    """What the old helper answers under transformers 5: TensorFlow is never available to it."""
    return False


def _restore_tf_check() -> None:
    # Both places: the file imports it from transformers.utils, and transformers' import check of remote files
    # skips only `if is_..._available():` blocks whose function import_utils defines (else it demands tensorflow).
    import transformers.utils
    import transformers.utils.import_utils

    transformers.utils.is_tf_available = _tensorflow_unavailable
    transformers.utils.import_utils.is_tf_available = _tensorflow_unavailable


_MOSS_IMPORT_FIXES = (
    Fix(defect="tokenization_moss.py imports is_tf_available from transformers.utils, removed in transformers 5 "
               "(transformers first refuses the file: 'requires ... tensorflow')",
        present=_tf_check_removed, cure=_restore_tf_check),
)


# --- MOSS: its special_tokens_map.json lists <eoh> <eom> <eot> <eoc> <eor> as dicts under the legacy key
# additional_special_tokens, which transformers 5 passes on unconverted: five new tokens named by the dicts' text ---


def _takes_special_tokens_as_keywords(cls: type) -> bool:
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD
               for parameter in inspect.signature(cls.__init__).parameters.values())


def _as_added_token(token: Any) -> Any:
    from transformers import AddedToken

    if isinstance(token, dict) and "content" in token:
        return AddedToken(**{**{k: v for k, v in token.items() if k != "__type"}, "special": True})
    return token


def _convert_special_token_dicts(cls: type) -> None:
    upstream_init = cls.__init__

    @functools.wraps(upstream_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(kwargs.get(key), (list, tuple)):
                kwargs[key] = [_as_added_token(token) for token in kwargs[key]]
        upstream_init(self, *args, **kwargs)

    cls.__init__ = __init__


# --- MOSS: convert_tokens_to_string byte-decodes every token; transformers 5 hands it the added tokens as well
# (added_tokens.json: runs of spaces and tabs, <eoh>...), which are plain text: KeyError ' ' ---


def _byte_decodes_added_tokens(cls: type) -> bool:
    source = _own_source(cls, "convert_tokens_to_string")
    return "byte_decoder" in source and "added_tokens" not in source


def _added_tokens_as_text(cls: type) -> None:
    upstream_convert = cls.convert_tokens_to_string

    def convert_tokens_to_string(self: Any, tokens: list[str]) -> str:
        """Byte-level pieces through upstream's decoding, added tokens as the text they stand for."""
        text, pieces = "", []
        for token in tokens:
            if token in self._added_tokens_encoder:
                text += (upstream_convert(self, pieces) if pieces else "") + token
                pieces = []
            else:
                pieces.append(token)
        return text + (upstream_convert(self, pieces) if pieces else "")

    cls.convert_tokens_to_string = convert_tokens_to_string


# --- ChatGLM3: build_chat_input (its official prompt builder) calls batch_encode_plus, removed in transformers 5 ---


def _calls_removed_batch_encode_plus(cls: type) -> bool:
    return "batch_encode_plus" in _own_source(cls, "build_chat_input") and not hasattr(cls, "batch_encode_plus")


def _batch_encode_plus(self: Any, batch: list, **kwargs: Any) -> Any:
    """transformers 4's batch_encode_plus: a call on a batch."""
    return self(batch, **kwargs)


def _restore_batch_encode_plus(cls: type) -> None:
    cls.batch_encode_plus = _batch_encode_plus


# --- save_pretrained of transformers 5 leaves add_bos_token / add_eos_token out of tokenizer_config.json (a fast
# tokenizer keeps them in its post-processor): a slow one reloads with its __init__ defaults (Baichuan: BOS on) ---


def _save_drops_bos_eos_flags(cls: type) -> bool:
    from transformers import PreTrainedTokenizerBase

    takes_flags = "add_bos_token" in inspect.signature(cls.__init__).parameters
    return takes_flags and 'pop("add_bos_token"' in _own_source(PreTrainedTokenizerBase, "save_pretrained")


def _save_bos_eos_flags(cls: type) -> None:
    upstream_save = cls.save_pretrained

    @functools.wraps(upstream_save)
    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        from pathlib import Path

        saved = upstream_save(self, save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config.update({flag: getattr(self, flag) for flag in ("add_bos_token", "add_eos_token")
                           if isinstance(getattr(self, flag, None), bool)})
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    cls.save_pretrained = save_pretrained


_SAVE_FLAGS_FIX = Fix(defect="transformers 5's save_pretrained leaves add_bos_token / add_eos_token out of "
                             "tokenizer_config.json: the saved tokenizer reloads with __init__'s defaults (Baichuan "
                             "then adds a BOS its checkpoint does not)",
                      present=_save_drops_bos_eos_flags, cure=_save_bos_eos_flags)

# Fixes applied before a tokenizer's Python file is imported (no argument), and to its class, by family module.
TOKENIZER_IMPORT_FIXES: dict[str, tuple[Fix, ...]] = {"moss": _MOSS_IMPORT_FIXES}
TOKENIZER_FIXES: dict[str, tuple[Fix, ...]] = {
    "chatglm": (_init_order_fix("sp_tokenizer", _chatglm6b_sp_tokenizer), _GLM_PAD_FIX),
    "glm2": (
        _GLM_PAD_FIX,
        Fix(defect="build_chat_input calls batch_encode_plus, which transformers 5 removed (AttributeError)",
            present=_calls_removed_batch_encode_plus, cure=_restore_batch_encode_plus),
    ),
    "moss": (
        _init_order_fix("encoder", _moss_encoder),
        Fix(defect="transformers 5 passes the dicts of a legacy special_tokens_map.json's additional_special_tokens "
                   "to __init__ unconverted: MOSS gets five tokens named by their text (ids 106072-106076) and "
                   "<eoh>, <eom>, ... are not special", present=_takes_special_tokens_as_keywords,
            cure=_convert_special_token_dicts),
        Fix(defect="convert_tokens_to_string byte-decodes every token, and transformers 5 passes it the added "
                   "tokens too (runs of spaces, <eoh>): decode raises KeyError", present=_byte_decodes_added_tokens,
            cure=_added_tokens_as_text),
        _SAVE_FLAGS_FIX,
    ),
    "internlm": (_SAVE_FLAGS_FIX,),
    "internlm2": (_SAVE_FLAGS_FIX,),
    "baichuan": (_init_order_fix("sp_model", _sentencepiece_model), _SAVE_FLAGS_FIX),
}
