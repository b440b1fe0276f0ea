"""Files on disk, in one place: writes that never leave a half-written file or folder behind (stage beside the
target, then rename: ``atomic_path``, ``atomic_folder``), reads that name a damaged file in one line, JSON Lines
that a killed run resumes (``read_done`` keeps complete lines, ``JsonlAppender`` appends and syncs), and the
checks of output locations."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

# Errors that mean "the disk (or the file size limit) is full", wherever the writer raised them.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")

# Numbers temporary names, so two writers of one target in one process never share a temporary file.
_TEMPORARY_NUMBERS = itertools.count()


def read_json_file(path: Path, flag: str, remedy: str) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a ``UserError`` naming ``flag``, the file and
    ``remedy`` (what to do about it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag}: {path} is not valid JSON ({exc}); {remedy}") from exc


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; renamed over ``target`` when the block ends normally.

    On an exception the temporary file is deleted and ``target`` (old content or absent) is left as it was.
    The temporary name is hidden and ends in ``.tmp``: pass writers that go by the suffix (``numpy.save``,
    ``savefig``) an open file or an explicit format.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{next(_TEMPORARY_NUMBERS)}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary name in the same folder, then rename over ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, content: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over ``path``."""
    write_text_atomic(path, json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_folder(target: Path, marker: str = "config.json") -> Iterator[Path]:
    """A staging folder beside ``target`` to fill; renamed into place when the block ends normally.

    ``target`` must be absent or empty. If another process completed the same folder first (``target`` holds
    ``marker``), its copy is kept. The staging folder is removed in every case.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)  # a rename also replaces an empty folder
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_atomic(model: Any, tokenizer: Any, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` into a staging folder beside ``target`` and rename it into place.

    ``target`` must be absent or empty. If another process completes the same folder first
    (two runs converting the embedded model at once), its copy is kept.
    """
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


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


def parse_json_lines(lines: list[str], path: Path, flag: str | None) -> list[Any]:
    """The JSON value of each of ``path``'s ``lines``. A line that is not JSON is a ``UserError`` naming
    ``flag``, the file and the line; with ``flag`` ``None`` it is skipped instead."""
    values = []
    for number, line in enumerate(lines):
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if flag is None:
                continue
            raise UserError(f"{flag}: {path}:{number + 1} is not JSON; move the file away") from exc
    return values


def read_done(path: Path, flag: str | None) -> list[Any]:
    """The records a previous (perhaps killed) run appended to the JSON Lines file ``path`` (none if absent).

    Only complete lines count: a torn last line is cut off the file, so appending continues after the last
    complete record. A complete line that is not JSON is a ``UserError`` naming ``flag`` and the file
    (``flag`` ``None``: skipped).
    """
    return parse_json_lines(read_complete_lines(path), path, flag)


class JsonlAppender:
    """Appends records to a JSON Lines file, one per line; each ``write`` is flushed and synced to disk,
    so a crash loses at most the batch being written (a torn line ``read_done`` drops)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # closed by close() or the with block

    def write(self, records: Iterable[Any]) -> None:
        """Append ``records`` and sync them to disk."""
        self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def append_jsonl(path: Path, records: Iterable[Any]) -> None:
    """Append ``records`` to the JSON Lines file ``path`` and sync them to disk."""
    with JsonlAppender(path) as log:
        log.write(records)


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
