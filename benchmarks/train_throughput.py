"""Training throughput: the original Alpaca-CoT recipe against ours, same data, model and samples.

    python benchmarks/train_throughput.py                         # CPU, embedded SmolLM2-135M, 256 samples
    python benchmarks/train_throughput.py --samples 512 --out result.json
    python benchmarks/train_throughput.py --device cuda --arch llama-7b --samples 2000   # random-weight Llama-7B

Both recipes train LoRA (r 8, q_proj v_proj) for one pass over the same ``--samples`` real records
(Alpaca-GPT4 EN and ZH, FLAN CoT StrategyQA from ../shared/data, shuffled with a fixed seed):

- original: batch 4 padded per batch, gradient checkpointing, the model's own loss over full logits;
  fp32 on CPU, 8-bit base with fp16 autocast on CUDA (what the 2023 script did);
- ours: the library's defaults (packing into rows of ``--cutoff_len``, attention kept within each sample:
  one causal SDPA call per sample on the CPU, a block-diagonal mask on CUDA; chunked loss; ``--compute_dtype
  auto`` with a bf16 base; on the CPU a faster LoRA dropout and no fp32 round trip of adapter inputs;
  gradient checkpointing only for 1B+ models on CUDA), ``--batch`` (or ``--ours_batch``) rows per step.
- qlora (only when named in ``--recipes``): ours on a 4-bit NF4 double-quantized base.

Each recipe runs in a fresh process (so peak memory is its own: resident set on CPU, allocated on CUDA);
steps are timed after ``--warmup`` steps. Real tokens are the non-pad tokens of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
DATA_FILES = ["llama_factory/alpaca_en_demo.json", "llama_factory/alpaca_zh_demo.json",
              "alpaca_cot/strategyqa_train.json"]
RECIPES = ("original", "ours", "qlora")
# Llama-7B's shape; the vocabulary is the tokenizer's so the real token ids fit.
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096}


def _plan(args: argparse.Namespace, recipe: str, scratch: Path):
    """The recipe as a training run plan: the same flags, checks and resolution as uniform_finetune.py.

    original: the 2023 script's fp16 (fp32 on a CPU), 8-bit base on CUDA, checkpointing, no packing;
    ours: the defaults; qlora: ours on a 4-bit base.
    """
    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.train.plan import plan_run

    flags = ["--model_name_or_path", args.model, "--data", *(str(Path(args.data_dir) / f) for f in DATA_FILES),
             "--peft_type", "qlora" if recipe == "qlora" else "lora", "--lora_r", "8", "--lora_alpha", "16",
             "--lora_dropout", "0.05", "--lora_target_modules", "q_proj", "v_proj", "--cutoff_len",
             str(args.cutoff_len), "--val_set_size", "0", "--seed", str(args.seed), "--report_to", "none",
             "--output_dir", str(scratch / "run")]
    if recipe == "original":
        flags += ["--compute_dtype", "fp16", "--packing", "false"]
        flags += ["--quantization_bit", "8"] if args.device == "cuda" else []
    parsed = parse_finetune_args(flags)
    parsed.gradient_checkpointing = (True if recipe == "original"
                                     else {"auto": None, "on": True, "off": False}[args.ours_checkpointing])
    plan = plan_run(parsed)
    if plan.on_cuda != (args.device == "cuda"):
        raise SystemExit(f"--device {args.device}: this machine {'has' if plan.on_cuda else 'has no'} CUDA GPU")
    return plan


def _load_model(args: argparse.Namespace, plan, tokenizer, scratch: Path):
    import torch

    from alpaca_cot.models import load_model

    on_cuda = plan.on_cuda
    quantization_bit = plan.quantization_bit
    load_dtype = plan.precision.torch_load_dtype
    model_path = plan.model_path
    if args.arch == "llama-7b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **LLAMA_7B)
        torch.manual_seed(0)
        with torch.device("cuda" if on_cuda else "cpu"):
            model = LlamaForCausalLM(config).to(torch.float16 if quantization_bit else load_dtype)
        if quantization_bit:  # bitsandbytes quantizes at load time: go through a saved copy, as users do
            model.save_pretrained(scratch / "llama-7b")
            del model
            torch.cuda.empty_cache()
            model_path = str(scratch / "llama-7b")
        else:
            return model
    device_map = {"": 0} if on_cuda else None
    return load_model(model_path, plan.family, load_dtype, quantization_bit, device_map)


def _build(args: argparse.Namespace, plan, recipe: str, scratch: Path) -> tuple:
    """(LoRA-wrapped model, samples, training rows, collator) of one recipe: the original pads, ours packs."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from alpaca_cot.data import IGNORE_INDEX, prepare_data
    from alpaca_cot.data.packing import pack_dataset
    from alpaca_cot.train.arguments import batch_collator
    from alpaca_cot.train.recipe import load_training_tokenizer, prepare_for_training, use_cpu_fast_paths

    tokenizer = load_training_tokenizer(plan)
    data = prepare_data(list(plan.sources), tokenizer, plan.template, args.cutoff_len, 0, args.seed)
    samples = data.train.shuffle(seed=args.seed).select(range(min(args.samples, len(data.train))))
    model = _load_model(args, plan, tokenizer, scratch)
    model, _ = prepare_for_training(model, plan)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj"]))
    if recipe == "original":
        return model, samples, samples, DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                               label_pad_token_id=IGNORE_INDEX)
    if not plan.on_cuda:
        use_cpu_fast_paths(model, packing=True)
    return model, samples, pack_dataset(samples, args.cutoff_len), batch_collator(tokenizer, model, True, plan.on_cuda)


def _one(args: argparse.Namespace, recipe: str) -> dict:
    """Train one recipe for one pass over the samples; return its throughput and peak memory."""
    import logging

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from alpaca_cot.train.cpu_adapters import adapter_input_casts_off
    from alpaca_cot.train.loss import LeanLossTrainer

    logging.basicConfig(level=logging.WARNING)
    on_cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        plan = _plan(args, recipe, Path(scratch))
        fp16, bf16 = plan.precision.trainer_fp16, plan.precision.trainer_bf16
        model, samples, train, collate = _build(args, plan, recipe, Path(scratch))
        real_tokens: list[int] = []

        def counting_collate(features: list[dict]) -> dict:
            real_tokens.append(sum(len(f["input_ids"]) for f in features))
            return collate(features)

        times: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):  # noqa: D102
                if on_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

        batch = args.ours_batch if recipe != "original" and args.ours_batch else args.batch
        steps = -(-len(train) // batch)
        training_args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=batch, max_steps=steps, learning_rate=3e-4,
            fp16=fp16, bf16=bf16, use_cpu=not on_cuda, save_strategy="no", report_to=[], logging_steps=10**6,
            disable_tqdm=True, remove_unused_columns=False, seed=args.seed, dataloader_num_workers=0,
            torch_compile=recipe != "original" and args.ours_compile)
        common = dict(model=model, args=training_args, train_dataset=train, data_collator=counting_collate,
                      callbacks=[StepClock()])
        trainer = Trainer(**common) if recipe == "original" else LeanLossTrainer(**common)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        with adapter_input_casts_off(model, active=recipe != "original" and bf16 and not on_cuda):
            trainer.train()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    warm = min(args.warmup, len(times) - 2)
    timed_tokens = sum(real_tokens[warm:len(times) - 1])
    seconds = times[-1] - times[warm]
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if on_cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"recipe": recipe, "tokens_per_s": timed_tokens / seconds, "peak_mem_mb": peak_mb,
            "timed_steps": len(times) - 1 - warm, "timed_tokens": timed_tokens, "samples": len(samples),
            "rows": len(train)}


def _table(results: dict[str, dict], device: str) -> str:
    base = results["original"]["tokens_per_s"]
    lines = [f"| recipe ({device}) | steps timed | real tokens/s | peak memory MiB | speed vs original |",
             "|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['timed_steps']} | {row['tokens_per_s']:,.1f} | {row['peak_mem_mb']:,.0f} | "
                     f"{row['tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256, help="training records, the same for both recipes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", choices=["embedded", "llama-7b"], default="embedded",
                   help="embedded: the embedded SmolLM2-135M; llama-7b: random weights in Llama-7B's shape")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (and, for --arch llama-7b, tokenizer)")
    p.add_argument("--data_dir", default=str(SHARED_DATA))
    p.add_argument("--cutoff_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="rows per step (samples for the original)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--ours_batch", type=int, help="packed rows per step for ours (default: --batch)")
    p.add_argument("--ours_checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="gradient checkpointing in our recipe (auto: the library default, on for 1B+ models on CUDA)")
    p.add_argument("--ours_compile", action="store_true", help="our recipe with --torch_compile (compiled in warm-up)")
    p.add_argument("--out", help="write {original, ours, speedup} as JSON here")
    p.add_argument("--one", choices=RECIPES, help=argparse.SUPPRESS)  # what each child process runs
    return p


def main(argv: list[str] | None = None) -> int:
    """Run each recipe in its own process, print a table, optionally write JSON."""
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(_one(args, args.one)))
        return 0
    if not Path(args.data_dir).is_dir():
        print(f"error: --data_dir {args.data_dir} does not exist (the real data lives in ../shared/data)",
              file=sys.stderr)
        return 2
    passed = list(argv if argv is not None else sys.argv[1:])  # the child ignores --out
    results: dict[str, dict] = {}
    for recipe in args.recipes:
        child = subprocess.run([sys.executable, __file__, *passed, "--one", recipe], capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            print(f"error: recipe {recipe} failed", file=sys.stderr)
            return 1
        results[recipe] = json.loads(child.stdout.strip().splitlines()[-1])
    if "original" in results:
        print(_table(results, f"{args.device}, {args.arch}, {args.samples} samples"))
    if args.out:
        summary = {name: {"tokens_per_s": r["tokens_per_s"], "peak_mem_mb": r["peak_mem_mb"]}
                   for name, r in results.items()}
        if {"original", "ours"} <= results.keys():
            summary["speedup"] = results["ours"]["tokens_per_s"] / results["original"]["tokens_per_s"]
        from alpaca_cot.files import write_json_atomic

        write_json_atomic(Path(args.out), summary | {"details": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
