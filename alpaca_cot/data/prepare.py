"""From ``--data`` sources to tokenized train/validation sets, without holding the data in memory.

Each file is read once into an Arrow file in the cache folder (``datasets`` memory-maps it);
mixtures, deduplication and the validation split are index selections over those files; the
tokenized sets are Arrow files named by a fingerprint of everything that decides their content
(file hashes, selection, tokenizer, template, cutoff), so a second run with the same data and
settings loads them instead of tokenizing again. ``--streaming`` reads the files lazily instead
(an ``IterableDataset``; training then needs ``--max_steps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_path
from .catalog import DataSource
from .encoding import IGNORE_INDEX, special_prefix_ids, tokenize_batch
from .records import MAX_LISTED_PROBLEMS, iter_records

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ["instruction", "input", "output", "conversation"]
PIPELINE_VERSION = "3"  # bump when reading or tokenizing changes what a cached file would hold
STREAM_SHUFFLE_BUFFER = 10_000
TOKENIZE_BATCH = 1000


def default_cache_dir() -> Path:
    """Where read and tokenized data are cached: ``$ALPACA_COT_CACHE/datasets`` or ``~/.cache/alpaca_cot/datasets``."""
    root = os.environ.get("ALPACA_COT_CACHE") or Path.home() / ".cache" / "alpaca_cot"
    return Path(root) / "datasets"


@dataclass
class DataOptions:
    """How sources become training data (the ``data`` flags of ``uniform_finetune.py``)."""

    dedup: bool = False  # --dedup: drop exact duplicate records (first occurrence kept)
    skip_bad_records: bool = False  # --skip_bad_records: count malformed records and go on
    num_proc: int | None = None  # --preprocessing_num_workers
    streaming: bool = False  # --streaming: IterableDataset, nothing materialised
    cache_dir: Path | None = None  # --data_cache_dir
    data_format: str | None = None  # --data_format: force a source format for every file

    @classmethod
    def from_args(cls, args: Any) -> DataOptions:
        """Options from parsed flags (flags another version of the parser lacks keep their defaults)."""
        cache_dir = getattr(args, "data_cache_dir", None)
        return cls(dedup=getattr(args, "dedup", False), skip_bad_records=getattr(args, "skip_bad_records", False),
                   num_proc=getattr(args, "preprocessing_num_workers", None),
                   streaming=getattr(args, "streaming", False), cache_dir=Path(cache_dir) if cache_dir else None,
                   data_format=getattr(args, "data_format", None))


@dataclass
class PreparedData:
    """Tokenized train/validation sets and what went into them."""

    train: Any  # datasets.Dataset (IterableDataset with --streaming)
    validation: Any | None
    manifest: list[dict[str, Any]]  # per source: name, files (path, sha256), records available/used
    dropped: int | None  # examples with nothing left to learn after truncation (unknown when streaming)
    example: dict[str, Any]  # the first record, to show how to query the trained model
    streaming: bool = False
    cache_hit: bool = False  # the tokenized train set came from the cache
    bad_records: int = 0
    duplicates: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # seconds spent reading and tokenizing

    @property
    def train_size(self) -> int | None:
        """Number of training examples (``None`` for a stream)."""
        return None if self.streaming else len(self.train)


def effective_val_size(requested: int, n_records: int) -> int:
    """``--val_set_size`` capped at a tenth of the data (the original crashed when it was larger)."""
    return max(0, min(requested, n_records // 10))


def file_sha256(path: Path) -> str:
    """Content hash of a data file, for the run manifest and the cache fingerprints."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _features() -> Any:
    from datasets import Features, List, Value

    turn = {"role": Value("string"), "content": Value("string")}
    return Features({"instruction": Value("string"), "input": Value("string"), "output": Value("string"),
                     "conversation": List(turn), "error": Value("string")})


def _tokenized_features() -> Any:
    """int32 ids and labels, int8 mask: a third of the disk and page cache that int64 lists would take."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
                     "labels": List(Value("int32"))})


def _generate_rows(path: str, sha256: str, data_format: str | None, seed: int, reader: str) -> Iterator[dict[str, Any]]:
    """Rows of one file; a bad record becomes a row whose ``error`` names it (``sha256``, ``reader`` key the cache)."""
    empty = {"instruction": "", "input": "", "output": "", "conversation": []}
    for result in iter_records(Path(path), data_format, seed):
        if result.error:
            yield {**empty, "error": f"{Path(result.location).name} {result.error}"}
        else:
            yield {**result.record, "error": ""}


def _reader_version() -> str:
    """Hash of the code and templates that turn files into records: a change there invalidates read caches."""
    from . import formats, records

    digest = hashlib.sha256(PIPELINE_VERSION.encode())
    for path in (Path(formats.__file__), Path(records.__file__), formats.FLAN_TEMPLATES_FILE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_file(path: Path, sha256: str, options: DataOptions, seed: int, cache_dir: Path) -> Any:
    """One file as a memory-mapped Arrow dataset (read once; later runs reuse the cached Arrow file)."""
    from datasets import Dataset

    from .formats import flan_task

    # FLAN CoT templates are drawn with the seed: only then does the seed change the records
    record_seed = seed if path.suffix.lower() == ".tsv" or flan_task(path.name) else 0
    kwargs = {"path": str(path.resolve()), "sha256": sha256, "data_format": options.data_format, "seed": record_seed,
              "reader": _reader_version()}
    try:
        return Dataset.from_generator(_generate_rows, features=_features(), gen_kwargs=kwargs,
                                      cache_dir=str(cache_dir / "read"))
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # what datasets says of a generator that yielded nothing
            raise
        raise UserError(f"{path}: holds no records; give a file with at least one instruction record "
                        "(`python -m alpaca_cot.data validate FILE` checks one)") from exc


def _record_digest(values: Any) -> bytes:
    """8-byte content hash of a record's columns: what --dedup compares."""
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _row_hashes(dataset: Any) -> Any:
    """An 8-byte content hash per row (instruction, input, output, conversation), as a numpy array."""
    import numpy as np

    hashes = np.empty(len(dataset), dtype=np.uint64)
    start = 0
    for batch in dataset.select_columns(RECORD_COLUMNS).iter(batch_size=10_000):
        for offset, row in enumerate(zip(*(batch[c] for c in RECORD_COLUMNS))):
            hashes[start + offset] = int.from_bytes(_record_digest(list(row)), "little")
        start += len(batch["instruction"])
    return hashes


def _good_indices(dataset: Any, source: DataSource, options: DataOptions) -> tuple[Any, int]:
    """Indices of the rows without an error; too many bad rows without --skip_bad_records is an error."""
    import numpy as np
    import pyarrow.compute as pc

    errors = dataset.data.column("error")
    bad_mask = pc.not_equal(errors, "").to_numpy(zero_copy_only=False)
    n_bad = int(bad_mask.sum())
    if n_bad and not options.skip_bad_records:
        first = [errors[int(i)].as_py() for i in np.flatnonzero(bad_mask)[:MAX_LISTED_PROBLEMS]]
        more = f" (and {n_bad - len(first)} more)" if n_bad > len(first) else ""
        raise UserError(f"--data {source.name}: {n_bad} of {len(dataset)} records are invalid: {'; '.join(first)}"
                        f"{more}; fix them, or pass --skip_bad_records to leave them out and count them")
    if n_bad:
        logger.warning("--data %s: %d malformed records skipped (first: %s)", source.name, n_bad,
                       errors[int(np.flatnonzero(bad_mask)[0])].as_py())
    return np.flatnonzero(~bad_mask), n_bad


def _sample(indices: Any, source: DataSource, seed: int, position: int) -> Any:
    """The records a mixture amount asks for, chosen with a RNG seeded by ``--seed`` and the source position."""
    import numpy as np

    available = len(indices)
    if source.count is not None:
        if source.count > available:
            raise UserError(f"--data {source.name}:{source.count}: the source has only {available} records; "
                            f"ask for at most {available} or a fraction such as {source.name}:0.5")
        wanted = source.count
    elif source.fraction is not None:
        wanted = max(1, round(source.fraction * available))
    else:
        return indices
    rng = np.random.default_rng([seed, position])
    return np.sort(indices[rng.choice(available, size=wanted, replace=False)])


def _tokenizer_identity(tokenizer: Any) -> str:
    """A stable hash of what decides token ids: vocabulary, special tokens, normalisation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", None)), str(getattr(tokenizer, "add_bos_token", None))]
    parts.append(backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _has_learnable(example: dict[str, Any]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def _record_of(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in RECORD_COLUMNS}


def prepare_data(
    sources: list[DataSource],
    tokenizer: Any,
    template: Any,
    cutoff_len: int,
    val_set_size: int,
    seed: int,
    options: DataOptions | None = None,
) -> PreparedData:
    """Load every source (mixture amounts, dedup), split off a validation set and tokenize with masking.

    A damaged cache (a file cut short on disk) is ours to rebuild: it is deleted and the data read again.
    """
    options = options or DataOptions()
    if options.streaming:
        return _prepare_streaming(sources, tokenizer, template, cutoff_len, val_set_size, seed, options)
    cache_dir = Path(options.cache_dir or default_cache_dir())
    try:
        return _prepare_cached(sources, tokenizer, template, cutoff_len, val_set_size, seed, options, cache_dir)
    except Exception as exc:
        damage = _cache_damage(exc)
        if damage is None:
            raise
    logger.warning("the data cache in %s is damaged (%s): rebuilding it", cache_dir, damage)
    for part in ("read", "tokenized"):
        shutil.rmtree(cache_dir / part, ignore_errors=True)
    return _prepare_cached(sources, tokenizer, template, cutoff_len, val_set_size, seed, options, cache_dir)


def _cache_damage(error: BaseException) -> str | None:
    """What pyarrow said of an unreadable cached Arrow file (our own files are read by our own readers)."""
    import pyarrow

    current: BaseException | None = error
    while current is not None:
        if isinstance(current, pyarrow.ArrowException):
            return str(current).splitlines()[0] if str(current) else type(current).__name__
        current = current.__cause__ or current.__context__
    return None


@dataclass
class _ReadRecords:
    """The sources read (from the Arrow cache), screened, deduplicated and sampled; not yet tokenized."""

    records: Any  # datasets.Dataset of the chosen records, sources concatenated
    manifest: list[dict[str, Any]]
    selections: list[str]  # per source, a hash of the chosen record indices
    bad_records: int = 0
    duplicates: int = 0


def _read_source(source: DataSource, options: DataOptions, seed: int, cache_dir: Path) -> tuple[Any, list, int]:
    """One source's files read and screened: (the usable records, the files' manifest entries, bad records)."""
    from datasets import concatenate_datasets

    files, pieces, bad = [], [], 0
    for path in source.files:
        digest = file_sha256(path)
        dataset = _read_file(path, digest, options, seed, cache_dir)
        good, n_bad = _good_indices(dataset, source, options)
        bad += n_bad
        files.append({"path": str(path), "sha256": digest, "records": int(len(good)), "bad_records": n_bad})
        pieces.append(dataset.select(good) if n_bad else dataset)
    dataset = pieces[0] if len(pieces) == 1 else concatenate_datasets(pieces)
    if len(dataset) == 0:
        raise UserError(f"--data {source.name}: no usable records in {', '.join(str(p) for p in source.files)}")
    return dataset, files, bad


def _first_occurrences(dataset: Any, seen: Any) -> tuple[Any, Any]:
    """(indices of records seen neither earlier in ``dataset`` nor in ``seen``, the hashes seen so far)."""
    import numpy as np

    hashes = _row_hashes(dataset)
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(len(dataset), dtype=bool)
    keep[first] = True
    if seen is not None:
        keep &= ~np.isin(hashes, seen)
    seen = hashes[keep] if seen is None else np.concatenate([seen, hashes[keep]])
    return np.flatnonzero(keep), seen


def _read_records(sources: list[DataSource], options: DataOptions, seed: int, cache_dir: Path) -> _ReadRecords:
    """Every source read, screened, deduplicated (``--dedup``, across sources too) and sampled to its amount."""
    import numpy as np
    from datasets import concatenate_datasets

    read = _ReadRecords(None, [], [])
    parts, seen = [], None
    for position, source in enumerate(sources):
        dataset, files, bad = _read_source(source, options, seed, cache_dir)
        available = len(dataset)
        indices = np.arange(available)
        if options.dedup:
            indices, seen = _first_occurrences(dataset, seen)
        duplicates = available - len(indices)
        if duplicates:
            logger.info("--dedup: %d duplicate records of %s removed", duplicates, source.name)
        chosen = _sample(indices, source, seed, position)
        parts.append(dataset if len(chosen) == available else dataset.select(chosen))
        read.selections.append(hashlib.sha256(np.ascontiguousarray(chosen).tobytes()).hexdigest())
        read.bad_records, read.duplicates = read.bad_records + bad, read.duplicates + duplicates
        entry = {"name": source.name, "path": str(source.files[0]), "sha256": files[0]["sha256"], "files": files,
                 "records_available": available, "records_used": int(len(chosen)), "bad_records_skipped": bad,
                 "duplicates_removed": duplicates, "records": int(len(chosen))}
        if source.fraction is not None or source.count is not None:
            entry["amount"] = source.fraction if source.fraction is not None else source.count
        read.manifest.append(entry)
    read.records = (parts[0] if len(parts) == 1 else concatenate_datasets(parts)).remove_columns(["error"])
    return read


def _learnable_train_rows(train: Any, keep_file: Path, cache_hit: bool, cutoff_len: int) -> tuple[Any, int]:
    """The train set without examples whose response starts after ``cutoff_len``, and how many were dropped."""
    import numpy as np

    if cache_hit and keep_file.is_file():
        keep = np.load(keep_file)  # a rerun does not even scan the cached labels
    else:
        keep = _learnable_rows(train)
        with atomic_path(keep_file) as partial, open(partial, "wb") as out:
            np.save(out, keep)  # to an open file: np.save would add .npy to the temporary name
    dropped = len(train) - len(keep)
    if dropped:
        logger.warning("%d examples dropped: their response starts after --cutoff_len %d", dropped, cutoff_len)
        train = train.select(keep)
    if len(train) == 0:
        raise UserError(f"--cutoff_len {cutoff_len}: no training example keeps any response token; raise it")
    return train, dropped


def _prepare_cached(sources: list[DataSource], tokenizer: Any, template: Any, cutoff_len: int,
                    val_set_size: int, seed: int, options: DataOptions, cache_dir: Path) -> PreparedData:
    """``prepare_data`` through the cache folder: read once into Arrow, tokenize once per setting."""
    import numpy as np

    started = time.perf_counter()
    read = _read_records(sources, options, seed, cache_dir)
    records = read.records
    val_size = effective_val_size(val_set_size, len(records))
    if val_size != val_set_size:
        logger.info("--val_set_size %d capped to %d (a tenth of %d records)", val_set_size, val_size, len(records))
    order = np.random.default_rng(seed).permutation(len(records))
    train_rows, val_rows = np.sort(order[val_size:]), np.sort(order[:val_size])
    prefix_ids = special_prefix_ids(tokenizer)
    key = _fingerprint(_reader_version(), options.data_format, [m["files"] for m in read.manifest],
                       read.selections, options.dedup, seed, val_size, _tokenizer_identity(tokenizer),
                       repr(template), cutoff_len, prefix_ids)
    tokenized_dir = cache_dir / "tokenized"
    tokenized_dir.mkdir(parents=True, exist_ok=True)
    read_seconds = time.perf_counter() - started

    def tokenized(rows: Any, split: str) -> tuple[Any, bool]:
        subset = records.select(rows) if len(rows) != len(records) else records
        cache_file = tokenized_dir / f"{key}-{split}.arrow"
        hit = cache_file.is_file() or any(tokenized_dir.glob(f"{key}-{split}_*_of_*.arrow"))
        mapped = subset.map(lambda batch: tokenize_batch(batch, tokenizer, template, cutoff_len, prefix_ids),
                            batched=True, batch_size=TOKENIZE_BATCH, remove_columns=RECORD_COLUMNS,
                            features=_tokenized_features(), num_proc=options.num_proc,
                            cache_file_name=str(cache_file), new_fingerprint=f"{key}-{split}",
                            desc=f"tokenizing {split}")
        return mapped, hit

    train, cache_hit = tokenized(train_rows, "train")
    train, dropped = _learnable_train_rows(train, tokenized_dir / f"{key}-train.keep.npy", cache_hit, cutoff_len)
    validation = None
    if val_size > 0:
        validation, _ = tokenized(val_rows, "validation")
        learnable = _learnable_rows(validation)
        if len(learnable) != len(validation):
            validation = validation.select(learnable)
    example = _record_of(records[int(train_rows[0])] if len(train_rows) else records[0])
    logger.info("data: %d records from %d source(s)%s; tokenized sets %s", len(records), len(sources),
                f", {read.bad_records} malformed skipped" if read.bad_records else "",
                "loaded from the cache" if cache_hit else f"cached in {tokenized_dir}")
    stats = {"read_seconds": round(read_seconds, 2),
             "tokenize_seconds": round(time.perf_counter() - started - read_seconds, 2)}
    return PreparedData(train, validation, manifest=read.manifest, dropped=dropped, example=example,
                        cache_hit=cache_hit, bad_records=read.bad_records, duplicates=read.duplicates, stats=stats)


def _learnable_rows(dataset: Any) -> Any:
    """Indices of the examples with at least one learned label, computed batch by batch in Arrow."""
    import numpy as np
    import pyarrow.compute as pc

    rows, offset = [], 0
    for batch in dataset.data.to_batches(max_chunksize=50_000):
        labels = batch.column(batch.schema.get_field_index("labels"))
        learned = pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
        rows.append(np.unique(parents[learned]) + offset)
        offset += batch.num_rows
    return np.concatenate(rows) if rows else np.arange(0)


def _stream_rows(sources: list[dict[str, Any]], data_format: str | None, seed: int, dedup: bool,
                 skip_bad_records: bool) -> Iterator[dict[str, Any]]:
    """Records of every source in order; fractions keep each record with that probability (seeded)."""
    import random

    seen: set[bytes] = set()
    for position, source in enumerate(sources):
        rng = random.Random(f"{seed}:{position}")
        used = bad = 0
        for path in source["files"]:
            for result in iter_records(Path(path), data_format, seed):
                if result.error:
                    if not skip_bad_records:
                        raise UserError(f"--data {source['name']}: {result.location} {result.error}; fix it, or "
                                        "pass --skip_bad_records to leave such records out and count them")
                    bad += 1
                    if bad == 1:
                        logger.warning("--data %s: skipping malformed records (first: %s %s)", source["name"],
                                       result.location, result.error)
                    continue
                if dedup:
                    digest = _record_digest([result.record[c] for c in RECORD_COLUMNS])
                    if digest in seen:
                        continue
                    seen.add(digest)
                if source["fraction"] is not None and rng.random() >= source["fraction"]:
                    continue
                if source["count"] is not None and used >= source["count"]:
                    break
                used += 1
                yield {key: result.record[key] for key in RECORD_COLUMNS}
            if source["count"] is not None and used >= source["count"]:
                break


def _prepare_streaming(sources: list[DataSource], tokenizer: Any, template: Any, cutoff_len: int,
                       val_set_size: int, seed: int, options: DataOptions) -> PreparedData:
    """An IterableDataset read lazily; the first ``val_set_size`` records form the validation set."""
    from datasets import Dataset, IterableDataset

    features = _features()
    features.pop("error")
    plan = [{"name": s.name, "files": [str(p) for p in s.files], "fraction": s.fraction, "count": s.count}
            for s in sources]
    kwargs = {"sources": plan, "data_format": options.data_format, "seed": seed, "dedup": options.dedup,
              "skip_bad_records": options.skip_bad_records}
    stream = IterableDataset.from_generator(_stream_rows, features=features, gen_kwargs=kwargs)
    head = list(stream.take(val_set_size + 1))
    if not head:
        raise UserError(f"--data {' '.join(s.name for s in sources)}: no usable records")
    if len(head) <= val_set_size:  # the whole stream is shorter: cap the split as for map-style data
        val_set_size = effective_val_size(val_set_size, len(head))
        head = head[:val_set_size] or head[:1]
    prefix_ids = special_prefix_ids(tokenizer)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        return tokenize_batch(batch, tokenizer, template, cutoff_len, prefix_ids)

    validation = None
    if val_set_size > 0:
        validation = Dataset.from_list(head[:val_set_size], features=features)
        validation = validation.map(tokenize, batched=True, remove_columns=RECORD_COLUMNS).filter(_has_learnable)
        stream = stream.skip(val_set_size)
    train = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    train = train.map(tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=RECORD_COLUMNS)
    train = train.filter(_has_learnable)
    manifest = [{"name": s.name, "path": str(s.files[0]), "files": [{"path": str(p)} for p in s.files],
                 "sha256": None, "records_available": None, "records_used": None, "streaming": True,
                 **({"amount": s.fraction if s.fraction is not None else s.count}
                    if s.fraction is not None or s.count is not None else {})} for s in sources]
    return PreparedData(train, validation, manifest, None, head[0], streaming=True)
