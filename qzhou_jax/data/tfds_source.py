"""TensorFlow Datasets as record sources, through ``tfds.data_source`` (random access, no TensorFlow).

tensorflow-datasets is an optional dependency: ``pip install "qzhou-jax[tfds]"``. It is imported when a
``TfdsSource`` is built, never when this module is. The dataset must have been prepared in the
ArrayRecord file format (``tfds build --file_format=array_record`` or ``download_and_prepare``
with that format), which is what ``tfds.data_source`` reads.

Values are decoded to plain Python: bytes to str (UTF-8), numpy scalars to numbers, arrays of
strings to lists of str, so fields map exactly like JSONL fields. For classification, an integer label
of a ``ClassLabel`` feature becomes its class name ("World" rather than "0") when the dataset info
carries the names.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np

from qzhou_jax.data.records import (
    DEFAULT_FIELDS, FAMILIES, BadRecords, Record, RecordError, parse_record, resolve_fields,
)
from qzhou_jax.data.sources import ScanKeys, list_index

__all__ = ["TfdsSource", "import_tfds", "to_python"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'reading TFDS datasets needs tensorflow-datasets: pip install "qzhou-jax[tfds]"'


def import_tfds():
    """``tensorflow_datasets``, or an ImportError saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return tfds


def to_python(value: Any, where: str = "", name: str = "") -> Any:
    """Decode a TFDS value: bytes -> str, numpy scalars -> Python numbers, arrays -> lists, dicts recursively."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: field {name!r}: not valid UTF-8 (byte {e.start})") from None
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return to_python(value[()], where, name)
        return [to_python(v, where, name) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: to_python(v, where, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v, where, name) for v in value]
    return value


class TfdsSource:
    """Records of one family from a TFDS split, read by index with ``tfds.data_source``.

    ``name`` is the TFDS dataset name ("glue/stsb", "ag_news_subset:1.0.0"); ``fields`` maps our field
    names to the dataset's features as for JSONL. Like ``JsonlSource``, the constructor reads and
    validates every example once (errors name "tfds:NAME/SPLIT[i]" and the field), keeps the indices of
    the good ones (``skip_bad_records``) and, for classification, ``labels``/``label_names``. The data
    source itself is reopened lazily after unpickling (grain worker processes).
    """

    def __init__(self, name: str, split: str, family: str, fields: Mapping[str, str] | None = None,
                 data_dir: str | os.PathLike | None = None, skip_bad_records: bool = False,
                 source_name: str | None = None):
        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")
        self.tfds_name = name
        self.split = split
        self.family = family
        self.fields = resolve_fields(DEFAULT_FIELDS[family], fields, family)
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.name = source_name or f"{name}/{split}"
        self._where = f"tfds:{name}/{split}"
        self._ds = None
        self.labels: np.ndarray | None = None
        self.text_keys: np.ndarray | None = None
        self.label_names: list[str] | None = None
        self.query_positives = None
        self.instructions: dict[str, int] = {}
        self.instructions_capped = False
        self.records_with_instruction = 0
        self._class_names = self._label_class_names()
        self._scan(BadRecords(skip=skip_bad_records))

    def _source(self):
        if self._ds is None:
            tfds = import_tfds()
            self._ds = tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir)
        return self._ds

    def _label_class_names(self) -> list[str] | None:
        """Class names of the label feature when it is a ClassLabel (from the data source's dataset info)."""
        if self.family != "classification":
            return None
        info = getattr(self._source(), "dataset_info", None)
        features = getattr(info, "features", None)
        try:
            feature = features[self.fields["label"]] if features is not None else None
        except (KeyError, TypeError):
            return None
        names = getattr(feature, "names", None)
        return [str(n) for n in names] if names else None

    def _parse(self, k: int) -> Record:
        where = f"{self._where}[{k}]"
        obj = to_python(self._source()[k], where)
        if self._class_names is not None and isinstance(obj, dict):
            label = obj.get(self.fields["label"])
            if isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < len(self._class_names):
                    raise RecordError(f"{where}: field {self.fields['label']!r}: class id {label} out of range "
                                      f"(the ClassLabel has {len(self._class_names)} names)")
                obj = {**obj, self.fields["label"]: self._class_names[label]}
        return parse_record(obj, self.family, self.fields, where)

    def _scan(self, errors: BadRecords) -> None:
        n = len(self._source())
        good = np.empty(n, dtype=np.int64)
        keys = ScanKeys(self.family)
        count = 0
        for k in range(n):
            try:
                record = self._parse(k)
            except RecordError as e:
                errors.handle(e)
                continue
            good[count] = k
            count += 1
            keys.add(record)
        self.skipped = errors.count
        errors.warn(self._where, log)
        if count == 0:
            why = f"all {errors.count} examples are bad" if errors.count else "empty split"
            raise RecordError(f"{self._where}: no records ({why})")
        self._index = good[:count] if count < n else None  # None: identity
        self._len = count
        keys.attach(self)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        j = list_index(i, self._len)
        return self._parse(int(self._index[j]) if self._index is not None else j)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ds"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.tfds_name!r}, split={self.split!r}, family={self.family!r}, records={len(self)})"
