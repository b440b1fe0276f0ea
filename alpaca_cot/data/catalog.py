"""The dataset catalog and ``--data`` resolution: names, paths, globs and mixtures.

The catalog is the data file ``data/catalog.json``, one entry per dataset of the original
collection table (plus the original's combined names): size, language / task / generation
tags, source, license where known, and where its files live in the hub dataset
``QingyiSi/Alpaca-CoT``. ``--data`` values are catalog names, files or globs, each optionally
with an amount: ``alpaca:0.5`` (a fraction of the records) or ``belle:20000`` (a count).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import UserError

HUB_DATASET = "QingyiSi/Alpaca-CoT"
DATA_SUFFIXES = (".json", ".jsonl", ".tsv")
_AMOUNT = re.compile(r"^(?P<spec>.+):(?P<amount>\d+(?:\.\d*)?|\.\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def data_dir() -> Path:
    """The data folder: ``$ALPACA_COT_DATA_DIR`` or the project's ``data/``."""
    return Path(os.environ.get("ALPACA_COT_DATA_DIR") or Path(__file__).resolve().parents[2] / "data")


def catalog_file() -> Path:
    """The catalog shipped with the project (``data/catalog.json``), wherever the data folder is."""
    return Path(__file__).resolve().parents[2] / "data" / "catalog.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One dataset of the collection (or one of the original's combined names)."""

    name: str
    records: int | None = None
    lang: tuple[str, ...] = ()  # EN, CN, ML (multilingual)
    task: tuple[str, ...] = ()  # MT (multi-task), TS (task-specific), and topics: cot, code, math, dialogue, ...
    gen: tuple[str, ...] = ()  # HG (human), SI (self-instruct), MIX, COL (collection)
    description: str = ""
    source: str = ""
    license: str | None = None
    folder: str | None = None  # folder in the hub dataset
    files: tuple[str, ...] = ()  # files in the hub dataset, where known
    combines: tuple[str, ...] = ()  # the datasets a combined name merges
    also_named: tuple[str, ...] = ()  # older file names of the same data (the original's flat layout)
    heldout: str | None = None
    make: str | None = None  # command that generates it locally (demo data)
    note: str | None = None

    @property
    def hub_patterns(self) -> list[str]:
        """What ``download`` fetches: the known files, else the whole folder."""
        if self.files:
            return list(self.files)
        return [f"{self.folder}/*"] if self.folder else []

    def matches(self, lang: str | None = None, task: str | None = None, gen: str | None = None) -> bool:
        """Whether every given tag filter is among the entry's tags (case-insensitive)."""
        for wanted, tags in ((lang, self.lang), (task, self.task), (gen, self.gen)):
            if wanted and wanted.lower() not in {t.lower() for t in tags}:
                return False
        return True


_LIST_FIELDS = {"lang", "task", "gen", "files", "combines", "also_named"}


@cache
def load_catalog() -> dict[str, CatalogEntry]:
    """Read ``catalog.json``: name -> entry; an unknown key fails naming the entry and key."""
    path = catalog_file()
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    known = {f.name for f in fields(CatalogEntry)} - {"name"}
    catalog = {}
    for name, values in raw.items():
        unknown = set(values) - known
        if unknown:
            raise UserError(f"{path}: entry {name!r} has unknown keys {', '.join(sorted(unknown))}")
        catalog[name] = CatalogEntry(name=name, **{k: tuple(v) if k in _LIST_FIELDS else v for k, v in values.items()})
    return catalog


def filter_catalog(lang: str | None = None, task: str | None = None, gen: str | None = None) -> list[CatalogEntry]:
    """Catalog entries carrying every given tag."""
    return [entry for entry in load_catalog().values() if entry.matches(lang, task, gen)]


@dataclass(frozen=True)
class DataSource:
    """One resolved ``--data`` value: its files and how much of them to use."""

    name: str  # catalog name, or the path/glob as given (without the amount)
    path: Path  # the first file (most sources have one)
    heldout: Path | None = None  # a held-out split, for datasets that ship one
    paths: tuple[Path, ...] = ()  # every file of the source
    fraction: float | None = None  # use this share of the records ...
    count: int | None = None  # ... or this many

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the source."""
        return self.paths or (self.path,)


def _suggest(name: str, catalog: dict[str, CatalogEntry]) -> str:
    """Did-you-mean, ignoring case (the table mixes ``GAOKAO``, ``dolly``, ``CodeAlpaca``)."""
    lowered = {key.lower(): key for key in catalog}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def _find_on_disk(file: str, also_named: tuple[str, ...] = ()) -> Path | None:
    root = data_dir()
    for candidate in (file, *also_named):
        for path in (root / candidate, root / Path(candidate).name):
            if path.is_file():
                return path
    # a download by other means (`hf download --include '*NAME'`) may keep another folder layout
    for candidate in (file, *also_named):
        found = next(iter(sorted(root.rglob(Path(candidate).name))), None)
        if found is not None:
            return found
    return None


def _files_of(entry: CatalogEntry) -> list[Path] | None:
    """The entry's files on disk, or ``None`` if any is missing."""
    if entry.files:
        found = [_find_on_disk(file, entry.also_named) for file in entry.files]
        return None if any(path is None for path in found) else found  # type: ignore[return-value]
    folder = data_dir() / entry.folder if entry.folder else None
    if folder is None or not folder.is_dir():
        return None
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
    return found or None


def _missing_dataset_error(entry: CatalogEntry) -> UserError:
    where = ", ".join(str(data_dir() / f) for f in entry.files) or f"{data_dir() / (entry.folder or entry.name)}/"
    if entry.make:
        how = f"generate it with `{entry.make}`"
    elif entry.hub_patterns:
        how = f"download it with `python -m alpaca_cot.data download {entry.name}`"
    else:
        how = f"it has no files in {HUB_DATASET} ({entry.note or 'listed as todo in the original table'})"
    return UserError(f"--data {entry.name}: {where} is not on disk; {how}")


def parse_data_spec(spec: str) -> tuple[str, float | None, int | None]:
    """``name:0.5`` -> (name, 0.5, None); ``name:20000`` -> (name, None, 20000); else (spec, None, None)."""
    match = _AMOUNT.match(spec)
    if match is None or Path(spec).is_file():
        return spec, None, None
    target, amount = match.group("spec"), match.group("amount")
    if "." in amount:
        fraction = float(amount)
        if not 0 < fraction <= 1:
            raise UserError(f"--data {spec}: a fraction must be in (0, 1] (got {amount}); "
                            "use a whole number for a record count")
        return target, fraction, None
    count = int(amount)
    if count < 1:
        raise UserError(f"--data {spec}: a record count must be at least 1 (got {amount})")
    return target, None, count


def _resolve_one(spec: str, catalog: dict[str, CatalogEntry]) -> DataSource:
    target, fraction, count = parse_data_spec(spec)
    if target in catalog:
        entry = catalog[target]
        if any(file.endswith(".zip") for file in entry.files):
            archive = _find_on_disk(entry.files[0])
            if archive is not None:
                raise UserError(f"--data {target}: {archive} is a zip archive; unzip it "
                                f"(`unzip {archive} -d {archive.parent}`) and pass the extracted files as a glob")
        found = _files_of(entry)
        if found is None:
            raise _missing_dataset_error(entry)
        heldout = _find_on_disk(entry.heldout) if entry.heldout else None
        return DataSource(target, found[0], heldout, tuple(found), fraction, count)
    if _GLOB_CHARS.search(target):
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(target), recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"--data {target}: the pattern matches no file")
        return DataSource(target, matched[0], None, tuple(matched), fraction, count)
    path = Path(target).expanduser()
    if path.is_file():
        return DataSource(target, path, None, (path,), fraction, count)
    if path.is_dir():
        raise UserError(f"--data {target}: is a folder; name its files or a glob such as {target.rstrip('/')}/*.json")
    if path.suffix or os.sep in target:
        raise UserError(f"--data: file {target} does not exist")
    raise UserError(
        f"--data: {target!r} is neither a dataset name nor a file{_suggest(target, catalog)}; "
        "list the names with `python -m alpaca_cot.data list`"
    )


def resolve_data(specs: list[str]) -> list[DataSource]:
    """Resolve ``--data`` values (catalog names, files, globs; each optionally ``:fraction`` or ``:count``)."""
    if not specs:
        raise UserError("--data needs at least one dataset name, file or glob")
    catalog = load_catalog()
    return [_resolve_one(spec, catalog) for spec in specs]


def download_datasets(names: list[str], local_dir: Path | None = None, revision: str | None = None) -> list[Path]:
    """Fetch catalog datasets from the hub into ``local_dir`` (default: the data folder), keeping its layout.

    Progress bars and resuming an interrupted download are huggingface_hub's.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hf_logging

    catalog = load_catalog()
    unknown = [name for name in names if name not in catalog]
    if unknown:
        raise UserError(f"download: unknown dataset {unknown[0]!r}{_suggest(unknown[0], catalog)}; "
                        "list the names with `python -m alpaca_cot.data list`")
    local_dir = Path(local_dir or data_dir())
    fetched: list[Path] = []
    for name in names:
        entry = catalog[name]
        if not entry.hub_patterns:
            raise _missing_dataset_error(entry)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "no connection"
        unreachable = UserError(
            f"download {name}: cannot reach the Hugging Face Hub ({why}); run it where the hub is reachable, "
            f"or copy {', '.join(entry.hub_patterns)} from {HUB_DATASET} into {local_dir}")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its "returning existing local_dir" warning would hide our one line
        try:
            snapshot_download(HUB_DATASET, repo_type="dataset", revision=revision, allow_patterns=entry.hub_patterns,
                              local_dir=local_dir)
        except LocalEntryNotFoundError as exc:
            raise unreachable from exc
        except HfHubHTTPError as exc:
            raise UserError(f"download {name}: the hub refused {HUB_DATASET} "
                            f"({str(exc).splitlines()[0]})") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        found = sorted(p for pattern in entry.hub_patterns for p in local_dir.glob(pattern) if p.is_file())
        if not found:  # offline, snapshot_download answers with the existing folder instead of failing
            raise unreachable
        fetched += found
    return fetched


def entry_on_disk(entry: CatalogEntry) -> bool:
    """Whether every file of the entry is in the data folder."""
    return _files_of(entry) is not None


def entry_summary(entry: CatalogEntry) -> dict[str, Any]:
    """The entry as plain data (for ``list --json``)."""
    row = {f.name: getattr(entry, f.name) for f in fields(CatalogEntry)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in row.items() if v not in (None, (), "")}
