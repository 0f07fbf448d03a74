"""ONNX Runtime sessions for the models qcompile builds, with errors that say what went wrong."""

from __future__ import annotations

__all__ = ["make_session", "model_bytes_or_path"]

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

import onnx
import onnxruntime as ort

from qcompile.errors import ModelError, detail

# Protobuf cannot serialize more than 2 GB; larger models go through a file with external data.
_INLINE_LIMIT = 1_800_000_000


@contextlib.contextmanager
def model_bytes_or_path(proto: onnx.ModelProto) -> Iterator[bytes | str]:
    """Yield something InferenceSession accepts: bytes for small models, a temp path for large ones."""
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size < _INLINE_LIMIT:
        yield proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
        yield path


def make_session(
    proto: onnx.ModelProto,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_model_path: str | None = None,
    what: str = "model",
    low_memory: bool = False,
) -> ort.InferenceSession:
    """A session on ``proto``; ``low_memory`` trades a little speed for returning memory after each
    run (no arena, no memory pattern): for calibration, whose runs fetch many large tensors."""
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    options.log_severity_level = 3
    if low_memory:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    with model_bytes_or_path(proto) as model:
        try:
            return ort.InferenceSession(model, options, providers=list(providers))
        except Exception as error:  # ORT raises its own exception types from C++
            raise ModelError(
                f"ONNX Runtime cannot load the {what}: {detail(error)}"
            ) from None
