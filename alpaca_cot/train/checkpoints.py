"""Checkpoints that are whole or absent: each is committed only once every rank has written it."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ..files import write_json_atomic
from ..run_folder import CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, prune_checkpoints
from .distributed import barrier, world_size


class CheckpointCommitCallback(TrainerCallback):
    """Marks each checkpoint complete once all ranks wrote it, then applies ``--save_total_limit``.

    The Trainer writes a checkpoint in place, file by file, every rank its own RNG state; a kill in
    between leaves a folder that looks usable. The Trainer's own rotation is switched off (it could
    keep such a torn folder as "the newest" and delete the last good one); this callback rotates
    only after the new checkpoint is committed.
    """

    def __init__(self, save_total_limit: int | None) -> None:
        self.save_total_limit = save_total_limit

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        # Re-saving a step (resumed from an older checkpoint): un-commit it before it is overwritten.
        if control.should_save and state.is_world_process_zero:
            (Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}" / CHECKPOINT_COMPLETE).unlink(
                missing_ok=True)

    def on_save(self, args, state, control, **kwargs):  # noqa: D102
        barrier()  # every rank has written its files
        if state.is_world_process_zero:
            output_dir = Path(args.output_dir)
            folder = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
            write_json_atomic(folder / CHECKPOINT_COMPLETE,
                              {"global_step": state.global_step, "world_size": world_size()})
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            prune_checkpoints(output_dir, self.save_total_limit, protect=best)
        barrier()  # nobody starts the next checkpoint while rank 0 prunes
