"""What a run folder holds and how it is read back: the manifest a finished run writes last, its committed
checkpoints, and the checks that keep a new run from replacing what a user owns (a full disk is named instead
of ending in a library's traceback with a torn checkpoint left behind).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import (
    check_writable_location,
    is_out_of_space,
    nearest_existing,
    read_json_file,
    some_names,
    write_json_atomic,
)

RUN_MANIFEST = "alpaca_cot_run.json"  # what a finished run writes last: its settings, data and result

logger = logging.getLogger(__name__)

# What a run writes besides its adapter before it finishes: reporting folders. A folder holding only
# these (a run that stopped at its first step) is still ours to train into.
REPORTING_FOLDERS = {"runs", "wandb"}
# Written last, by rank 0, after every rank has written its part of the checkpoint.
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint-"


def describe_contents(folder: Path) -> str | None:
    """What ``folder`` holds that a new run would replace, in words; None when it is empty (or only reports)."""
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
    return f"files this tool did not write ({some_names(names)})"


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
    stale = checkpoint_folders(output_dir)
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

    trained_on = read_json_file(config_path, "--resume_from_checkpoint",
                                "the checkpoint is damaged: resume from an earlier one").get("base_model_name_or_path")
    if trained_on and trained_on not in (base_model, str(resolved_base)) and not _same_folder(Path(trained_on),
                                                                                              resolved_base):
        raise UserError(f"--resume_from_checkpoint: {checkpoint} was trained on {trained_on}, not "
                        f"{base_model}; resume with --model_name_or_path {trained_on} or start a new --output_dir")


@contextlib.contextmanager
def disk_full_explained(output_dir: Path) -> Iterator[None]:
    """A full disk while writing into ``output_dir``: delete the torn checkpoint and say so in one line."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_space(exc):
            raise
        torn = prune_checkpoints(output_dir, None) if output_dir.is_dir() else []
        free = shutil.disk_usage(nearest_existing(output_dir)).free
        removed = f"; the torn {', '.join(p.name for p in torn)} was deleted" if torn else ""
        raise UserError(f"--output_dir: {output_dir} ran out of space ({free / 2**20:.1f} MiB free){removed}; "
                        "free some space and continue with --resume_from_checkpoint, or choose another "
                        "--output_dir") from exc


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-N`` folder, or None for anything else."""
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, complete or torn, oldest first."""
    found = (p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None)
    return sorted(found, key=checkpoint_step)


def is_complete_checkpoint(path: Path) -> bool:
    """Complete once the commit marker exists: every rank had finished writing before it was made."""
    return (path / CHECKPOINT_COMPLETE).is_file()


def find_last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``; torn ones (a kill while saving) are never picked.

    Each torn checkpoint is named in a warning, so a resumed run's log says what it passed over.
    """
    folders = checkpoint_folders(output_dir)
    for torn in (p for p in folders if not is_complete_checkpoint(p)):
        logger.warning("skipping torn checkpoint %s: no %s (the run was stopped while writing it)", torn,
                       CHECKPOINT_COMPLETE)
    complete = [p for p in folders if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def prune_checkpoints(output_dir: Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Delete torn checkpoints and all but the newest ``keep`` complete ones; return what was deleted.

    The newest complete checkpoint and ``protect`` (the best one) always stay. Call only while no
    process is writing a checkpoint.
    """
    folders = checkpoint_folders(output_dir)
    complete = [p for p in folders if is_complete_checkpoint(p)]
    doomed = [p for p in folders if not is_complete_checkpoint(p)]
    if keep is not None and complete:
        kept = set(complete[-keep:]) | {complete[-1]}
        if protect is not None:
            kept.add(Path(protect))
        doomed += [p for p in complete if p not in kept]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def read_run_manifest(lora_dir: Path) -> dict[str, Any]:
    """The run settings saved by training, or ``{}`` for a plain PEFT adapter folder."""
    path = lora_dir / RUN_MANIFEST
    if not path.is_file():
        return {}
    return read_json_file(path, "--lora_dir", "the run's manifest is damaged: move it away to load the adapter "
                          "alone (with --model_name_or_path), or train again")


def save_run_folder(model: Any, tokenizer: Any, output_dir: Path, manifest: dict[str, Any],
                    state_dict: dict[str, Any] | None = None) -> None:
    """Save adapter, tokenizer and manifest; each file lands by rename, the manifest last.

    ``state_dict``: the gathered weights when training sharded them (ZeRO-3, FSDP).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / RUN_MANIFEST, manifest)
        (output_dir / RUN_MANIFEST).unlink(missing_ok=True)  # no manifest vouches for a half-swapped folder
        for item in sorted(staging.iterdir(), key=lambda p: p.name == RUN_MANIFEST):
            target = output_dir / item.name
            if item.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
