"""Training data: record families, readers (JSONL, BEIR, TFDS), transforms, and the input pipeline.

The record layer (this package's ``records``, ``sources``, ``beir``, ``tfds_source``, ``transforms``)
needs only numpy; TFDS support imports tensorflow-datasets when a TFDS source is opened.
"""

from qzhou_jax.data.jsonl import RecordError
from qzhou_jax.data.records import (
    DEFAULT_FIELDS, FAMILIES, BadRecords, ClassificationRecord, PairRecord, Record, RetrievalRecord,
    parse_record, record_to_dict, write_records,
)
from qzhou_jax.data.sources import JsonlSource, ListSource, Source, open_source

__all__ = [
    "FAMILIES", "DEFAULT_FIELDS", "RecordError", "Record", "RetrievalRecord", "PairRecord",
    "ClassificationRecord", "BadRecords", "parse_record", "record_to_dict", "write_records",
    "Source", "JsonlSource", "ListSource", "open_source",
]
