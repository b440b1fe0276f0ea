"""Evaluate a fine-tuned adapter (or a base model alone) on a benchmark file.

    python evaluate.py --lora_dir saved_models/demo --task math --data data/demo/demo_heldout.json \\
        --output_dir eval/demo-math
    python evaluate.py --model_name_or_path smollm2-135m-instruct --task choice \\
        --data ../shared/data/gaokao_bench/Objective_Questions/2010-2022_Math_I_MCQs.json --output_dir eval/gaokao
    python evaluate.py --lora_dir saved_models/demo --task judge --data belle_eval_set.json --output_dir eval/belle \\
        --judge_url https://api.openai.com/v1 --judge_model gpt-4o-mini     # key from $OPENAI_API_KEY

Tasks: choice (multiple-choice accuracy: option-letter likelihood, or --generate and parse the letter),
math (exact match of the final number; --cot_cue appends a chain-of-thought cue), judge (Belle-eval answers
scored 0-1 by a judge model behind an OpenAI-compatible endpoint; replies cached on disk).
Writes results.jsonl, summary.json, summary.md and by_category.png into --output_dir; rerun the same
command after an interruption to continue where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from alpaca_cot.cli import ArgumentParser, add_generation_arguments, add_model_arguments, run_cli
from alpaca_cot.eval.tasks import TASKS, EvalTask
from alpaca_cot.presets import GENERATION_FLAGS

GENERATION_KEYS = ("do_sample", *GENERATION_FLAGS)  # recorded in eval_settings.json
DEFAULT_JUDGE_CACHE = Path.home() / ".cache" / "alpaca_cot" / "judge_cache.jsonl"


def _names(which: Callable[[EvalTask], bool]) -> str:
    """The names of the task rows ``which`` picks, for help texts: "choice", "math/judge"."""
    return "/".join(task.name for task in TASKS.values() if which(task))


def build_parser() -> argparse.ArgumentParser:
    """Flags: model, task and data, output folder, task switches, judge endpoint, generation settings."""
    p = ArgumentParser(prog="evaluate.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    g.add_argument("--data", required=True, help="benchmark file (JSON, JSON Lines or CSV) or GAOKAO-Bench folder")
    g.add_argument("--output_dir", required=True, help="folder for results.jsonl and the summary (resumed if present)")
    g.add_argument("--limit", type=int, help="evaluate only the first N records")
    g.add_argument("--generate", action="store_true",
                   help=f"{_names(lambda t: not t.generates)}: generate an answer and parse its letter")
    g.add_argument("--cot_cue", default="", help=f"{_names(lambda t: t.takes_cue)}: appended to each instruction, "
                   "e.g. \"Let's think step by step.\" or the paper's \"先思考，再决定\"")
    g.add_argument("--eval_batch_size", type=int, default=8, help="records scored together")
    g.add_argument("--cutoff_len", type=int, default=1024, help="longest prompt in tokens (the end is kept)")
    g = p.add_argument_group(f"judge (task {_names(lambda t: t.needs_judge)})")
    g.add_argument("--judge_url", help="OpenAI-compatible base URL (…/v1) or …/v1/chat/completions")
    g.add_argument("--judge_model", default="gpt-4o-mini", help="model name sent to the judge endpoint")
    g.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    g.add_argument("--judge_cache", default=str(DEFAULT_JUDGE_CACHE), help="JSON Lines cache of judge replies")
    g.add_argument("--judge_retries", type=int, default=5, help="retries of a failed request (exponential backoff)")
    g.add_argument("--judge_max_tokens", type=int, default=256, help="longest judge reply")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Check flags, read the data, load the model once, evaluate and print the summary table."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.checks import check_evaluate_flags
        from alpaca_cot.eval.judge import JudgeClient
        from alpaca_cot.eval.runner import evaluate_items, load_items
        from alpaca_cot.eval.tasks import EvalOptions
        from alpaca_cot.infer.generation import generation_config_from_args
        from alpaca_cot.infer.loading import load_from_args

        check_evaluate_flags(args, TASKS)
        task = TASKS[args.task]
        # Data mistakes surface before the model loads.
        items = load_items(args.task, Path(args.data), args.limit, args.generate)
        judge = None
        if task.needs_judge:
            judge = JudgeClient(args.judge_url, args.judge_model, Path(args.judge_cache),
                                os.environ.get(args.judge_api_key_env), args.judge_max_tokens, args.judge_retries)
        loaded = load_from_args(args)
        options = EvalOptions(generation_config_from_args(loaded, args), args.generate, args.cot_cue,
                              args.eval_batch_size, args.cutoff_len, judge)
        model = args.lora_dir or loaded.base_model
        settings = {"task": args.task, "data": str(Path(args.data).resolve()), "model": model,
                    "base_model": loaded.base_model, "template": loaded.template.name,
                    "scoring": "generate" if task.generating(args.generate) else "likelihood",
                    "cot_cue": args.cot_cue,
                    "generation": {k: getattr(options.generation_config, k, None) for k in GENERATION_KEYS},
                    "judge_model": args.judge_model if judge else None}
        title = f"{args.task} on {Path(args.data).name}: {model}" + (f" + cue {args.cot_cue!r}" if args.cot_cue else "")
        run = evaluate_items(loaded, args.task, items, Path(args.output_dir), options, settings, title)
        resumed = f" (resumed after {run.already_done})" if run.already_done else ""
        metric = run.summary["metric"]
        value = run.summary[metric]
        print(f"evaluated {run.evaluated} records{resumed} in {run.seconds:.0f} s; "
              f"{metric} {'n/a' if value is None else f'{value:.4f}'} over {run.summary['records']} records")
        if judge:
            print(f"judge: {judge.requests} requests, {judge.cache_hits} answered from the cache {args.judge_cache}")
        print((Path(args.output_dir) / "summary.md").read_text(encoding="utf-8"))
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
