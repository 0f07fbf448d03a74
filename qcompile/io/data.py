"""Calibration and evaluation batches: where they come from, and checks against the model inputs.

A source is a directory of ``.npz`` files (one batch per file, keys = model input names) or any
iterable of ``{input_name: array}`` dicts. Batches stream: nothing here holds more than one
batch, except up to ``eval_batches`` held-out batches when the source can only be read once.
"""

from __future__ import annotations

__all__ = ["BatchSource", "InputSpec", "check_npz_headers", "input_specs", "npz_headers", "read_items", "read_npz"]

import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.errors import CalibrationDataError
from qcompile.io.causal_lm import fill_inputs

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input: numpy dtype and shape (str/None for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value in model.graph.initializers.values():
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else None
        shape = None
        if value.shape is not None:
            shape = tuple(_declared_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _declared_dim(dim) -> int | str | None:
    """A declared input dimension: a positive int is fixed; a dim_param is named and dynamic; -1, 0
    (some exporters write these for "dynamic") and an absent dim are dynamic."""
    if isinstance(dim, int):
        return dim if dim > 0 else None
    return str(dim) if dim is not None and str(dim) else None


def _describe(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _empty_along_dynamic_axes(array: np.ndarray, spec: InputSpec) -> bool:
    """Whether an empty array is a meaningful input: samples (axis 0) with nothing along a declared
    dynamic axis, such as a language model's past key/values on a first call (length 0)."""
    if spec.shape is None or array.ndim != len(spec.shape) or array.ndim < 2 or array.shape[0] == 0:
        return False
    return all(not isinstance(spec.shape[axis], int) for axis, size in enumerate(array.shape) if size == 0)


def validate_batch(batch: Any, specs: list[InputSpec], where: str, *, values: bool = True) -> Batch:
    """Check one batch against the model inputs; return it as a dict of arrays. ``values`` False:
    names, dtypes and shapes only (for arrays described by their .npy headers, not yet read)."""
    if not isinstance(batch, Mapping):
        raise CalibrationDataError(
            f"{where} is a {type(batch).__name__}, not a mapping. Each batch must be a dict "
            "{input_name: numpy array}."
        )
    batch = fill_inputs(batch, specs)  # a language model's position_ids and empty past, from input_ids
    expected = {s.name for s in specs}
    missing = expected - set(batch)
    unknown = set(batch) - expected
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {sorted(missing)}")
        if unknown:
            parts.append(f"unknown name(s) {sorted(unknown)}")
        raise CalibrationDataError(
            f"{where} has {' and '.join(parts)}. The model's inputs are {sorted(expected)}; "
            "name the arrays exactly like them."
        )
    result = {}
    for spec in specs:
        try:
            array = np.asarray(batch[spec.name])
        except (TypeError, ValueError) as error:  # ragged nested lists, objects numpy cannot convert
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} is not an array numpy can build ({error}). Pass a "
                "numpy array of the input's shape."
            ) from None
        if spec.dtype is not None and spec.dtype.kind == "O":
            # A string input: ONNX Runtime takes numpy str, bytes or object arrays of str.
            if array.dtype.kind not in "USO":
                raise CalibrationDataError(
                    f"{where}: input {spec.name!r} is a string input but has dtype {array.dtype}. "
                    "Pass an array of str, e.g. np.array(['text', ...])."
                )
        elif spec.dtype is not None and array.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has dtype {array.dtype} but the model expects "
                f"{spec.dtype}. Convert it, e.g. array.astype(np.{spec.dtype.name})."
            )
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"{where}: input {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}) "
                    f"but the model expects rank {len(spec.shape)} (shape {_describe(spec.shape)})."
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if isinstance(want, int) and got != want:
                    raise CalibrationDataError(
                        f"{where}: input {spec.name!r} has shape {list(array.shape)} but the model "
                        f"expects {_describe(spec.shape)} (axis {axis} must be {want})."
                    )
        if array.size == 0 and not _empty_along_dynamic_axes(array, spec):
            raise CalibrationDataError(f"{where}: input {spec.name!r} is empty (shape {list(array.shape)}).")
        if values and array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} contains {bad} NaN/Inf value(s). Calibration data must "
                "be finite: clean or drop this batch."
            )
        result[spec.name] = array
    return result


class BatchSource:
    """Splits a data source into calibration batches and held-out evaluation batches.

    Every ``holdout_every``-th batch (up to ``max_eval`` of them) is held out for evaluation when
    there is no separate evaluation set. A directory or a list is read again for each use; a
    one-shot iterator is read once, and its held-out batches are kept from that read.
    """

    def __init__(
        self,
        source: str | Path | Iterable[Mapping[str, Any]],
        specs: list[InputSpec],
        *,
        eval_source: str | Path | Iterable[Mapping[str, Any]] | None = None,
        max_eval: int = 8,
        holdout_every: int = 10,
    ):
        self.specs = specs
        self.description, self._open = self._opener(source, "calibration data", specs)
        # What a worker can read by itself: the .npz paths of a directory, the batches of a list.
        self._items = _shardable_items(source)
        # A directory or a list can be read by more than one pass; a one-shot iterator cannot.
        self.rereadable = isinstance(source, (str, Path, list, tuple))
        self._eval = None
        if eval_source is not None:
            self._eval = self._opener(eval_source, "evaluation data", specs)
        self.max_eval = max_eval
        self.holdout_every = holdout_every
        self._held_out: list[Batch] = []
        self.calibration_batches = 0

    @staticmethod
    def _opener(source, label: str, specs: list[InputSpec] | None = None):
        if isinstance(source, (str, Path)):
            directory = Path(source)
            if not directory.is_dir():
                what = "is a file, not a directory" if directory.exists() else "is not a directory"
                raise CalibrationDataError(
                    f"{label}: {str(directory)!r} {what}. Pass a directory of .npz files "
                    "(one batch per file, keys = model input names)."
                )
            files = sorted(p for p in directory.glob("*.npz") if p.is_file())
            if not files:
                others = sorted(p.name for p in directory.iterdir())
                found = (
                    f" (it has {len(others)} other entries: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
                    if others else " (it is empty)"
                )
                raise CalibrationDataError(
                    f"{label}: directory {str(directory)!r} has no .npz files{found}. Save each batch "
                    "with numpy.savez(path, **{input_name: array})."
                )
            return f"{len(files)} .npz files in {directory}", lambda: _read_npz_files(files, specs)
        if isinstance(source, Mapping):
            raise CalibrationDataError(
                f"{label} is a single mapping; pass an iterable of batches, e.g. [batch]."
            )
        if isinstance(source, (list, tuple)):
            items = list(source)
            return f"{len(items)} in-memory batches", lambda: (
                (f"batch {i}", b) for i, b in enumerate(items)
            )
        if isinstance(source, Iterable):
            iterator = iter(source)
            used = []

            def once():
                if used:
                    raise CalibrationDataError(
                        f"{label} is a one-shot iterator and was already consumed. Pass a list or a "
                        "directory to read it more than once."
                    )
                used.append(True)
                return ((f"batch {i}", b) for i, b in enumerate(iterator))

            return "an iterator of batches", once
        raise CalibrationDataError(
            f"{label} must be a directory of .npz files or an iterable of dicts, not {type(source).__name__}."
        )

    def _validated(self, opener, label: str) -> Iterator[tuple[int, Batch]]:
        for index, (where, batch) in enumerate(opener()):
            yield index, validate_batch(batch, self.specs, f"{label}, {where}")

    def calibration(self) -> Iterator[Batch]:
        """Calibration batches, validated; held-out batches are skipped (and kept if needed)."""
        self._held_out = []
        count = 0
        for index, batch in self._validated(self._open, "calibration data"):
            if self._eval is None and self._is_held_out(index):
                if len(self._held_out) < self.max_eval:
                    self._held_out.append(batch)
                continue
            count += 1
            yield batch
        self.calibration_batches = count
        if count == 0:
            raise CalibrationDataError("calibration data has no batches: pass at least one {input_name: array} batch.")

    def calibration_shards(self, count: int) -> list[list[Any]] | None:
        """The calibration batches in ``count`` contiguous shards (fewer if there are fewer batches)
        of items a worker reads with ``read_items``: .npz paths for a directory, the batches of a
        list. Held-out batches are left out and kept for evaluation, as ``calibration()`` does.
        None for a one-shot iterator, which only this process can read."""
        if self._items is None:
            return None
        self._held_out, chosen = [], []
        for index, item in enumerate(self._items):
            if self._eval is None and self._is_held_out(index):
                # Read and checked here, as calibration() does, even past max_eval: bad data fails alike.
                batches = list(read_items([item], self.specs))
                if len(self._held_out) < self.max_eval:
                    self._held_out.extend(batches)
                continue
            chosen.append(item)
        self.calibration_batches = len(chosen)
        if not chosen:
            raise CalibrationDataError("calibration data has no batches: pass at least one {input_name: array} batch.")
        count = max(1, min(count, len(chosen)))
        bounds = [round(i * len(chosen) / count) for i in range(count + 1)]
        return [chosen[start:end] for start, end in zip(bounds, bounds[1:])]

    def _is_held_out(self, index: int) -> bool:
        return index % self.holdout_every == self.holdout_every - 1

    def evaluation(self) -> tuple[str, list[Batch]]:
        """Up to max_eval evaluation batches, and a description of where they came from."""
        if self._eval is not None:
            description, opener = self._eval
            batches = []
            for index, batch in self._validated(opener, "evaluation data"):
                if index >= self.max_eval:
                    break
                batches.append(batch)
            return f"evaluation set ({description})", batches
        if self._held_out:
            return f"{len(self._held_out)} held-out calibration batches (every {self.holdout_every}th)", list(self._held_out)
        # Too few batches to hold any out: evaluate on the first calibration batches, and say so.
        try:
            batches = []
            for _, batch in self._validated(self._open, "calibration data"):
                batches.append(batch)
                if len(batches) >= self.max_eval:
                    break
        except CalibrationDataError:
            return "no evaluation data (the calibration iterator cannot be read twice)", []
        return f"{len(batches)} calibration batches (too few to hold any out)", batches


def _shardable_items(source) -> list[Any] | None:
    if isinstance(source, (str, Path)):
        return sorted(p for p in Path(source).glob("*.npz") if p.is_file())
    if isinstance(source, (list, tuple)):
        return [(f"batch {i}", batch) for i, batch in enumerate(source)]
    return None


def read_items(items: list[Any], specs: list[InputSpec]) -> Iterator[Batch]:
    """The validated batches of a shard from ``BatchSource.calibration_shards`` (in a worker)."""
    for item in items:
        if isinstance(item, Path):
            where, batch = item.name, read_npz(item, specs)
        else:
            where, batch = item
        yield validate_batch(batch, specs, f"calibration data, {where}")


_PICKLE_HINT = " (save strings as np.array(values, dtype=str))"


def _cannot_read(path: Path, error: Exception | str, hint: str = "", what: str = "calibration data") -> CalibrationDataError:
    what = "calibration file" if what == "calibration data" else f"{what} file"
    return CalibrationDataError(f"Cannot read {what} {str(path)!r}: {error}. Write it with numpy.savez{hint}.")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def npz_headers(path: Path, label: str = "calibration data") -> dict[str, np.ndarray]:
    """The arrays of an .npz file as their headers describe them, without reading their data:
    zero-stride views of the declared shape and dtype (they take no memory). Refused before any
    data is read: a header whose array would not fit in the member that holds it (a 14 TiB shape in
    a small file), an array larger than the free memory (a zip bomb), object arrays (pickle)."""

    def cannot(error, hint: str = "") -> CalibrationDataError:
        return _cannot_read(path, error, hint, label)

    arrays, total = {}, 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    arrays[info.filename] = np.zeros((), dtype="S1")  # not an array: an unknown name
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        shape, _, dtype = np.lib.format._read_array_header(member, version)  # 3.0: utf-8 names
                    header_bytes = member.tell()
                name = info.filename[: -len(".npy")]
                if dtype.hasobject:
                    raise cannot(f"array {name!r} has dtype object, which only pickle can read, and "
                                 "qcompile never unpickles data files (unpickling can run code)", _PICKLE_HINT)
                declared = math.prod(shape) * dtype.itemsize
                stored = info.file_size - header_bytes
                if declared > stored:
                    raise cannot(f"array {name!r} declares shape {list(shape)} {dtype} ({declared:,} bytes) "
                                 f"but its member holds {stored:,} bytes: the file is damaged")
                total += declared
                arrays[name] = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape),
                                                               writeable=False)
    except CalibrationDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise cannot(error) from None
    free = _available_memory()
    if free is not None and total > free:
        raise cannot(f"its arrays take {total / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB of free memory; "
                     "split it into smaller batches")
    return arrays


def read_npz(path: Path, specs: list[InputSpec] | None = None, label: str = "calibration data") -> Batch:
    """One .npz file's batch. Its headers are read first, so a damaged header or a zip bomb is
    refused before any data is decompressed; with ``specs``, a wrong name or shape is too."""
    headers = npz_headers(path, label)
    if specs is not None:
        validate_batch(headers, specs, f"{label}, {path.name}", values=False)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as error:
        # Object arrays need pickle, which could run code from the file: strings must be str arrays.
        # numpy's own message suggests allow_pickle, an option qcompile does not have: say why instead.
        if "allow_pickle" in str(error):
            error = "it holds object arrays, which only pickle can read, and qcompile never unpickles data files"
            raise _cannot_read(path, error, _PICKLE_HINT, label) from None
        raise _cannot_read(path, error if str(error) else type(error).__name__, what=label) from None


def _read_npz_files(files: list[Path], specs: list[InputSpec] | None = None) -> Iterator[tuple[str, Batch]]:
    """Each file's batch, read with ``read_npz``."""
    for path in files:
        yield path.name, read_npz(path, specs)


def check_npz_headers(source: Any, specs: list[InputSpec]) -> None:
    """For a directory of .npz files: every file's headers against ``specs`` (no data is read)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        for path in sorted(p for p in Path(source).glob("*.npz") if p.is_file()):
            validate_batch(npz_headers(path), specs, f"calibration data, {path.name}", values=False)
