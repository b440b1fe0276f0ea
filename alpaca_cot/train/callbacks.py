"""Trainer callbacks: the progress shown while training and the AdaLoRA rank budget."""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class LossProgressCallback(TrainerCallback):
    """One progress bar with the running loss in a terminal; plain log lines otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.interactive = sys.stderr.isatty()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero and self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if not state.is_world_process_zero or not logs:
            return
        shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate")}
        if not shown:
            return
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=True)
            if "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        else:
            logger.info("step %d/%d %s", state.global_step, state.max_steps,
                        " ".join(f"{k} {v}" for k, v in shown.items()))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class AdaLoraBudgetCallback(TrainerCallback):
    """Reallocates AdaLoRA's rank budget after every optimizer step (the original never did).

    ``on_optimizer_step`` runs before the gradients are zeroed, which the rank
    allocator needs to score each singular value.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
        self.model.base_model.update_and_allocate(state.global_step)
