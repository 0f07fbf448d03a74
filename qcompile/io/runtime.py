"""ONNX Runtime sessions for the models qcompile builds, with errors that say what went wrong."""

from __future__ import annotations

__all__ = [
    "FP8_QDQ_FUSION_BROKEN",
    "has_fp8_qdq",
    "make_session",
    "model_bytes_or_path",
    "qdq_safe_config",
    "session_proto",
    "session_source",
]

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.errors import ModelError, detail
from qcompile.scaleout.executors import check_machine_bound
from qcompile.io.workspace import Workspace, add_outputs, serialize_inline

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


def session_proto(model: ir.Model, extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """``model`` as a proto with ``extra_outputs`` exposed too (for observing intermediate tensors).

    The extra outputs get no declared type: ONNX Runtime reports the real one, so values that shape
    inference missed can still be observed.
    """
    top = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    top |= {o.name for node in model.graph for o in node.outputs}
    if any(name not in top for name in extra_outputs):
        # Values inside If branches: a copy whose Ifs carry them out (workspace.add_outputs).
        model = model.clone()
        add_outputs(model, extra_outputs)
    proto = serialize_inline(model)
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra_outputs) if n not in existing)
    return proto


@contextlib.contextmanager
def session_source(model: ir.Model, extra_outputs: Sequence[str] = (), workspace: Workspace | None = None
                   ) -> Iterator[bytes | str]:
    """What ``make_session`` loads for ``model`` with ``extra_outputs`` exposed, as a value another
    process can load too: the serialized model, or (large models) the path of a model file whose
    weights are in ``workspace``. The path is valid until the ``with`` block ends."""
    if workspace is not None:
        with workspace.session_model(model, extra_outputs) as path:
            yield path
    else:
        with model_bytes_or_path(session_proto(model, extra_outputs)) as loadable:
            yield loadable


def _ort_version() -> tuple[int, ...]:
    parts = []
    for piece in ort.__version__.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# ONNX Runtime before 1.32 (onnxruntime-gpu's newest release is 1.31.1) fuses FP8
# QuantizeLinear/DequantizeLinear around a Conv or MatMul into its integer kernels, which reject
# FP8 inputs: the session fails with INVALID_GRAPH. With its QDQ fusions off
# (``session.disable_quant_qdq``) the model loads and computes what it says.
FP8_QDQ_FUSION_BROKEN = _ort_version() < (1, 32)
_FP8 = {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ}


def has_fp8_qdq(model: onnx.ModelProto | ir.Model | bytes | str) -> bool:
    """Whether ``model`` quantizes to or dequantizes from an FP8 type anywhere (subgraphs too)."""
    if isinstance(model, (bytes, str)):
        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None:
            if node.inputs[0].dtype in _FP8:
                return True
        elif node.op_type == "QuantizeLinear" and node.outputs[0].dtype in _FP8:
            return True
        elif node.op_type == "QuantizeLinear" and "output_dtype" in node.attributes:
            if ir.DataType(node.attributes["output_dtype"].as_int()) in _FP8:
                return True
    return False


def qdq_safe_config(model) -> dict[str, str]:
    """Session config entries ``model`` needs on this ONNX Runtime: the QDQ fusions off for an FP8
    model before 1.32 (``FP8_QDQ_FUSION_BROKEN``), nothing otherwise."""
    if FP8_QDQ_FUSION_BROKEN and has_fp8_qdq(model):
        return {"session.disable_quant_qdq": "1"}
    return {}


def make_session(
    model: onnx.ModelProto | ir.Model,
    *,
    extra_outputs: Sequence[str] = (),
    workspace: Workspace | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_model_path: str | None = None,
    what: str = "model",
    low_memory: bool = False,
    config_entries: Mapping[str, str] | None = None,
    plugin_devices: tuple[Sequence[Any], Mapping[str, str]] | None = None,
) -> ort.InferenceSession:
    """A session on ``model`` (a proto, or an onnx-ir model with ``extra_outputs`` exposed too).

    With a ``workspace`` (large models), the session loads a model file whose weights are
    references into the workspace's files, and rewritten weights are spilled there first: no
    protobuf of the whole model is built, and ONNX Runtime maps the weights rather than copying
    them (with ``low_memory``, prepacking, which copies every MatMul weight, is off). ``config_entries``
    are ONNX Runtime session config entries; ``providers`` are names or (name, options) pairs, and
    ``plugin_devices`` (devices, options) attaches a plugin provider through its devices (named
    in ``providers`` it would be ignored). ``low_memory`` trades a little
    speed for returning memory after each run (no arena, no memory pattern): for calibration,
    whose runs fetch many large tensors."""
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    options.log_severity_level = 3
    if low_memory:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if threads:
        check_machine_bound("threads", threads, "ONNX Runtime threads")
        options.intra_op_num_threads = threads
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    for key, value in {**qdq_safe_config(model), **(config_entries or {})}.items():
        options.add_session_config_entry(key, value)
    if isinstance(model, (bytes, str)):
        source = contextlib.nullcontext(model)  # already what InferenceSession loads (session_source)
        if low_memory and isinstance(model, str):
            options.add_session_config_entry("session.disable_prepacking", "1")
    elif workspace is not None and isinstance(model, ir.Model):
        if low_memory:
            # Calibration-type sessions map the weights; sessions that are timed keep ORT's prepacked
            # weights (one copy, the mapping released), so measured latency is what users get.
            options.add_session_config_entry("session.disable_prepacking", "1")
        source = workspace.session_model(model, extra_outputs)
    else:
        if isinstance(model, ir.Model):
            model = session_proto(model, extra_outputs)
        source = model_bytes_or_path(model)
    if plugin_devices is not None:
        options.add_provider_for_devices(list(plugin_devices[0]), dict(plugin_devices[1]))
    with source as loadable:
        try:
            if plugin_devices is not None:
                return ort.InferenceSession(loadable, options)
            return ort.InferenceSession(loadable, options, providers=list(providers))
        except Exception as error:  # noqa: BLE001  (ORT raises its own exception types from C++)
            raise ModelError(
                f"ONNX Runtime cannot load the {what}: {detail(error)}"
            ) from None
