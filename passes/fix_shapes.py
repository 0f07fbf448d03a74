"""Make dynamic input dimensions static, for providers that compile fixed shapes (QNN, TensorRT)."""

from __future__ import annotations

__all__ = ["FixShapes"]

import logging

import onnx_ir as ir

from qcompile.errors import ConfigError
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)


def _describe(shape) -> list:
    return [d if isinstance(d, int) else (str(d) if d is not None and str(d) else "?") for d in shape]


@register_pass("fix-shapes", needs_data=True)
class FixShapes(ir.passes.InPlacePass):
    """Give every dynamic input dimension a fixed size: from ``input_shapes``, else the first calibration batch.

    QNN rejects a whole graph with a dynamic dimension (every node then runs on the CPU provider),
    so a target that compiles fixed shapes runs this first. Symbolic dimensions elsewhere in the
    graph that share a name with a fixed input dimension get the same size; shape inference after
    this pass fills in the rest. Guarantees: every graph input has a static shape, and
    ``records['fix-shapes']`` says what was fixed and where the sizes came from. Calibration and
    evaluation batches must then all have these shapes.
    """

    def __init__(self, context):
        super().__init__()
        self.context = context

    def _given_shapes(self, model: ir.Model) -> tuple[dict[str, tuple[int, ...]], str]:
        inputs = {v.name for v in model.graph.inputs}
        given = self.context.config.input_shapes
        unknown = sorted(set(given) - inputs)
        if unknown:
            raise ConfigError(
                f"input_shapes names {', '.join(map(repr, unknown))}, which the model does not have as "
                f"inputs. Its inputs are: {', '.join(sorted(inputs))}."
            )
        shapes = {name: tuple(dims) for name, dims in given.items()}
        source = "input_shapes in the config"
        dynamic = [v.name for v in model.graph.inputs if v.name not in shapes and not _is_static(v.shape)]
        if not dynamic:
            return shapes, source
        data = self.context.data
        if data is None or not data.rereadable:
            what = "no calibration data" if data is None else "a one-shot calibration iterator"
            raise ConfigError(
                f"Target {self.context.target.name!r} needs static shapes, but input {dynamic[0]!r} has "
                f"shape {_describe(_input(model, dynamic[0]).shape)} and there is {what} to take them from. "
                f"Give them: input_shapes = {{{dynamic[0]} = [1, ...]}} in the config, or "
                f"--shape {dynamic[0]}=1x... on the command line."
            )
        first = next(iter(data.calibration()), None)
        for name in dynamic:
            if first is not None and name in first:
                shapes[name] = tuple(int(d) for d in first[name].shape)
        return shapes, (source + " and " if given else "") + "the first calibration batch"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        shapes, source = self._given_shapes(model)
        sizes: dict[str, int] = {}  # symbolic dimension name -> its fixed size
        fixed = {}
        for value in model.graph.inputs:
            if value.name not in shapes or value.shape is None:
                continue
            new = shapes[value.name]
            old = value.shape
            if len(old) != len(new):
                raise ConfigError(
                    f"Shape {list(new)} for input {value.name!r} has rank {len(new)}, but the model's "
                    f"input has shape {_describe(old)} (rank {len(old)})."
                )
            for axis, (dim, size) in enumerate(zip(old, new)):
                if isinstance(dim, int) and dim != size:
                    raise ConfigError(
                        f"Shape {list(new)} for input {value.name!r} disagrees with the model on axis "
                        f"{axis}: the model fixes it to {dim}."
                    )
                name = str(dim) if not isinstance(dim, int) and dim is not None and str(dim) else None
                if name is not None and sizes.setdefault(name, size) != size:
                    raise ConfigError(
                        f"Dimension {name!r} is given two sizes ({sizes[name]} and {size}); inputs that "
                        "share a dimension name must share its size."
                    )
            if not _is_static(old):
                fixed[value.name] = {"from": _describe(old), "to": list(new)}
                value.shape = ir.Shape(list(new))
        if not fixed:
            return ir.passes.PassResult(model, False)
        for value in _all_values(model.graph):
            if value.shape is None or value.is_graph_input() or _is_static(value.shape):
                continue
            dims = [sizes.get(str(d), d) if not isinstance(d, int) and d is not None else d for d in value.shape]
            value.shape = ir.Shape(dims)
        self.context.records["fix-shapes"] = {"source": source, "inputs": fixed}
        logger.info("Fixed input shapes (%s): %s", source, {k: v["to"] for k, v in fixed.items()})
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        dynamic = [v.name for v in model.graph.inputs if not _is_static(v.shape)]
        if dynamic:
            raise ConfigError(
                f"Input(s) {', '.join(dynamic)} still have dynamic dimensions. Give their shapes with "
                "input_shapes in the config (--shape NAME=1x3x224x224)."
            )


def _is_static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _input(model: ir.Model, name: str) -> ir.Value:
    return next(v for v in model.graph.inputs if v.name == name)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs
