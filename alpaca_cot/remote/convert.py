"""One-time conversion of a remote-code checkpoint to its native transformers equivalent, cached like the embedded
model: keyed by the family, the conversion's version and the source files, written to a staging folder and renamed
into place, so a killed conversion leaves nothing half-written and a changed checkpoint is converted again."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..embedded import cache_dir
from ..errors import UserError
from ..files import atomic_folder
from .fixes import NativeConversion

if TYPE_CHECKING:  # the registry imports this package: no import at run time
    from ..models import ModelFamily

logger = logging.getLogger(__name__)

# config.json key of a converted copy: which family and source checkpoint it came from
CONVERTED_FROM = "alpaca_cot_converted_from"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def converted_from(config: dict[str, Any]) -> dict[str, Any] | None:
    """``{"family", "source", "architecture"}`` of a converted copy's ``config.json``, else ``None``."""
    return config.get(CONVERTED_FROM)


def _local_folder(model_path: str) -> Path:
    path = Path(model_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path))
    except Exception as exc:  # offline, unknown or gated repo: all user-fixable
        raise UserError(f"--model_name_or_path: cannot download {model_path!r} to convert it "
                        f"({type(exc).__name__}); check the id and your network, or use a local folder") from exc


def _weight_files(folder: Path) -> list[Path]:
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()
            return [folder / name for name in sorted(set(shards))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise UserError(f"--model_name_or_path: {folder} holds no weights (model.safetensors, pytorch_model.bin or "
                    "a sharded index); point it at the full checkpoint")


def _cache_key(folder: Path, family: ModelFamily, conversion: NativeConversion) -> str:
    digest = hashlib.sha256(f"{family.name}:{conversion.architecture}:v{conversion.version}".encode())
    digest.update((folder / "config.json").read_bytes())
    for file in _weight_files(folder):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _read_shard(file: Path) -> dict[str, Any]:
    """One weight file's tensors; a truncated or foreign file stops with one line naming it."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file)
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) .bin cannot be memory-mapped
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip errors all mean an unreadable file
        raise UserError(f"--model_name_or_path: cannot read the weights in {file} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the download may be incomplete: "
                        "download it again") from exc


def _convert_weights(source: Path, staging: Path, conversion: NativeConversion, config: dict[str, Any]) -> None:
    """Shard by shard, so memory holds one source shard and its converted tensors at a time."""
    from safetensors.torch import save_file

    files = _weight_files(source)
    weight_map: dict[str, str] = {}
    for number, file in enumerate(files, start=1):
        converted: dict[str, Any] = {}
        for name, tensor in _read_shard(file).items():
            converted.update(conversion.tensors(name, tensor, config))
        shard = "model.safetensors" if len(files) == 1 else f"model-{number:05d}-of-{len(files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in converted.items()}, staging / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, shard))
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _copy_tokenizer_files(source: Path, staging: Path) -> None:
    """Everything but weights and the model config: tokenizer files and the code they import."""
    for file in source.iterdir():
        if (file.is_file() and file.suffix not in _WEIGHT_SUFFIXES and file.name not in _WEIGHT_INDEXES
                and file.name != "config.json"):
            shutil.copy2(file, staging / file.name)


def converted_checkpoint(model_path: str, family: ModelFamily, conversion: NativeConversion) -> Path:
    """The cached native copy of ``model_path`` (converting it on first use); returns its folder."""
    source = _local_folder(model_path)
    target = cache_dir() / "converted" / f"{family.name}-{_cache_key(source, family, conversion)}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s (%s) once to native %s in %s", model_path, family.name, conversion.architecture,
                target)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    with atomic_folder(target) as staging:  # another process finishing the same copy first is kept
        _convert_weights(source, staging, conversion, config)
        _copy_tokenizer_files(source, staging)
        native = {**conversion.config(config), CONVERTED_FROM: {
            "family": family.name, "source": str(model_path), "architecture": conversion.architecture}}
        (staging / "config.json").write_text(json.dumps(native, indent=2), encoding="utf-8")
    return target
