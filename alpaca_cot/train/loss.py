"""The causal-LM loss without full-vocabulary logits for the whole batch.

The plain loss computes ``lm_head`` over every position (batch x length x vocabulary floats,
~400 MB for 2,048 tokens of a 49k vocabulary, kept for backward with a softmax copy). Here only
positions that have a target are projected, a chunk at a time, and each chunk's gradients are
formed right away, so at most ``chunk_size x vocabulary`` logits exist at once and nothing is
recomputed in backward. On CUDA, Liger's fused kernel does the same when it is installed.

``LeanLossTrainer`` plugs this into the transformers ``Trainer``: it captures the decoder's last
hidden state with a hook (so PEFT, DDP and gradient checkpointing wrappers all still run), asks the
model for the last position's logits only, and divides the summed loss by the number of target
tokens of the whole accumulated batch (``num_items_in_batch``), so gradient accumulation
normalises by tokens, not by micro-batches. What the model's own loss would have added on top of the
cross-entropy (AdaLoRA's orthogonal regulariser) is added here too.

A stream (``--streaming``) has no length, so the ``Trainer`` steps only after every
``gradient_accumulation_steps`` micro-batches; at the end of a pass it would carry the last few
micro-batches' gradients into the next pass's first step. ``LeanLossTrainer`` completes such a step
with micro-batches that have no targets instead, so it steps right there, normalised by its own tokens,
as the short last step of a sized epoch is.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import has_length

from ..data.encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Marks a micro-batch that only completes an optimizer step at the end of a stream (no targets, no loss).
STEP_PADDING = "alpaca_cot_step_padding"


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``; gradients formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: D102
                chunk_size: int) -> torch.Tensor:
        autocast_on = torch.is_autocast_enabled(hidden.device.type)
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if autocast_on else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device)
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if weight.requires_grad else None)
        w = weight.to(compute_dtype)
        rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            t = targets[start:start + chunk_size]
            # The matmul in the compute dtype; log-softmax in fp32, in one fused pass that also upcasts.
            log_probs = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
            total -= log_probs.gather(1, t[:, None]).sum()
            grad_logits = log_probs.exp_()  # the softmax, in place
            grad_logits[rows[:t.shape[0]], t] -= 1
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.hidden_dtype, ctx.weight_dtype, ctx.weight_needs_grad = hidden.dtype, weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden.float() * grad_output).to(ctx.hidden_dtype)
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.weight_needs_grad else None
        return gh, gw, None, None


def shift_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that have a target, and those targets: position t predicts label t+1."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep], targets[keep]


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` (ignoring -100).

    Equals ``F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum")`` with the same
    gradients, but never holds more than ``chunk_size`` rows of logits.
    """
    selected, targets = shift_targets(hidden, labels)
    if selected.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP's hooks) connected
    if hidden.is_cuda:
        liger = _liger_loss()
        if liger is not None:
            return liger(weight, selected, targets)
    return _ChunkedLinearCrossEntropy.apply(selected, weight, targets, chunk_size)


def _liger_loss() -> Any:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def lean_loss_blocker(model: Any) -> str | None:
    """Why the chunked loss cannot replace this model's own loss, or None when it can."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning:
        return "prompt-learning methods add virtual tokens inside the PEFT wrapper"
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    config = causal_lm.config
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return f"{type(causal_lm).__name__} transforms its logits after lm_head"
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "lm_head is not a plain bias-free Linear layer (adapted or quantized)"
    parameters = inspect.signature(causal_lm.forward).parameters
    if "logits_to_keep" not in parameters or not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return f"{type(causal_lm).__name__}.forward takes no logits_to_keep or loss kwargs"
    return None


def adalora_model(model: Any) -> Any:
    """The ``AdaLoraModel`` inside a PEFT-wrapped model, or None when it is not an AdaLoRA model."""
    from peft import PeftModel
    from peft.tuners.adalora import AdaLoraModel

    base = model.base_model if isinstance(model, PeftModel) else None
    return base if isinstance(base, AdaLoraModel) else None


def adalora_orthogonal_penalty(adalora: Any) -> torch.Tensor | float:
    """``orth_reg_weight`` x the mean ``||P P^T - I||_F`` over AdaLoRA's A (P = A) and B (P = B^T) matrices.

    What PEFT's ``AdaLoraModel.forward`` adds to a loss computed from labels (peft 0.18 to 0.21), in the same
    order of operations; the chunked loss never passes labels, so it adds this itself.
    """
    from peft.utils.integrations import gather_params_ctx

    name = adalora.trainable_adapter_name
    penalty: torch.Tensor | float = 0
    count = 0
    for param_name, param in adalora.model.named_parameters():
        if ("lora_A" in param_name or "lora_B" in param_name) and name in param_name:
            # A ZeRO-3 shard is empty here: PEFT gathers the whole matrix first
            gather = gather_params_ctx(param, fwd_module=adalora) if param.shape == torch.Size([0]) \
                else contextlib.nullcontext()
            with gather:
                covariance = param @ param.T if "lora_A" in param_name else param.T @ param
            identity = torch.eye(*covariance.size(), out=torch.empty_like(covariance))
            count += 1
            penalty += torch.norm(covariance - identity, p="fro")
    if count:
        penalty = penalty / count
    return adalora.peft_config[name].orth_reg_weight * penalty


class LeanLossTrainer(Trainer):
    """``Trainer`` whose training loss comes from ``chunked_cross_entropy_sum`` (see the module docstring).

    ``loss_chunk_size`` 0 keeps the model's own loss. Evaluation always uses the model's own loss.
    """

    def __init__(self, *args: Any, loss_chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size
        if loss_chunk_size:
            blocker = lean_loss_blocker(self.model)
            if blocker:
                logger.info("chunked loss off: %s", blocker)
                self.loss_chunk_size = 0
        self._hidden: list[torch.Tensor] = []
        if self.loss_chunk_size:
            # Count target tokens over the accumulated batch, and don't divide by the accumulation steps again.
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = True
            # One hook for the whole run (registering per step would make torch.compile recompile).
            self._causal_lm().get_decoder().register_forward_hook(self._keep_hidden)
        self._adalora = adalora_model(self.model)

    def _causal_lm(self) -> Any:
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def _keep_hidden(self, module: Any, args: Any, output: Any) -> None:
        if module.training:
            self._hidden[:] = [output[0] if isinstance(output, tuple) else output.last_hidden_state]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Chunked next-token loss over the decoder's last hidden state, normalised by target tokens.

        Plus AdaLoRA's orthogonal regulariser, as the model's own loss has it. A step-padding micro-batch
        (see ``get_batch_samples``) contributes exactly nothing.
        """
        inputs = dict(inputs)
        if inputs.pop(STEP_PADDING, False):
            return self._no_loss(model, inputs)
        if return_outputs or not self.loss_chunk_size or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        model(**inputs, logits_to_keep=1, use_cache=False)  # logits of one position: the head runs below
        hidden = self._hidden.pop()
        loss = chunked_cross_entropy_sum(hidden, self._causal_lm().get_output_embeddings().weight, labels,
                                         self.loss_chunk_size)
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = loss / num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) \
            else loss / num_items_in_batch
        if self._adalora is not None:
            loss = loss + adalora_orthogonal_penalty(self._adalora)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was global
        return loss

    def _no_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """A zero loss that still runs forward and backward: under DDP every micro-batch's backward must run."""
        inputs.pop("labels", None)
        outputs = model(**inputs, use_cache=False)
        self._hidden.clear()
        return outputs.logits.sum() * 0.0

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The Trainer's micro-batches for one optimizer step, completed with step padding where a stream ends.

        An unsized epoch steps after every ``gradient_accumulation_steps`` micro-batches only, so the last
        micro-batches of a pass would otherwise join the next pass's first step, each normalised by its own
        few tokens (the logged loss about doubles). The padding has no targets: the step is normalised by the
        tokens of its real micro-batches, exactly as a sized epoch's short last step.
        """
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Without a token count the Trainer divides by the number of micro-batches: padding would skew that.
        if 0 < len(batches) < num_batches and num_items_in_batch is not None and not has_length(self.train_dataset):
            batches += [self._step_padding() for _ in range(num_batches - len(batches))]
        return batches, num_items_in_batch

    def _step_padding(self) -> dict[str, Any]:
        """A one-token micro-batch without targets, built by the run's own collator."""
        tokenizer = self.processing_class
        token = getattr(tokenizer, "pad_token_id", None)
        token = getattr(tokenizer, "eos_token_id", None) if token is None else token
        batch = dict(self.data_collator([{"input_ids": [token or 0], "attention_mask": [1],
                                          "labels": [IGNORE_INDEX]}]))
        batch[STEP_PADDING] = True
        return batch
