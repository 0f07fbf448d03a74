"""Front ends: an ONNX file, an ONNX proto, an onnx-ir model, a torch.nn.Module, or a causal
language model as a Hugging Face folder or a GGUF file (exported by ``causal_lm``), to an onnx-ir model.

The caller's model is never modified: files are read, in-memory models are copied.
"""

from __future__ import annotations

__all__ = ["describe_source", "load_model", "refuse_non_finite_weights", "refuse_quantized"]

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import ModelError, detail
from qcompile.io.causal_lm import export_causal_lm, export_folder, is_causal_lm_source
from qcompile.io.workspace import release_tensor

logger = logging.getLogger(__name__)


def describe_source(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return type(model).__name__


def load_model(model: Any, example_inputs: tuple | None = None, dynamic_shapes: Any = None) -> ir.Model:
    if isinstance(model, (str, Path)):
        return _check_supported(_initializers_not_inputs(_load_file(Path(model))), repr(str(model)))
    if isinstance(model, onnx.ModelProto):
        return _check_supported(_initializers_not_inputs(ir.serde.deserialize_model(_copy_proto(model))), "The model")
    if isinstance(model, ir.Model):
        return _check_supported(
            _initializers_not_inputs(ir.serde.deserialize_model(ir.serde.serialize_model(model))), "The model"
        )
    if _is_torch_module(model):
        return _export_torch(model, example_inputs, dynamic_shapes)
    raise ModelError(
        f"Cannot compile a {type(model).__name__}. Pass a path to an .onnx file, an onnx.ModelProto, "
        "an onnx_ir.Model, or a torch.nn.Module with example_inputs."
    )


def _initializers_not_inputs(model: ir.Model) -> ir.Model:
    """Move an IR version 3 model to IR version 4, where an initializer need not be a graph input.

    IR version 3 lists every initializer among the graph inputs as well, and ONNX Runtime treats
    them as constants (a feed cannot override them before IR version 4). Kept as inputs, weights
    would not count as constants, and every initializer the compiler adds would have to be listed
    too (onnx.checker: "in initializer but not in graph input"). Same computation, newer IR version.
    """
    if model.ir_version is not None and model.ir_version < 4:
        for value in [v for v in model.graph.inputs if v.name in model.graph.initializers]:
            model.graph.inputs.remove(value)
        model.ir_version = 4
    return model


def _copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _load_file(path: Path) -> ir.Model:
    if is_causal_lm_source(path):
        return _load_file(export_causal_lm(path, export_folder()))
    if path.is_dir():
        raise ModelError(
            f"Model path {str(path)!r} is a directory without a config.json; pass the .onnx file inside it "
            "(or a Hugging Face model folder)."
        )
    if not path.is_file():
        raise ModelError(f"Model file {str(path)!r} does not exist (or is not a file).")
    if path.stat().st_size == 0:
        raise ModelError(f"Model file {str(path)!r} is empty (0 bytes); was it written completely?")
    try:
        # External data (models over 2 GB) stays on disk: onnx-ir maps each weight when a pass reads it.
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001  (protobuf's DecodeError, onnx's own errors, missing external data)
        raise ModelError(
            f"{str(path)!r} is not a readable ONNX model ({type(error).__name__}: "
            f"{detail(error)}).{_looks_like(path)} "
            "Check that the file is complete and that its external data files sit beside it."
        ) from None
    if not proto.HasField("graph"):
        raise ModelError(
            f"{str(path)!r} is not an ONNX model: it parses, but has no graph.{_looks_like(path)}"
        )
    if not proto.graph.node:
        raise ModelError(f"{str(path)!r} has an empty graph: there is nothing to compile.")
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    try:
        # Given the path, the checker also checks that external data files exist beside the model.
        onnx.checker.check_model(str(path) if external else proto)
    except onnx.checker.ValidationError as error:
        raise ModelError(
            f"{str(path)!r} is not a valid ONNX model: {detail(error)} "
            "Export it again, or fix what the checker names."
        ) from None
    _check_external_data(external, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # noqa: BLE001  (re-raised as a QcompileError that names the input)
        raise ModelError(f"{str(path)!r} could not be read into the IR: {error}") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def _check_external_data(tensors: list[onnx.TensorProto], path: Path) -> None:
    """Every external weight must lie inside its data file: a truncated file would otherwise fail
    only when a pass first reads that weight."""
    sizes: dict[str, int] = {}
    for tensor in tensors:
        entries = {e.key: e.value for e in tensor.external_data}
        location = path.parent / entries.get("location", "")
        if location.name not in sizes:
            sizes[location.name] = location.stat().st_size if location.is_file() else -1
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
        except ValueError:
            raise ModelError(
                f"{str(path)!r}: weight {tensor.name!r} has external data offset "
                f"{entries.get('offset', '')!r} and length {entries.get('length', '')!r}; both must be whole "
                "numbers of bytes. The model file is damaged: export or save it again."
            ) from None
        if offset < 0 or length < 0:
            raise ModelError(
                f"{str(path)!r}: weight {tensor.name!r} has external data offset {offset} and length {length}; "
                "neither can be negative. The model file is damaged: export or save it again."
            )
        end = offset + length
        if sizes[location.name] < 0 or end > sizes[location.name]:
            raise ModelError(
                f"{str(path)!r}: weight {tensor.name!r} lies in bytes up to {end} of "
                f"{str(location)!r}, which {'is missing' if sizes[location.name] < 0 else f'has {sizes[location.name]}'}. "
                "Copy the model's external data files completely, beside the model."
            )


def _looks_like(path: Path) -> str:
    """What a file that is not an ONNX model seems to be, from its first bytes (or nothing)."""
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        return " It is a zip archive (a PyTorch checkpoint or an .npz?): export the model to ONNX first."
    if head.startswith(b"\x93NUMPY"):
        return " It is a NumPy .npy array, not a model."
    if head[4:8] == b"ORTM":
        return " It is an ONNX Runtime .ort model: pass the .onnx model it was converted from."
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return " It is a text file."
    return ""


# ONNX Runtime runs default-domain opsets 7 and newer; this onnx knows opsets up to its own release's.
_OLDEST_OPSET = 7
_NEWEST_OPSETS = {
    "": onnx.defs.onnx_opset_version(),
    "ai.onnx": onnx.defs.onnx_opset_version(),
    "ai.onnx.ml": onnx.helper.VERSION_TABLE[-1][3],
}
# Domains whose ops ONNX Runtime implements; a node in any other domain needs a function in the model.
_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft"}


def _upgrade_old_opset(model: ir.Model, version: int, where: str) -> ir.Model:
    """An opset older than ONNX Runtime runs (it has no AveragePool-1 or Gemm-6 kernel), converted to
    the oldest it runs with onnx's version converter; refused only if the converter cannot.

    qcompile runs the float model (calibration, evaluation) and converts it further for Q/DQ
    anyway (``upgrade-opset``), so the user need not convert it first.
    """
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), _OLDEST_OPSET)
        onnx.checker.check_model(converted)
    except Exception as error:  # noqa: BLE001  (the converter raises bare RuntimeErrors from C++)
        raise ModelError(
            f"{where} uses opset {version}, older than ONNX Runtime runs (opset {_OLDEST_OPSET} and newer), "
            f"and onnx's version converter cannot convert it: {detail(error)}. Export it with a newer opset."
        ) from None
    logger.info("Converted the model from opset %d to %d, the oldest ONNX Runtime runs", version, _OLDEST_OPSET)
    return ir.serde.deserialize_model(converted)


def _check_supported(model: ir.Model, where: str) -> ir.Model:
    """Reject, before any pass runs, what would otherwise fail deep inside ONNX Runtime later.

    qcompile runs the float model (calibration, evaluation), so it must be a model ONNX Runtime
    loads: known opsets, ops it implements, uniquely named nodes, and outputs to compute.
    """
    for domain, newest in _NEWEST_OPSETS.items():
        version = model.opset_imports.get(domain)
        if version is not None and version > newest:
            raise ModelError(
                f"{where} imports opset {version} of {domain or 'ai.onnx'}, newer than any this "
                f"installation knows (onnx {onnx.__version__}: up to opset {newest}). Export it with "
                f"opset {newest} or older, or upgrade onnx and onnxruntime."
            )
    default = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if default is not None and default < _OLDEST_OPSET:
        model = _upgrade_old_opset(model, default, where)
    if not model.graph.outputs:
        raise ModelError(f"{where} has no graph outputs: it computes nothing to quantize or check.")
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.shape is None:
            continue
        if any(isinstance(d, int) and d <= 0 for d in value.shape):
            # Some exporters write -1 or 0 for "dynamic". ONNX Runtime treats -1 as dynamic but
            # refuses any data for a 0, so both become dynamic here, in the output model too.
            declared = [d if isinstance(d, int) else str(d) for d in value.shape]
            value.shape = ir.Shape([None if isinstance(d, int) and d <= 0 else d for d in value.shape])
            logger.info("Input %r declares shape %s: its -1/0 dimensions are read as dynamic", value.name, declared)
    functions = {(domain, name) for domain, name, *_ in model.functions}
    custom = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _RUNTIME_DOMAINS and (node.domain, node.op_type) not in functions:
            custom.setdefault(f"{node.domain}::{node.op_type}", node.name)
    if custom:
        listed = ", ".join(f"{op} (node {name!r})" for op, name in sorted(custom.items()))
        raise ModelError(
            f"{where} uses custom op(s) {listed}, which ONNX Runtime does not implement and the model "
            "does not define as functions. qcompile runs the model to calibrate it: replace these ops, "
            "or export them as ONNX functions."
        )
    repeated = sorted(name for name, count in Counter(n.name for n in model.graph if n.name).items() if count > 1)
    if repeated:
        raise ModelError(
            f"{where} has more than one node named {', '.join(map(repr, repeated[:5]))}; ONNX Runtime "
            "refuses such a model. Give every node a unique name (or none)."
        )
    return model


def _is_torch_module(model: Any) -> bool:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__ == "Module":
            return True
    return False


def _export_torch(module, example_inputs: tuple | None, dynamic_shapes: Any) -> ir.Model:
    """Export with torch.onnx.export(dynamo=True); its ONNXProgram.model is already an onnx-ir model."""
    import torch

    if example_inputs is None:
        raise ModelError(
            "A torch.nn.Module needs example_inputs (a tuple of tensors in forward()'s order) to be "
            "exported to ONNX."
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False
            )
    except Exception as error:  # noqa: BLE001  (re-raised as a QcompileError that names the input)
        raise ModelError(
            f"torch.onnx.export(dynamo=True) failed: {detail(error)} "
            "Export the model yourself and pass the .onnx file, or fix what the exporter names."
        ) from None
    finally:
        module.train(was_training)
    return program.model


# Ops that only a quantized model contains: (domain, op_type). Any QLinear*/QOrdered* op also counts.
_QUANTIZED_OPS = {
    ("", "QuantizeLinear"), ("", "DequantizeLinear"), ("", "DynamicQuantizeLinear"),
    ("", "ConvInteger"), ("", "MatMulInteger"),
    ("com.microsoft", "QuantizeLinear"), ("com.microsoft", "DequantizeLinear"),
    ("com.microsoft", "MatMulNBits"), ("com.microsoft", "MatMulIntegerToFloat"), ("com.microsoft", "QGemm"),
    ("com.microsoft", "QAttention"), ("com.microsoft", "DynamicQuantizeMatMul"),
    ("com.microsoft", "DynamicQuantizeLSTM"), ("com.microsoft", "GatherBlockQuantized"),
    ("com.microsoft", "MatMulBnb4"), ("com.microsoft", "QEmbedLayerNormalization"),
}


def refuse_quantized(model: ir.Model, where: str) -> None:
    """Refuse a model that is already quantized: quantizing it again would stack a second
    quantization on the first (and ORT's fused integer ops cannot be requantized at all)."""
    found: Counter = Counter()
    first: dict[str, str] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in _QUANTIZED_OPS or node.op_type.startswith(("QLinear", "QOrdered")):
            found[node.op_type] += 1
            first.setdefault(node.op_type, node.name or "(unnamed)")
    if found:
        listed = ", ".join(f"{op} x{count} (e.g. node {first[op]!r})" for op, count in found.most_common())
        raise ModelError(
            f"{where} is already quantized: it contains {listed}. qcompile quantizes float models; "
            "compile the float model this one was made from (or deploy this one as it is)."
        )



# Ops whose input 1 is a weight that qcompile quantizes (and SmoothQuant rescales).
_WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def refuse_non_finite_weights(model: ir.Model, where: str) -> None:
    """Refuse a model whose MatMul/Gemm/Conv weights hold NaN or Inf, naming them: every output
    that reads such a weight is NaN or Inf in float already, and no scale can quantize it.
    (Inf elsewhere, e.g. an additive attention mask, is legitimate and left alone.)"""
    bad = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        tensor = weight.const_value if weight is not None else None
        if tensor is None or not ir.DataType(tensor.dtype).is_floating_point():
            continue
        try:
            values = tensor.numpy()
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        except Exception:  # noqa: BLE001  (unreadable data is the loader's and the passes' to report)
            continue
        finally:
            release_tensor(tensor)
        if nan or inf:
            bad.append(f"{weight.name!r} of {node.op_type} {node.name!r} ({nan} NaN, {inf} Inf of {values.size})")
    if bad:
        raise ModelError(
            f"{where} has weights that are not finite: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}. "
            "The float model computes NaN/Inf from them already; fix the weights (or export the model again)."
        )
