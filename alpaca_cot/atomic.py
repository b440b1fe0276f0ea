"""Files on disk: writes that never leave a half-written file or folder behind (stage beside the target, then
rename), and reads that name a damaged file in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read_json_file(path: Path, flag: str, remedy: str) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a ``UserError`` naming ``flag``, the file and
    ``remedy`` (what to do about it)."""
    from .errors import UserError

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
