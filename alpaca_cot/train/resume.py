"""Checkpoints that resume exactly, in every mode: what the Trainer's own checkpoint lacks.

The Trainer saves the adapter, optimizer, scheduler, every rank's RNG state and the step, and on
resume skips the batches already trained on. Two kinds of run need more (see docs/resume.md):

- **AdaLoRA**: the rank allocator's importance averages (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``)
  and the current rank pattern live outside the weights. And once a rank pattern exists, PEFT saves
  the adapter cut down to it, which cannot be loaded back into the full-rank modules that keep
  training. Checkpoints here hold the full-rank adapter (a plain PEFT adapter without a rank
  pattern) plus ``adalora_state.pt`` with the allocator's state and the rank pattern. (And ``ranknum``,
  which PEFT never saves, is kept frozen: peft 0.21 would train it.)
- **Streams** (``--streaming``): the Trainer counts an unsized dataset's position from step 0 of
  epoch 0, but a stream is read pass after pass (the Trainer's epochs). ``stream_position.json``
  records the pass and how many micro-batches of it were read; on resume the Trainer's own skip
  reads them again (without training) from the start of that pass, in the same seeded order.
  (``datasets``' ``IterableDataset.state_dict`` cannot do this: its shuffle buffer's content is
  not part of the state, so it would resume with other batches.)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from ..files import write_json_atomic
from .loss import STEP_PADDING, LeanLossTrainer

logger = logging.getLogger(__name__)

ADALORA_STATE = "adalora_state.pt"
STREAM_POSITION = "stream_position.json"
_ALLOCATOR_FIELDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


@contextlib.contextmanager
def full_rank_adapter(adalora: Any) -> Iterator[None]:
    """Save or load an AdaLoRA adapter at its full initial rank: PEFT resizes to the rank pattern when one is set."""
    if adalora is None:
        yield
        return
    config = adalora.peft_config[adalora.trainable_adapter_name]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


def freeze_adalora_ranknum(adalora: Any) -> list[str]:
    """Freeze AdaLoRA's ``ranknum`` (the rank each layer's scaling divides by); return the names frozen.

    PEFT means it as a constant (it is never saved: loading sets it to ``r`` again), but peft 0.21
    re-registers it as trainable, so the optimizer would move it and neither a checkpoint nor the saved
    adapter would hold what trained (0.18 keeps it frozen).
    """
    frozen = [name for name, param in adalora.model.named_parameters() if ".ranknum." in name and param.requires_grad]
    for name, param in adalora.model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def save_adalora_state(adalora: Any, folder: Path) -> None:
    """Write the rank allocator's importance averages and the rank pattern into a checkpoint folder."""
    allocator = adalora.rankallocator
    state = {name: {key: value.detach().cpu() for key, value in getattr(allocator, name).items()}
             for name in _ALLOCATOR_FIELDS}
    state["rank_pattern"] = adalora.peft_config[adalora.trainable_adapter_name].rank_pattern
    torch.save(state, folder / ADALORA_STATE)


def load_adalora_state(adalora: Any, folder: Path) -> bool:
    """Restore what ``save_adalora_state`` wrote; False when the checkpoint has none (an older checkpoint)."""
    path = folder / ADALORA_STATE
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    devices = {name: param.device for name, param in adalora.model.named_parameters()}
    for name in _ALLOCATOR_FIELDS:
        setattr(adalora.rankallocator, name, {key: value.to(devices.get(key, value.device))
                                              for key, value in state[name].items()})
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]
    return True


@dataclass
class StreamPosition:
    """Where training stands in a stream: the pass (the Trainer's epoch) and the micro-batches read in it."""

    epoch: int = 0
    batches: int = 0
    ended: bool = False  # the pass's last micro-batch has been read
    _iterator: Any = field(default=None, repr=False, compare=False)

    def advance(self, iterator: Any, read: int, ended: bool) -> None:
        """Count ``read`` micro-batches taken from ``iterator``; a new iterator means the Trainer began a pass."""
        if self._iterator is not None and iterator is not self._iterator:
            self.epoch, self.batches, self.ended = self.epoch + 1, 0, False
        self._iterator = iterator
        self.batches += read
        self.ended = self.ended or ended

    def resume_point(self) -> StreamPosition:
        """Where a run resumed from this position starts reading: the next pass once this one has ended."""
        return StreamPosition(self.epoch + 1, 0) if self.ended else StreamPosition(self.epoch, self.batches)

    def to_json(self) -> dict[str, Any]:
        """The saved fields."""
        return {"epoch": self.epoch, "batches": self.batches, "ended": self.ended}


class ResumableTrainer(LeanLossTrainer):
    """``LeanLossTrainer`` whose checkpoints also hold AdaLoRA's allocator state and a stream's position."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream = None if has_length(self.train_dataset) else StreamPosition()
        if self._adalora is not None and freeze_adalora_ranknum(self._adalora):
            logger.info("AdaLoRA: ranknum frozen (a constant PEFT never saves; this peft marks it trainable)")

    # ---- saving -------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, with a full-rank AdaLoRA adapter, then this module's extra state."""
        with full_rank_adapter(self._adalora):
            super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self._adalora is not None:
            save_adalora_state(self._adalora, folder)
        if self._stream is not None:
            write_json_atomic(folder / STREAM_POSITION, self._stream.to_json())

    # ---- resuming -----------------------------------------------------------------------------------

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        """The Trainer's resume point, from the saved stream position when the data is a stream."""
        epochs, batches = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                       resume_from_checkpoint, trial)
        if resume_from_checkpoint is None:
            return epochs, batches
        logger.info("resuming from %s: step %d of %d", resume_from_checkpoint, self.state.global_step, max_steps)
        if self._stream is None:
            return epochs, batches
        path = Path(resume_from_checkpoint) / STREAM_POSITION
        if not path.is_file():
            logger.warning("%s has no %s (an older checkpoint): the stream restarts where the Trainer guesses, "
                           "so batches after resume may differ from an uninterrupted run", resume_from_checkpoint,
                           STREAM_POSITION)
            return epochs, batches
        saved = json.loads(path.read_text(encoding="utf-8"))
        self._stream = StreamPosition(saved["epoch"], saved["batches"], saved["ended"]).resume_point()
        if self.args.ignore_data_skip:
            self._stream.batches = 0
        logger.info("the stream resumes in pass %d after its first %d micro-batches (read again, not trained on)",
                    self._stream.epoch + 1, self._stream.batches)
        return self._stream.epoch, self._stream.batches

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """With the optimizer (on every resume path, DeepSpeed's too): AdaLoRA's allocator state and rank pattern."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._adalora is not None and not load_adalora_state(self._adalora,
                                                                                          Path(checkpoint)):
            logger.warning("%s has no %s (an older checkpoint): AdaLoRA's importance scores restart from zero",
                           checkpoint, ADALORA_STATE)

    def _load_best_model(self) -> None:
        """Checkpoints hold full-rank AdaLoRA adapters: load one as such, then take its rank pattern."""
        with full_rank_adapter(self._adalora):
            super()._load_best_model()
        if self._adalora is not None:
            load_adalora_state(self._adalora, Path(self.state.best_model_checkpoint))

    # ---- counting a stream's micro-batches ----------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The micro-batches of one optimizer step; for a stream, also where they leave its position."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._stream is not None:
            read = sum(1 for batch in batches if not batch.get(STEP_PADDING))
            self._stream.advance(epoch_iterator, read, ended=read < num_batches)
        return batches, num_items_in_batch
