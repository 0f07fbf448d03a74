"""Reproducible builds: content hashes of what goes into a compile, and checking an artifact against its report.

A compile is a function of its input model, its calibration data, its resolved config and pipeline,
and the code that runs it (qcompile's source and its dependencies' versions): the same inputs give
a byte-identical model in any process (tests/test_reproducible.py). The report records a full
sha256 of each input and of the output, so ``qcompile verify`` can tell whether a file is the one a
report describes, and, given the model and data, rebuild it and compare bytes.
"""

from __future__ import annotations

__all__ = [
    "HashingIterable",
    "VerificationError",
    "canonical_json",
    "code_digest",
    "config_digest",
    "data_digest",
    "file_digest",
    "model_digest",
    "sha256_hex",
    "verify_artifact",
]

import functools
import hashlib
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.core.config import NON_BUILD_KEYS, CompileConfig
from qcompile.errors import ConfigError, QcompileError
from qcompile.io.workspace import (
    LARGE_MODEL_BYTES,
    release_tensor,
    serialize_inline,
    weight_bytes,
)

logger = logging.getLogger(__name__)

class VerificationError(QcompileError):
    """An artifact does not match its report, or the report cannot be used to check it."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, so equal dicts hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_digest(model: ir.Model) -> str:
    """sha256 identifying a model's content.

    A model whose weights fit in memory: the sha256 of its deterministic serialization, which is
    the sha256 of the .onnx file qcompile writes. A large model (weights kept on disk, see
    qcompile.io.workspace): the sha256 of its structure with each initializer's data replaced by the
    sha256 of that data, read one tensor at a time: no copy of the whole model in memory, and the
    same digest wherever its weights are stored.
    """
    if weight_bytes(model) <= LARGE_MODEL_BYTES:
        return sha256_hex(serialize_inline(model).SerializeToString(deterministic=True))
    proto = ir.serde.serialize_model(model)  # weights on disk stay references: none is read here
    for tensor_proto in proto.graph.initializer:
        tensor = model.graph.initializers[tensor_proto.name].const_value
        tensor_sha = hashlib.sha256(tensor.tobytes()).digest()
        release_tensor(tensor)
        for field in ("raw_data", "external_data", "data_location"):
            tensor_proto.ClearField(field)
        tensor_proto.raw_data = tensor_sha
    return sha256_hex(b"qcompile-model-by-tensor-v1\0" + proto.SerializeToString(deterministic=True))


def _update_framed(hasher, data: bytes) -> None:
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)


def config_digest(config: CompileConfig, pipeline: str) -> str:
    """sha256 of what in a config can change the compiled model: its build keys and the resolved pipeline."""
    build = {k: v for k, v in config.to_dict().items() if k not in NON_BUILD_KEYS}
    return sha256_hex(canonical_json({"config": build, "pipeline": pipeline}))


@functools.cache
def code_digest() -> str:
    """sha256 over qcompile's own source files: an editable install changes code, not its version.
    The packages' folders come from their import specs, not from importing them: the backends
    import the pass cache, which imports this module."""
    hasher = hashlib.sha256(b"qcompile-source-v1\0")
    for package in ("qcompile", "qcompile.passes", "qcompile.backends"):
        for directory in map(Path, importlib.util.find_spec(package).submodule_search_locations):
            for path in sorted(directory.rglob("*.py")):  # qcompile's subpackages too
                _update_framed(hasher, f"{package}/{path.relative_to(directory).as_posix()}".encode())
                _update_framed(hasher, path.read_bytes())
    return hasher.hexdigest()


class _BatchHasher:
    """sha256 over batches in order: each array's name, dtype, shape and bytes (not file names or containers)."""

    def __init__(self):
        self._hasher = hashlib.sha256(b"qcompile-batches-v1\0")
        self.batches = 0
        self.ok = True  # False once a batch cannot be hashed: BatchSource reports the problem itself

    def add(self, batch: Any) -> None:
        if not self.ok:
            return
        if not isinstance(batch, Mapping):
            self.ok = False
            return
        try:
            arrays = sorted((str(name), np.asarray(value)) for name, value in batch.items())
        except Exception:  # noqa: BLE001  (anything np.asarray rejects; validation names it later)
            self.ok = False
            return
        _update_framed(self._hasher, canonical_json([[n, a.dtype.str, list(a.shape)] for n, a in arrays]))
        for _, array in arrays:
            if array.dtype.hasobject:  # strings (string inputs): their text, in order
                values = array.ravel().tolist()
                if not all(isinstance(v, (str, bytes)) for v in values):
                    self.ok = False
                    return
                _update_framed(self._hasher, canonical_json([["s", v] if isinstance(v, str) else ["b", v.hex()] for v in values]))
                continue
            # A C-contiguous uint8 view: the array's bytes without a copy (unless it is not contiguous).
            self._hasher.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self.batches += 1

    def hexdigest(self) -> str | None:
        return self._hasher.hexdigest() if self.ok else None


class HashingIterable:
    """A one-shot iterator of batches that hashes them as they pass, for sources that cannot be read twice.

    ``digest`` is known once the iterator has been read to its end (by calibration), else None.
    """

    def __init__(self, source: Iterable):
        self._source = source
        self._hasher = _BatchHasher()
        self.complete = False

    def __iter__(self) -> Iterator:
        for batch in self._source:
            self._hasher.add(batch)
            yield batch
        self.complete = True

    @property
    def digest(self) -> str | None:
        return self._hasher.hexdigest() if self.complete else None


def data_digest(source: Any) -> str | None:
    """sha256 of a data source's arrays, in the order compile reads them; None when unknown.

    A directory (its ``*.npz`` files in name order) and a list of the same arrays hash alike. None:
    no data, a one-shot iterator not yet read to its end, or data that cannot be read (compile
    reports why when it reads it).
    """
    if source is None:
        return None
    if isinstance(source, HashingIterable):
        return source.digest
    hasher = _BatchHasher()
    if isinstance(source, (str, Path)):
        directory = Path(source)
        if not directory.is_dir():
            return None
        for path in sorted(p for p in directory.glob("*.npz") if p.is_file()):
            try:
                with np.load(path, allow_pickle=False) as data:
                    hasher.add({key: data[key] for key in data.files})
            except (OSError, ValueError, zipfile.BadZipFile, EOFError):
                return None
        return hasher.hexdigest() if hasher.batches else None
    if isinstance(source, (list, tuple)):
        for batch in source:
            hasher.add(batch)
        return hasher.hexdigest()
    return None


# ----- checking an artifact against its report -----

def _load_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerificationError(
            f"Report {str(path)!r} does not exist. Pass the report.json written with the model (--report)."
        ) from None
    except (OSError, ValueError) as error:
        raise VerificationError(f"Cannot read report {str(path)!r}: {error}. Pass the report.json compile wrote.") from None
    hashes = report.get("hashes") if isinstance(report, dict) else None
    if not isinstance(hashes, dict) or not hashes.get("output_model"):
        raise VerificationError(
            f"Report {str(path)!r} records no content hashes (it predates them, or is not a qcompile "
            "report). Compile the model again to get a report that can be verified."
        )
    return report


def _artifact_digests(artifact: Path, hashes: dict) -> dict[str, tuple[str, str]]:
    """File -> (digest recorded, digest now) for the files the report describes."""
    if not artifact.is_file():
        raise VerificationError(f"Model file {str(artifact)!r} does not exist.")
    files = hashes.get("output_files")
    if files:  # a large model (output_model hashes its content): each file as written
        result = {}
        for name, recorded in files.items():
            path = artifact if name == "model" else artifact.parent / name
            if not path.is_file():
                raise VerificationError(
                    f"The report describes {name!r} beside {str(artifact)!r}, which does not exist: "
                    "keep the model's external data file beside it."
                )
            result[str(path)] = (recorded, file_digest(path))
        return result
    return {str(artifact): (hashes["output_model"], file_digest(artifact))}


def _changed(recorded: dict, now: dict, old_versions: dict, new_versions: dict) -> list[str]:
    """What differs between two compiles' ``hashes`` and ``versions``, in words."""
    labels = {"input_model": "the input model", "calibration_data": "the calibration data",
              "config": "the config or pipeline", "qcompile_code": "qcompile's source code"}
    changes = [label for key, label in labels.items() if recorded.get(key) != now.get(key)]
    versions = [f"{name} {old_versions.get(name)} -> {new_versions.get(name)}"
                for name in sorted(set(old_versions) | set(new_versions))
                if old_versions.get(name) != new_versions.get(name)]
    if versions:
        changes.append("versions (" + ", ".join(versions) + ")")
    return changes


def verify_artifact(
    artifact: str | Path,
    report_path: str | Path,
    *,
    model: Any = None,
    calibration_data: Any = None,
) -> list[str]:
    """Check ``artifact`` against ``report_path``; with ``model`` (and the data, if the report's
    compile had data), compile again and compare bytes. Returns what was checked, one line each;
    raises ``VerificationError`` naming what differs."""
    artifact, report_path = Path(artifact), Path(report_path)
    report = _load_report(report_path)
    hashes = report["hashes"]
    lines = []
    for path, (recorded, actual) in _artifact_digests(artifact, hashes).items():
        if recorded != actual:
            raise VerificationError(
                f"{path!r} has sha256 {actual}, but {str(report_path)!r} records {recorded}: the file is "
                "not the one this report describes (changed after compile, or from another compile). "
                "Use the model and report.json written together, or compile again."
            )
        lines.append(f"ok: {path} has the sha256 the report records ({actual})")
    if model is None:
        if calibration_data is not None:
            raise VerificationError("--calib is used to compile again, which also needs --model (the float model).")
        return lines
    lines.extend(_recompile(report, hashes, model, calibration_data))
    return lines


def _recompile(report: dict, hashes: dict, model: Any, calibration_data: Any) -> list[str]:
    import qcompile
    from qcompile.io.loader import load_model

    given = model_digest(load_model(model))
    if given != hashes.get("input_model"):
        raise VerificationError(
            f"The model given has content sha256 {given}, but the report's input model has "
            f"{hashes.get('input_model')}: it is not the model the artifact was compiled from."
        )
    if hashes.get("calibration_data") and calibration_data is None:
        raise VerificationError(
            "The report's compile used calibration data (sha256 "
            f"{hashes['calibration_data']}); pass the same data with --calib to compile again."
        )
    if calibration_data is not None and data_digest(calibration_data) != hashes.get("calibration_data"):
        raise VerificationError(
            f"The calibration data given has sha256 {data_digest(calibration_data)}, but the report's has "
            f"{hashes.get('calibration_data')}: pass the data the artifact was compiled with."
        )
    try:
        config = CompileConfig.from_dict(dict(report["config"]), source="the report's config")
        # The pipeline as it ran (a recipe or a target default may have changed since), without the
        # cache (a rebuild, not a lookup) and without what only measures or writes other files.
        config = config.replace(pipeline=[report["pipeline"]], recipe=None, cache=False, measure_latency=False,
                                min_sqnr=None, ep_context_path=None)
    except (ConfigError, KeyError, TypeError) as error:
        raise VerificationError(
            f"The report's config cannot be used by this qcompile ({error}); verify with the qcompile "
            f"version that wrote it ({report.get('versions', {}).get('qcompile')})."
        ) from None
    result = qcompile.compile(model, calibration_data, config=config)
    now = result.report.hashes
    if now["output_model"] != hashes["output_model"]:
        changes = _changed(hashes, now, report.get("versions", {}), result.report.versions)
        why = ("What differs from the report's compile: " + "; ".join(changes) + "."
               if changes else
               "Nothing that goes into a compile differs, so this is a reproducibility bug in qcompile: "
               "please report it with the model, the data and both reports.")
        raise VerificationError(
            f"Compiling again gives a model with sha256 {now['output_model']}, not the report's "
            f"{hashes['output_model']}. {why}"
        )
    return [f"ok: compiling {model} again gives identical bytes ({now['output_model']})"]
