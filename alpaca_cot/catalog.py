"""The dataset catalog: registered ``--data`` names and where their files live.

The catalog is the data file ``data/catalog.json`` (one entry per dataset). A
name resolves to a file under the data folder; if it is not on disk the error
says which file is expected where and how to get it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import UserError, did_you_mean

HUB_DATASET = "QingyiSi/Alpaca-CoT"


def data_dir() -> Path:
    """The data folder: ``$ALPACA_COT_DATA_DIR`` or the project's ``data/``."""
    return Path(os.environ.get("ALPACA_COT_DATA_DIR") or Path(__file__).resolve().parent.parent / "data")


@dataclass(frozen=True)
class DataSource:
    """One resolved ``--data`` entry."""

    name: str  # catalog name, or the path as given
    path: Path
    heldout: Path | None = None  # a held-out split, for datasets that ship one


@cache
def load_catalog() -> dict[str, dict]:
    """Read ``catalog.json``: name -> entry (``file``, tags, source, license, ...)."""
    path = data_dir() / "catalog.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _find_on_disk(file: str) -> Path | None:
    root = data_dir()
    direct = root / file
    if direct.is_file():
        return direct
    # `hf download --include '*NAME'` keeps the hub's folder layout under data/
    return next(iter(sorted(root.rglob(Path(file).name))), None)


def _missing_dataset_error(name: str, entry: dict) -> UserError:
    expected = data_dir() / entry["file"]
    if "make" in entry:
        how = f"generate it with `{entry['make']}`"
    else:
        how = (
            f"download it with `hf download {HUB_DATASET} --repo-type dataset "
            f"--include '*{Path(entry['file']).name}' --local-dir {data_dir()}`"
        )
    return UserError(f"--data {name}: {expected} is not on disk; {how}")


def resolve_data(specs: list[str]) -> list[DataSource]:
    """Resolve ``--data`` values (catalog names or file paths) to files on disk."""
    catalog = load_catalog()
    sources = []
    for spec in specs:
        if spec in catalog:
            entry = catalog[spec]
            path = _find_on_disk(entry["file"])
            if path is None:
                raise _missing_dataset_error(spec, entry)
            heldout = _find_on_disk(entry["heldout"]) if "heldout" in entry else None
            sources.append(DataSource(spec, path, heldout))
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            sources.append(DataSource(spec, path))
        elif path.suffix or os.sep in spec:
            raise UserError(f"--data: file {spec} does not exist")
        else:
            raise UserError(
                f"--data: {spec!r} is neither a dataset name nor a file{did_you_mean(spec, catalog)}; "
                f"names: {', '.join(catalog)}"
            )
    return sources
