"""Batch prediction into JSON Lines that survives interruption.

Each input record comes back as one output line: the record plus a ``generate``
field, in input order. Lines are appended and synced batch by batch; a rerun
keeps every complete line, drops a torn last one, and continues after it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import load_records, read_records, record_to_messages
from ..errors import UserError
from ..files import JsonlAppender, check_writable_location, read_done
from .generation import generate_batch, prompt_ids
from .loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class PredictionStats:
    """What a prediction run did."""

    total: int
    already_done: int
    written: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def count_finished(result_path: Path, records: list[dict[str, Any]]) -> int:
    """Number of complete result lines that match the input; a torn last line is cut off."""
    finished = read_done(result_path, "--result_dir")
    for number, done in enumerate(finished):
        if number >= len(records) or done.get("instruction") != records[number].get("instruction"):
            raise UserError(f"--result_dir: {result_path} holds results of other data (line {number + 1}); "
                            "choose a new --result_dir")
    return len(finished)


def predict_file(
    loaded: LoadedModel,
    data_path: Path,
    result_path: Path,
    generation_config: Any,
    batch_size: int = 16,
    cutoff_len: int = 512,
) -> PredictionStats:
    """Answer every record of ``data_path`` into ``result_path``, resuming a previous run."""
    from tqdm.auto import tqdm

    check_writable_location("--result_dir", result_path, folder=False)
    if result_path.exists() and result_path.resolve() == data_path.resolve():
        raise UserError(f"--result_dir: {result_path} is the --data file itself; write results to a new file")
    records = load_records(data_path, required=("instruction",))
    raw = read_records(data_path)  # echoed back unchanged, extra fields included
    done = count_finished(result_path, raw)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    started, written = time.time(), 0
    bar = tqdm(total=len(records), initial=done, desc="predicting", disable=not sys.stderr.isatty())
    with JsonlAppender(result_path) as out:
        for start in range(done, len(records), batch_size):
            batch = records[start:start + batch_size]
            prompts = []
            for record in batch:
                messages, input_text = record_to_messages(record)
                ids = prompt_ids(loaded, messages[:-1], input_text)
                prompts.append(ids[-cutoff_len:])  # keep the end: the question is what must be answered
            answers = generate_batch(loaded, prompts, generation_config, batch_size=len(batch))
            out.write({**raw[start + i], "generate": text} for i, text in enumerate(answers))  # synced
            written += len(batch)
            bar.update(len(batch))
    bar.close()
    return PredictionStats(len(records), done, written, time.time() - started)
