"""Where results go: folders and files a user owns are refused before anything is written, and a full disk
is named instead of ending in a library's traceback with a torn checkpoint left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

RUN_MANIFEST = "alpaca_cot_run.json"  # what a finished run writes last: its settings, data and result

logger = logging.getLogger(__name__)

# What a run writes besides its adapter before it finishes: reporting folders. A folder holding only
# these (a run that stopped at its first step) is still ours to train into.
REPORTING_FOLDERS = {"runs", "wandb"}
# Errors that mean "the disk (or the file size limit) is full", wherever the writer raised them.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_location(flag: str, path: Path, folder: bool = True) -> None:
    """Refuse a location under a file, a folder given for a file (or the reverse), or a read-only place."""
    if path.exists() and path.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise UserError(f"{flag}: {path} is {kind}; give a {'folder' if folder else 'file'} path")
    existing = _nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise UserError(f"{flag}: {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: {path} cannot be written: {existing} is read-only for this user; "
                        f"choose another {flag}")


def describe_contents(folder: Path) -> str | None:
    """What ``folder`` holds that a new run would replace, in words; None when it is empty (or only reports)."""
    from .distributed import CHECKPOINT_PREFIX, checkpoint_step

    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not [n for n in names if n not in REPORTING_FOLDERS]:
        return None
    manifest = folder / RUN_MANIFEST
    if manifest.is_file():
        try:
            run = json.loads(manifest.read_text(encoding="utf-8"))
            return (f"a finished run ({run.get('peft_type')} on {run.get('base_model')}, "
                    f"{run.get('created', 'undated')})")
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return "a finished run"
    steps = sorted(s for s in (checkpoint_step(folder / n) for n in names) if s is not None)
    if steps:
        return f"checkpoints of an unfinished run (up to {CHECKPOINT_PREFIX}{steps[-1]})"
    return f"files this tool did not write ({_some_names(names)})"


def _some_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_new_folder(flag: str, folder: Path) -> None:
    """Refuse writing into ``folder`` unless it is absent or empty (and could be created): it is the user's."""
    check_writable_location(flag, folder)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if names:
        raise UserError(f"{flag}: {folder} exists and is not empty ({_some_names(names)}); choose a new folder")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def check_training_output(output_dir: Path, base_model: str, resuming: bool, overwrite: bool) -> None:
    """Refuse an ``--output_dir`` a user owns: the base model's folder, a finished run, another run's
    checkpoints or files we did not write, unless resuming or ``--overwrite_output_dir`` says so.

    With ``--overwrite_output_dir`` the old run's checkpoints are deleted, so a later bare
    ``--resume_from_checkpoint`` can never pick one of them up.
    """
    base = Path(base_model)
    if _same_folder(output_dir, base) or (base.exists() and output_dir.absolute() in base.absolute().parents):
        raise UserError(f"--output_dir: {output_dir} holds the base model {base_model}; write the run to a folder "
                        "of its own")
    check_writable_location("--output_dir", output_dir)
    held = describe_contents(output_dir)
    if held is None or resuming:
        return
    if not overwrite:
        ways = ("continue it with --resume_from_checkpoint, replace it with --overwrite_output_dir"
                if "run" in held else "pass --overwrite_output_dir to write beside them (files of the same names are "
                                      "replaced)")
        raise UserError(f"--output_dir: {output_dir} already holds {held}: {ways}, or choose another --output_dir")
    from .distributed import CHECKPOINT_PREFIX, checkpoint_step

    stale = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    for folder in stale:
        shutil.rmtree(folder)
    logger.warning("--overwrite_output_dir: replacing %s in %s%s", held, output_dir,
                   f" ({len(stale)} old checkpoints deleted)" if stale else "")


def check_resume_base(checkpoint: Path, base_model: str, resolved_base: Path) -> None:
    """Refuse a checkpoint trained on another base (its adapter_config says which).

    ``base_model`` is the name the user gave, ``resolved_base`` its local folder (either may be recorded).
    """
    config_path = checkpoint / "adapter_config.json"
    if not config_path.is_file():
        return
    from .atomic import read_json_file

    trained_on = read_json_file(config_path, "--resume_from_checkpoint",
                                "the checkpoint is damaged: resume from an earlier one").get("base_model_name_or_path")
    if trained_on and trained_on not in (base_model, str(resolved_base)) and not _same_folder(Path(trained_on),
                                                                                              resolved_base):
        raise UserError(f"--resume_from_checkpoint: {checkpoint} was trained on {trained_on}, not "
                        f"{base_model}; resume with --model_name_or_path {trained_on} or start a new --output_dir")


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


@contextlib.contextmanager
def disk_full_explained(output_dir: Path) -> Iterator[None]:
    """A full disk while writing into ``output_dir``: delete the torn checkpoint and say so in one line."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_space(exc):
            raise
        from .distributed import prune_checkpoints

        torn = prune_checkpoints(output_dir, None) if output_dir.is_dir() else []
        free = shutil.disk_usage(_nearest_existing(output_dir)).free
        removed = f"; the torn {', '.join(p.name for p in torn)} was deleted" if torn else ""
        raise UserError(f"--output_dir: {output_dir} ran out of space ({free / 2**20:.1f} MiB free){removed}; "
                        "free some space and continue with --resume_from_checkpoint, or choose another "
                        "--output_dir") from exc


def check_new_file(flag: str, path: Path) -> None:
    """Refuse writing ``path`` where a file already is: it is the user's."""
    check_writable_location(flag, path, folder=False)
    if path.exists():
        raise UserError(f"{flag}: {path} already exists; choose a new file (or move that one away)")
