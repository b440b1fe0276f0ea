"""``python -m alpaca_cot.data``: list, download, convert and validate instruction datasets.

    python -m alpaca_cot.data list [--lang CN] [--task cot] [--gen SI] [--json]
    python -m alpaca_cot.data download NAME... [--local_dir DIR] [--revision REV]
    python -m alpaca_cot.data convert [--from FORMAT] IN OUT
    python -m alpaca_cot.data validate FILE [--from FORMAT] [--model NAME_OR_PATH] [--cutoff_len N]

Results go to stdout, logs and errors to stderr; a mistake is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, UserError
from ..files import atomic_path, check_new_file
from .catalog import HUB_DATASET, data_dir, download_datasets, entry_on_disk, entry_summary, filter_catalog
from .formats import FORMAT_ALIASES, FORMATS
from .records import MAX_LISTED_PROBLEMS, iter_records

PERCENTILES = (50, 90, 99)


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands and their flags."""
    p = ArgumentParser(prog="python -m alpaca_cot.data", description="List, download, convert and "
                                "validate instruction datasets.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="print the catalog (filter by tags)")
    s.add_argument("--lang", help="language tag: EN, CN, ML")
    s.add_argument("--task", help="task tag: MT, TS, cot, code, math, dialogue, multi-turn, finance, medical, ...")
    s.add_argument("--gen", help="generation tag: HG, SI, MIX, COL")
    s.add_argument("--json", action="store_true", help="one JSON object per dataset instead of a table")
    s = sub.add_parser("download", help=f"fetch datasets from the hub dataset {HUB_DATASET} into data/")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.add_argument("--local_dir", help="download folder (default: the data folder, keeping the hub's layout)")
    s.add_argument("--revision", help="hub revision (branch, tag or commit)")
    formats = ", ".join(list(FORMATS) + list(FORMAT_ALIASES))
    s = sub.add_parser("convert", help="write a file in any source format as unified records")
    s.add_argument("input", metavar="IN")
    s.add_argument("output", metavar="OUT", help=".jsonl: JSON Lines; .json: a JSON array")
    s.add_argument("--from", dest="source_format", metavar="FORMAT", help=f"one of {formats} (default: detected)")
    s.add_argument("--seed", type=int, default=42, help="seed of the FLAN CoT template choice")
    s.add_argument("--skip_bad_records", action="store_true", help="leave out malformed records and count them")
    s = sub.add_parser("validate", help="report records, problems, duplicates and token lengths of a file")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--from", dest="source_format", metavar="FORMAT", help=f"one of {formats} (default: detected)")
    s.add_argument("--model", help="tokenizer of this model for token lengths (default: none, lengths skipped)")
    s.add_argument("--template", help="prompt template (default: the model family's)")
    s.add_argument("--cutoff_len", type=int, default=512, help="count examples longer than this")
    s.add_argument("--trust_remote_code", action="store_true")
    return p


def list_datasets(args: argparse.Namespace) -> int:
    entries = filter_catalog(args.lang, args.task, args.gen)
    if not entries:
        raise UserError(f"list: no dataset has all the tags {[t for t in (args.lang, args.task, args.gen) if t]}")
    if args.json:
        for entry in entries:
            print(json.dumps({**entry_summary(entry), "on_disk": entry_on_disk(entry)}, ensure_ascii=False))
        return 0
    rows = [("name", "records", "lang", "task", "gen", f"files in {HUB_DATASET}", "license", "local")]
    for e in entries:
        where = e.files[0] if e.files else (f"{e.folder}/" if e.folder else "-")
        where += f" (+{len(e.files) - 1} more)" if len(e.files) > 1 else ""
        rows.append((e.name, f"{e.records:,}" if e.records else "-", "/".join(e.lang) or "-",
                     "/".join(e.task) or "-", "/".join(e.gen) or "-", where, e.license or "-",
                     "yes" if entry_on_disk(e) else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\n{len(entries)} datasets; fetch with `python -m alpaca_cot.data download NAME`, train with "
          "`--data NAME` (or NAME:0.5, NAME:20000)")
    return 0


def download(args: argparse.Namespace) -> int:
    for path in download_datasets(args.names, Path(args.local_dir) if args.local_dir else None, args.revision):
        print(path)
    return 0


def convert(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if source.resolve() == target.resolve():
        raise UserError(f"convert: OUT must differ from IN ({source})")
    check_new_file("convert: OUT", target)
    as_array = target.suffix.lower() == ".json"
    target.parent.mkdir(parents=True, exist_ok=True)
    written, problems, total = 0, [], 0
    with atomic_path(target) as temporary:  # no half-written OUT, whatever stops the conversion
        with open(temporary, "w", encoding="utf-8") as out:
            out.write("[\n" if as_array else "")
            for result in iter_records(source, args.source_format, args.seed):
                total += 1
                if result.error:
                    problems.append(f"{result.location} {result.error}")
                    if not args.skip_bad_records:
                        raise UserError(f"convert: {result.location} {result.error}; fix it, or pass "
                                        "--skip_bad_records to leave such records out and count them")
                    continue
                line = json.dumps(result.record, ensure_ascii=False)
                out.write((",\n" if as_array and written else "") + line + ("" if as_array else "\n"))
                written += 1
            out.write("\n]\n" if as_array else "")
        if written == 0:
            raise UserError(f"convert: {source} holds no usable records")
    skipped = f"; {len(problems)} malformed records skipped (first: {problems[0]})" if problems else ""
    print(f"{written} records from {total} source records written to {target}{skipped}")
    return 0


def _load_tokenizer_and_template(model: str, template_name: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    from ..models import load_tokenizer, resolve_family, resolve_model_path, resolve_template

    path = resolve_model_path(model)
    family = resolve_family(None, path)
    return load_tokenizer(path, family, trust_remote_code), resolve_template(template_name, family)


def validate(args: argparse.Namespace) -> int:
    import numpy as np

    from .encoding import special_prefix_ids, tokenize_record

    tokenizer = template = None
    if args.model:
        tokenizer, template = _load_tokenizer_and_template(args.model, args.template, args.trust_remote_code)
        prefix_ids = special_prefix_ids(tokenizer)
    total = good = duplicates = 0
    problems: list[str] = []
    empty = {"instruction": 0, "input": 0, "output": 0}
    seen: set[bytes] = set()
    lengths: list[int] = []
    for result in iter_records(Path(args.file), args.source_format):
        total += 1
        if result.error:
            problems.append(f"{result.location} {result.error}")
            continue
        good += 1
        record = result.record
        for key in empty:
            empty[key] += not record[key].strip()
        digest = hashlib.blake2b(json.dumps(record, ensure_ascii=False, sort_keys=True).encode(),
                                 digest_size=8).digest()
        duplicates += digest in seen
        seen.add(digest)
        if tokenizer is not None:
            lengths.append(len(tokenize_record(record, tokenizer, template, sys.maxsize, prefix_ids)["input_ids"]))
    report: dict[str, Any] = {"file": args.file, "source_records": total, "records": good,
                              "malformed": len(problems), "first_problems": problems[:MAX_LISTED_PROBLEMS],
                              "empty_fields": empty, "exact_duplicates": duplicates}
    if lengths:
        values = np.array(lengths)
        report["tokens"] = {"model": args.model, "template": template.name, "mean": round(float(values.mean()), 1),
                            **{f"p{q}": int(np.percentile(values, q)) for q in PERCENTILES}, "max": int(values.max()),
                            "over_cutoff_len": int((values > args.cutoff_len).sum()), "cutoff_len": args.cutoff_len}
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0 if not problems and good else 1


COMMANDS = {"list": list_datasets, "download": download, "convert": convert, "validate": validate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m alpaca_cot.data``."""
    args = build_parser().parse_args(argv)
    if args.command in ("convert", "validate") and args.source_format:
        from .formats import get_format

        get_format(args.source_format)
    if args.command == "validate" and args.cutoff_len < 1:
        raise UserError(f"--cutoff_len must be at least 1 (got {args.cutoff_len})")
    if args.command == "list" and not data_dir().is_dir():
        raise UserError(f"data folder {data_dir()} does not exist (set ALPACA_COT_DATA_DIR)")
    return COMMANDS[args.command](args)
