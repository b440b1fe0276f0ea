"""Packing, the chunked loss and token-normalised gradient accumulation on tiny real models (fp32)."""

from __future__ import annotations

import pytest
import torch

from alpaca_cot.data.encoding import IGNORE_INDEX
from alpaca_cot.data.packing import pack_dataset, pack_sample_order
from alpaca_cot.train.attention import PER_SAMPLE_ATTENTION, PackedCollator, use_per_sample_attention
from alpaca_cot.train.loss import chunked_cross_entropy_sum


def _samples(lengths: list[int], vocab: int = 200, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token samples whose first third is a masked prompt, like tokenize_record's output."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]
        samples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return samples


def _dataset(lengths: list[int]):
    from datasets import Dataset

    return Dataset.from_list(_samples(lengths))


def _load(folder, attn: str):
    from transformers import AutoModelForCausalLM

    per_sample = attn == PER_SAMPLE_ATTENTION
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa" if per_sample else attn)
    if per_sample:
        assert use_per_sample_attention(model)
    return model.eval()


def _unpacked_loss(model, samples) -> torch.Tensor:
    """Summed next-token loss of each sample on its own (no padding anywhere), over all target tokens."""
    total, count = torch.zeros(()), 0
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(s["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def _packed_loss(model, batch) -> torch.Tensor:
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def test_pack_sample_order_fits_rows_and_keeps_every_sample():
    lengths = [5, 60, 33, 17, 64, 2, 40, 31, 9, 24]
    rows = pack_sample_order(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 5  # 285 tokens: 5 rows of 64 is the minimum


@pytest.mark.parametrize("attn", ["sdpa", "eager", PER_SAMPLE_ATTENTION])
def test_packed_loss_equals_unpacked_loss(tiny_llama, attn, monkeypatch):
    lengths = [7, 30, 12, 45, 3, 22, 16, 9]
    samples = _samples(lengths)
    packed = pack_dataset(_dataset(lengths), 64)
    assert len(packed) < len(lengths)
    model = _load(tiny_llama, attn)
    if attn == PER_SAMPLE_ATTENTION:  # its per-sample path runs in training mode; prove it is the one used
        model.train()
        monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward", _no_fallback)
    collate = PackedCollator(pad_token_id=0, attn_implementation=attn)
    with torch.no_grad():
        expected = _unpacked_loss(model, samples)
        got = _packed_loss(model, collate([packed[i] for i in range(len(packed))]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _no_fallback(*args, **kwargs):
    raise AssertionError("per_sample_sdpa fell back to plain SDPA")


def test_packed_position_ids_alone_attend_across_samples(tiny_llama):
    """Why the block-diagonal mask exists: restarting position ids with a 2D mask leak across samples."""
    lengths = [20, 30, 10]
    samples = _samples(lengths)
    packed = pack_dataset(_dataset(lengths), 64)
    model = _load(tiny_llama, "sdpa")
    batch = PackedCollator(pad_token_id=0, attn_implementation="sdpa")([packed[i] for i in range(len(packed))])
    batch["attention_mask"] = (batch["labels"] != -1).long()  # what a plain collator sends: a 2D mask of ones
    with torch.no_grad():
        leaked = _packed_loss(model, batch)
        expected = _unpacked_loss(model, samples)
    assert abs(leaked.item() - expected.item()) > 1e-3


def test_collator_masks_the_first_token_of_each_sample_and_restarts_positions():
    packed = pack_dataset(_dataset([5, 3]), 16)
    batch = PackedCollator(pad_token_id=0)([packed[0]])
    lens = packed[0]["seq_lens"]
    starts = [0, lens[0]]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch["position_ids"][0, :8].tolist() == list(range(lens[0])) + list(range(lens[1]))
    mask = batch["attention_mask"][0, 0]
    assert not mask[lens[0], lens[0] - 1]  # the second sample's first token cannot see the first sample
    assert mask[lens[0] + 1, lens[0]] and mask[1, 0]


def test_varlen_backends_get_one_flat_row_with_restarting_positions():
    packed = pack_dataset(_dataset([5, 3, 6]), 8)
    batch = PackedCollator(pad_token_id=0, attn_implementation="flash_attention_2")(
        [packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 14)
    assert sorted(batch["position_ids"][0].tolist()) == sorted(list(range(5)) + list(range(3)) + list(range(6)))


def test_per_sample_attention_gets_one_row_and_unpacked_samples_lose_their_first_target():
    samples = _samples([5, 3, 6])
    for sample in samples:
        sample["labels"] = list(sample["input_ids"])  # --train_on_inputs: every token a target
    batch = PackedCollator(pad_token_id=0, attn_implementation=PER_SAMPLE_ATTENTION)(samples)  # eval: unpacked
    assert batch["position_ids"].tolist() == [list(range(5)) + list(range(3)) + list(range(6))]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # all batch-first: accelerate may split them
    assert [batch["labels"][0, s].item() for s in (0, 5, 8)] == [IGNORE_INDEX] * 3
    assert batch["labels"][0, 6].item() == samples[1]["input_ids"][1]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_per_sample_attention_matches_separate_causal_attention_with_gradients(heads, kv_heads):
    """Each sample's output and gradients equal causal attention over that sample alone (grouped KV too)."""
    from types import SimpleNamespace

    from alpaca_cot.train.attention import per_sample_sdpa

    torch.manual_seed(0)
    lens = [7, 1, 12, 4]
    q = torch.randn(1, heads, sum(lens), 8, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, sum(lens), 8, requires_grad=True) for _ in range(2))
    positions = torch.tensor([[p for n in lens for p in range(n)]])
    training = SimpleNamespace(is_causal=True, training=True)
    out, _ = per_sample_sdpa(training, q, k, v, None, scaling=0.3, position_ids=positions)
    expected = []
    bounds = [0, 7, 8, 20, 24]
    for start, end in zip(bounds[:-1], bounds[1:]):
        ks, vs = (t[:, :, start:end].repeat_interleave(heads // kv_heads, 1) for t in (k, v))
        scores = q[:, :, start:end] @ ks.transpose(-1, -2) * 0.3
        scores = scores.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf"))
        expected.append((scores.softmax(-1) @ vs).transpose(1, 2))
    expected = torch.cat(expected, dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_per_sample_attention_model_still_generates_and_saves_a_plain_config(tiny_llama, tmp_path):
    """Outside training it is plain SDPA (generation is unchanged), and a saved config names no custom backend."""
    import json

    plain = _load(tiny_llama, "sdpa")
    model = _load(tiny_llama, PER_SAMPLE_ATTENTION)
    prompt = torch.tensor([[1, 5, 9, 30, 7]])
    expected = plain.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    model.save_pretrained(tmp_path / "saved")
    assert PER_SAMPLE_ATTENTION not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))


@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_loss_matches_plain_loss_and_gradients(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (3, 17))
    labels[:, :4] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    plain_grads = torch.autograd.grad(3 * plain, [hidden, weight] if weight_trains else [hidden])
    chunked = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=7)
    chunked_grads = torch.autograd.grad(3 * chunked, [hidden, weight] if weight_trains else [hidden])
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _train_one_step(folder, samples, batch: int, accumulation: int, loss_chunk_size: int, attn: str = "sdpa",
                    checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """Parameters after one plain SGD step (no clipping, no warm-up) over all ``samples``."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from alpaca_cot.train.loss import LeanLossTrainer

    model = _load(folder, attn).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args = TrainingArguments(output_dir=str(folder / "unused"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
                             max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    trainer = LeanLossTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples),
                              data_collator=PackedCollator(pad_token_id=0, attn_implementation=attn),
                              loss_chunk_size=loss_chunk_size)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_normalises_by_tokens(tiny_llama):
    """2 micro-batches of 2 == 1 batch of 4: the loss is divided by the target tokens of the whole step."""
    samples = _samples([60, 6, 50, 8])  # very unequal micro-batches: a per-batch mean would weigh them wrongly
    two_by_two = _train_one_step(tiny_llama, samples, 2, 2, loss_chunk_size=16)
    one_by_four = _train_one_step(tiny_llama, samples, 4, 1, loss_chunk_size=16)
    before = {name: p for name, p in _load(tiny_llama, "sdpa").named_parameters()}
    assert not torch.equal(one_by_four["lm_head.weight"], before["lm_head.weight"])  # the step did move weights
    for name, value in one_by_four.items():
        torch.testing.assert_close(two_by_two[name], value, rtol=1e-4, atol=1e-6, msg=name)


def _train_passes(folder, dataset, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Logged losses and final parameters of ``steps`` SGD steps of 2 micro-batches of 2 over ``dataset``, in order."""
    from transformers import TrainingArguments

    from alpaca_cot.train.loss import LeanLossTrainer

    model = _load(folder, "sdpa").train()
    args = TrainingArguments(output_dir=str(folder / "unused"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=steps, learning_rate=0.5, optim="sgd",
                             max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, use_cpu=True,
                             report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             train_sampling_strategy="sequential")
    trainer = LeanLossTrainer(model=model, args=args, train_dataset=dataset, loss_chunk_size=16,
                              data_collator=PackedCollator(pad_token_id=0, attn_implementation="sdpa"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_stream_steps_at_its_end_as_a_sized_epoch_does(tiny_llama):
    """5 samples are 3 micro-batches of 2 per pass: with 2 accumulation steps each pass ends with a short step.
    A stream of the same samples in the same order must log the same per-token mean losses and train the same
    weights (before the fix the short step's micro-batch joined the next pass's first step: loss about doubled)."""
    from datasets import Dataset

    samples = _samples([30, 6, 22, 9, 40], seed=3)
    sized_losses, sized = _train_passes(tiny_llama, Dataset.from_list(samples), steps=6)
    stream_losses, streamed = _train_passes(tiny_llama, Dataset.from_list(samples).to_iterable_dataset(), steps=6)
    assert len(stream_losses) == len(sized_losses) == 6
    assert stream_losses == pytest.approx(sized_losses, rel=1e-5)
    for name, value in sized.items():
        torch.testing.assert_close(streamed[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_throughput_benchmark_smoke(tiny_llama, tmp_path):
    """Both recipes run end to end on a tiny model and the JSON has the documented shape (no timing asserted)."""
    import json

    from benchmarks import train_throughput
    from tests.conftest import SAMPLE_RECORDS

    for name in train_throughput.DATA_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(SAMPLE_RECORDS))
    out = tmp_path / "result.json"
    assert train_throughput.main(["--model", str(tiny_llama), "--data_dir", str(tmp_path), "--samples", "12",
                                  "--cutoff_len", "256", "--batch", "2", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["original"]["tokens_per_s"] > 0 and result["ours"]["peak_mem_mb"] > 0
    assert result["speedup"] == pytest.approx(result["ours"]["tokens_per_s"] / result["original"]["tokens_per_s"])
    original, ours = result["details"]["original"], result["details"]["ours"]
    assert original["samples"] == ours["samples"] == original["rows"] == 12 and ours["rows"] < 12


def test_packing_flags_parse_and_check():
    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.errors import UserError

    assert parse_finetune_args(["--data", "demo"]).packing is True
    assert parse_finetune_args(["--data", "demo", "--no_packing"]).packing is False
    assert parse_finetune_args(["--data", "demo", "--packing", "false"]).packing is False
    with pytest.raises(UserError, match="--packing_len 64 is shorter than --cutoff_len 512"):
        parse_finetune_args(["--data", "demo", "--packing_len", "64"])


def test_training_packs_by_default_and_not_for_prompt_methods(tiny_llama, sample_file, tmp_path):
    import json

    from tests.conftest import train_tiny

    assert train_tiny(tiny_llama, sample_file, tmp_path / "lora", "--max_steps", "1") == 0
    result = json.loads((tmp_path / "lora" / "alpaca_cot_run.json").read_text())["result"]
    assert result["packing"] and result["train_rows"] < result["train_examples"]
    assert train_tiny(tiny_llama, sample_file, tmp_path / "prompt", "--max_steps", "1", "--peft_type", "prompt") == 0
    result = json.loads((tmp_path / "prompt" / "alpaca_cot_run.json").read_text())["result"]
    assert not result["packing"] and result["train_rows"] == result["train_examples"]


def test_a_stream_is_packed_on_the_fly_without_losing_or_splitting_samples():
    lengths = [5, 60, 33, 17, 64, 2, 40, 31, 9, 24]
    rows = list(pack_dataset(_dataset(lengths).to_iterable_dataset(), 64))
    assert sorted(n for row in rows for n in row["seq_lens"]) == sorted(lengths)
    assert all(len(row["input_ids"]) == sum(row["seq_lens"]) <= 64 for row in rows)
    assert len(rows) < len(lengths)


def test_per_sample_attention_step_with_checkpointing_equals_the_masked_step(tiny_llama):
    """A Trainer step on one flat row (per-sample attention, recomputed under checkpointing) moves every weight
    as the padded block-diagonal-mask step does."""
    samples = _samples([40, 6, 25, 13])
    masked = _train_one_step(tiny_llama, samples, 4, 1, loss_chunk_size=16)
    per_sample = _train_one_step(tiny_llama, samples, 4, 1, loss_chunk_size=16, attn=PER_SAMPLE_ATTENTION,
                                 checkpointing=True)
    for name, value in masked.items():
        torch.testing.assert_close(per_sample[name], value, rtol=1e-4, atol=1e-6, msg=name)
