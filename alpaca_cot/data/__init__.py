"""Instruction data: the catalog, every source format, mixing sources, tokenizing with masked prompts, packing.

``python -m alpaca_cot.data`` lists, downloads, converts and validates datasets (see ``commands``).
"""

from .encoding import (
    IGNORE_INDEX,
    encode_conversation,
    encode_segments,
    record_to_messages,
    special_prefix_ids,
    tokenize_batch,
    tokenize_record,
)
from .prepare import (
    DataOptions,
    PreparedData,
    default_cache_dir,
    effective_val_size,
    file_sha256,
    prepare_data,
)
from .records import iter_records, load_records, read_records

__all__ = [
    "IGNORE_INDEX", "DataOptions", "PreparedData", "default_cache_dir", "effective_val_size",
    "encode_conversation", "encode_segments", "file_sha256", "iter_records", "load_records", "prepare_data",
    "read_records", "record_to_messages", "special_prefix_ids", "tokenize_batch", "tokenize_record",
]
