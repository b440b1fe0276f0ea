"""Reading data files record by record, without holding the file in memory.

Containers: a JSON array (parsed incrementally), JSON Lines (whatever the extension: several
".json" files of the collection are JSON Lines), a pretty-printed JSON object with an
``example`` list (GAOKAO-Bench), and FLAN's chain-of-thought TSV (three columns, no header,
no quoting, newlines written as the two characters ``\\n``). Every record carries its location
(``file:line``) so errors can name it.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .formats import FORMATS, ConvertContext, SourceFormat, convert_record, get_format

MAX_LISTED_PROBLEMS = 3
_CHUNK = 1 << 20
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\r\n]*")


@dataclass(frozen=True)
class RawRecord:
    """One source record as read, before conversion."""

    location: str  # "file:line" (or "file: example N")
    value: Any
    hint: str | None = None  # the format a container implies (TSV: flan_cot, {example: [...]}: gaokao)


@dataclass(frozen=True)
class ReadResult:
    """One unified record, or the reason a source record could not become one."""

    location: str
    record: dict[str, Any] | None
    error: str | None = None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError as exc:
        raise UserError(f"data file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise UserError(f"data file {path} is a folder; name the JSON/JSONL/TSV files in it") from exc


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        try:
            while True:
                chunk = f.read(4096)
                if not chunk:
                    return ""
                stripped = chunk.lstrip("\ufeff \t\r\n")
                if stripped:
                    return stripped[0]
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


class _JsonArrayReader:
    """A top-level JSON array decoded item by item from a sliding buffer: memory stays about one chunk."""

    def __init__(self, path: Path, f: Any) -> None:
        self.path, self.f = path, f
        self.buffer, self.pos, self.line, self.eof = "", 0, 1, False

    def fill(self) -> bool:
        """Read the next chunk, dropping what was decoded; False at the end of the file."""
        chunk = self.f.read(_CHUNK)
        self.eof = not chunk
        self.buffer = self.buffer[self.pos:] + chunk
        self.pos = 0
        return bool(chunk)

    def skip_space(self) -> None:
        """Move past whitespace (reading on as needed), counting lines."""
        while True:
            match = _SPACE.match(self.buffer, self.pos)
            self.line += self.buffer.count("\n", self.pos, match.end())
            self.pos = match.end()
            if self.pos < len(self.buffer) or not self.fill():
                return

    def malformed(self, what: str, line: int | None = None) -> UserError:
        """The one-line error for malformed JSON at ``line`` (default: the current one)."""
        return UserError(f"{self.path}:{line or self.line}: malformed JSON ({what}); fix that line")

    def open_array(self) -> None:
        """Move past an optional BOM and the opening bracket."""
        self.fill()
        self.skip_space()
        if self.buffer[self.pos:self.pos + 1] == "\ufeff":
            self.pos += 1
            self.skip_space()
        if self.buffer[self.pos:self.pos + 1] != "[":
            raise UserError(f"{self.path}: expected a JSON array")
        self.pos += 1

    def decode_item(self) -> tuple[Any, int]:
        """The value starting at the current position and where it ends, reading on while it is cut short."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                if not self.eof:
                    self.fill()
                    continue  # the record may continue in the next chunk: decode again
                raise self.malformed(exc.msg, self.line + self.buffer.count("\n", self.pos, exc.pos)) from exc
            if end == len(self.buffer) and not self.eof:
                self.fill()
                continue  # a number or literal cut at the chunk edge
            return value, end

    def items(self) -> Iterator[RawRecord]:
        """Each item of the array with its location (line and index: one-line arrays need the index)."""
        self.open_array()
        expect_item, count = True, 0
        while True:
            self.skip_space()
            if self.pos >= len(self.buffer):
                raise self.malformed("the array is not closed")
            if self.buffer[self.pos] == "]":
                if expect_item and count:
                    raise self.malformed("a ',' before ']'")
                return
            if self.buffer[self.pos] == "," and not expect_item:
                self.pos, expect_item = self.pos + 1, True
                continue
            if not expect_item:
                raise self.malformed("expected ',' between records")
            value, end = self.decode_item()
            yield RawRecord(f"{self.path}:{self.line}: record {count}", value)
            self.line += self.buffer.count("\n", self.pos, end)
            self.pos, count, expect_item = end, count + 1, False
            if self.pos > _CHUNK:
                self.fill()


def _iter_json_array(path: Path) -> Iterator[RawRecord]:
    """Items of a top-level JSON array, decoded one at a time from a sliding buffer."""
    with _open_text(path) as f:
        yield from _JsonArrayReader(path, f).items()


def _iter_json_lines(path: Path) -> Iterator[RawRecord]:
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield RawRecord(f"{path}:{lineno}", _Malformed(
                        f"malformed JSON Lines record ({exc.msg}); expected one JSON object per line or a JSON array"))
                    continue
                if isinstance(value, dict) and isinstance(value.get("example"), list):  # a minified GAOKAO file
                    for index, item in enumerate(value["example"]):
                        yield RawRecord(f"{path}:{lineno}: example {index}", item, hint="gaokao")
                    continue
                yield RawRecord(f"{path}:{lineno}", value)
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{lineno + 1}: not UTF-8 text; save it as UTF-8") from exc


class _Malformed:
    """A line that is not JSON: kept as a value so the caller can count it and go on."""

    def __init__(self, message: str) -> None:
        self.message = message


def _looks_like_json_lines(path: Path, probe: int = 5) -> bool:
    """Whether one of the first non-empty lines is a JSON object on its own (a malformed first line may not be)."""
    with _open_text(path) as f:
        seen = 0
        for text in f:
            if not text.strip():
                continue
            try:
                if isinstance(json.loads(text), dict):
                    return True
            except json.JSONDecodeError:
                pass
            seen += 1
            if seen >= probe:
                break
    return False


def _iter_json_object(path: Path) -> Iterator[RawRecord]:
    """A single pretty-printed JSON object: GAOKAO-Bench's ``{keywords, example: [...]}``."""
    with _open_text(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix that line") from exc
    if isinstance(value, dict) and isinstance(value.get("example"), list):
        for index, item in enumerate(value["example"]):
            yield RawRecord(f"{path}: example {index}", item, hint="gaokao")
        return
    kind = type(value).__name__ if not isinstance(value, dict) else f"dict with keys {', '.join(value) or 'none'}"
    raise UserError(f"{path}: expected a JSON array of records or JSON Lines, found a JSON {kind}")


def _iter_flan_tsv(path: Path) -> Iterator[RawRecord]:
    csv.field_size_limit(min(sys.maxsize, 1 << 31))
    with _open_text(path) as f:
        # FLAN's TSVs are not quoted: a '"' is just a character (QUOTE_NONE keeps it).
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) != 3:
                yield RawRecord(f"{path}:{lineno}", _Malformed(
                    f"has {len(row)} tab-separated columns; a FLAN CoT TSV line has 3 (question, answer, rationale)"))
                continue
            question, answer, rationale = (cell.replace("\\n", "\n") for cell in row)
            yield RawRecord(f"{path}:{lineno}", {"question": question, "answer": answer, "rationale": rationale},
                            hint="flan_cot")


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """Source records of a file in file order, whatever its container."""
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        yield from _iter_flan_tsv(path)
        return
    first = _first_char(path)
    if first == "[":
        yield from _iter_json_array(path)
    elif first == "{" and not _looks_like_json_lines(path):
        yield from _iter_json_object(path)
    elif first in ("{", ""):
        yield from _iter_json_lines(path)
    else:
        raise UserError(f"{path}: not JSON (starts with {first!r}); expected a JSON array, JSON Lines or a .tsv")


def iter_records(path: Path, fmt: str | None = None, seed: int = 0, need_output: bool = True) -> Iterator[ReadResult]:
    """Unified records of a file; a bad record yields its location and reason instead of stopping.

    ``fmt`` forces a format (a name of ``FORMATS`` or an alias); otherwise each record's keys decide.
    FLAN CoT templates are drawn from a RNG seeded with ``seed`` and the file name.
    """
    path = Path(path)
    forced: SourceFormat | None = get_format(fmt) if fmt else None
    ctx = ConvertContext(source=path.name, rng=random.Random(f"{seed}:{path.name}"), need_output=need_output)
    for raw in iter_raw_records(path):
        if isinstance(raw.value, _Malformed):
            yield ReadResult(raw.location, None, raw.value.message)
            continue
        chosen = forced or (FORMATS[raw.hint] if raw.hint else None)
        try:
            for record in convert_record(raw.value, chosen, ctx):
                yield ReadResult(raw.location, record)
        except ValueError as exc:
            yield ReadResult(raw.location, None, str(exc))


def read_records(path: Path) -> list[Any]:
    """The raw records of a file as a list (prediction echoes them back); malformed JSON names the line."""
    values = []
    for raw in iter_raw_records(Path(path)):
        if isinstance(raw.value, _Malformed):
            raise UserError(f"{raw.location}: {raw.value.message}")
        values.append(raw.value)
    return values


def problems_error(path: Path, problems: list[str], total: int, hint: str) -> UserError:
    """One line naming how many records are bad, the first few by location, and what to do."""
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    return UserError(f"{path}: {len(problems)} of {total} records are invalid: {listed}{more}; {hint}")


def load_records(path: Path, required: tuple[str, ...] = ("instruction", "output"), fmt: str | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Read and check a (small) file into a list of unified records.

    Every bad record is counted and the first few are named (by location) in one error.
    Prediction needs only ``required=("instruction",)``; a missing output becomes "".
    """
    records, problems, total = [], [], 0
    for result in iter_records(Path(path), fmt, seed, need_output="output" in required):
        total += 1
        if result.error:
            problems.append(f"{result.location.rsplit('/', 1)[-1]} {result.error}")
        else:
            records.append(result.record)
    if problems:
        needs = " and ".join(repr(k) for k in required)
        raise problems_error(path, problems, total, f"each record needs string {needs} (and optional 'input'), "
                                                    f"or one of the formats {', '.join(FORMATS)}")
    if not records:
        raise UserError(f"{path}: no records; the file is empty")
    return records
