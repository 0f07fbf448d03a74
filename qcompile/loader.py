"""Front ends: an ONNX file, an ONNX proto, an onnx-ir model or a torch.nn.Module, to an onnx-ir model.

The caller's model is never modified: files are read, in-memory models are copied.
"""

from __future__ import annotations

__all__ = ["load_model", "describe_source"]

import logging
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile.errors import ModelError, detail

logger = logging.getLogger(__name__)


def describe_source(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return type(model).__name__


def load_model(model: Any, example_inputs: tuple | None = None, dynamic_shapes: Any = None) -> ir.Model:
    if isinstance(model, (str, Path)):
        return _load_file(Path(model))
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(_copy_proto(model))
    if isinstance(model, ir.Model):
        return ir.serde.deserialize_model(ir.serde.serialize_model(model))
    if _is_torch_module(model):
        return _export_torch(model, example_inputs, dynamic_shapes)
    raise ModelError(
        f"Cannot compile a {type(model).__name__}. Pass a path to an .onnx file, an onnx.ModelProto, "
        "an onnx_ir.Model, or a torch.nn.Module with example_inputs."
    )


def _copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _load_file(path: Path) -> ir.Model:
    if not path.is_file():
        raise ModelError(f"Model file {str(path)!r} does not exist (or is not a file).")
    try:
        # External data (models over 2 GB) is resolved relative to the model's folder.
        proto = onnx.load_model(str(path), load_external_data=True)
    except Exception as error:  # protobuf's DecodeError, onnx's own errors, missing external data
        raise ModelError(
            f"{str(path)!r} is not a readable ONNX model ({type(error).__name__}: "
            f"{detail(error)}). "
            "Check that the file is complete and that its external data files sit beside it."
        ) from None
    if not proto.graph.node:
        raise ModelError(f"{str(path)!r} has an empty graph: there is nothing to compile.")
    try:
        onnx.checker.check_model(proto) if proto.ByteSize() < 2**31 - 1 else None
    except onnx.checker.ValidationError as error:
        raise ModelError(
            f"{str(path)!r} is not a valid ONNX model: {detail(error)} "
            "Export it again, or fix the node named above."
        ) from None
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as error:
        raise ModelError(f"{str(path)!r} could not be read into the IR: {error}") from None


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
    except Exception as error:
        raise ModelError(
            f"torch.onnx.export(dynamo=True) failed: {detail(error)} "
            "Export the model yourself and pass the .onnx file, or fix what the exporter names."
        ) from None
    finally:
        module.train(was_training)
    return program.model
