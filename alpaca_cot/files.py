"""Files on disk: writes that never leave a half-written file or folder behind (stage beside the target, then
rename), and reads that name a damaged file in one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

# Errors that mean "the disk (or the file size limit) is full", wherever the writer raised them.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")


def read_json_file(path: Path, flag: str, remedy: str) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a ``UserError`` naming ``flag``, the file and
    ``remedy`` (what to do about it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag}: {path} is not valid JSON ({exc}); {remedy}") from exc


def write_json_atomic(path: Path, content: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_pretrained_atomic(model: Any, tokenizer: Any, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` into a staging folder beside ``target`` and rename it into place.

    ``target`` must be absent or empty. If another process completes the same folder first
    (two runs converting the embedded model at once), its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # a rename also replaces an empty folder
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_complete_lines(path: Path) -> list[str]:
    """Lines of a JSON Lines results file written by an interrupted run; a torn last line is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # bytes after the last newline are a torn write
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
        logger.info("%s: dropped an incomplete last line from an interrupted run", path)
    return complete.decode("utf-8").splitlines()


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_location(flag: str, path: Path, folder: bool = True) -> None:
    """Refuse a location under a file, a folder given for a file (or the reverse), or a read-only place."""
    if path.exists() and path.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise UserError(f"{flag}: {path} is {kind}; give a {'folder' if folder else 'file'} path")
    existing = nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise UserError(f"{flag}: {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: {path} cannot be written: {existing} is read-only for this user; "
                        f"choose another {flag}")


def some_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_new_folder(flag: str, folder: Path) -> None:
    """Refuse writing into ``folder`` unless it is absent or empty (and could be created): it is the user's."""
    check_writable_location(flag, folder)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if names:
        raise UserError(f"{flag}: {folder} exists and is not empty ({some_names(names)}); choose a new folder")


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the disk or the file size limit is full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(message in str(current) for message in _FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def check_new_file(flag: str, path: Path) -> None:
    """Refuse writing ``path`` where a file already is: it is the user's."""
    check_writable_location(flag, path, folder=False)
    if path.exists():
        raise UserError(f"{flag}: {path} already exists; choose a new file (or move that one away)")
