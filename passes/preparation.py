"""Preparation passes: make the float graph clean, folded and shaped before quantization.

Most wrap onnx-ir's and onnxscript's own passes; what they add is a name in the registry and a
clear error instead of a silent warning where a later pass depends on the result.
"""

from __future__ import annotations

__all__ = [
    "ShapeInference",
    "LiftConstants",
    "FoldConstants",
    "FoldBatchNorm",
    "FoldConvBiasAdd",
    "DeduplicateInitializers",
    "RemoveIdentity",
    "RemoveUnused",
    "TopologicalSort",
    "UpgradeOpset",
    "FixNames",
    "CheckModel",
]

import hashlib
import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common._c_api_utils import call_onnx_api
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from qcompile.errors import ModelError, detail
from qcompile.core.graph_edit import add_initializer
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import quant_type

logger = logging.getLogger(__name__)



@register_pass("shape-inference")
class ShapeInference(ir.passes.InPlacePass):
    """Infer element types and shapes of every value, keeping symbolic dimensions.

    Requires: a model that ONNX shape inference accepts. Guarantees: values whose type can be
    inferred have it. Unlike onnx-ir's pass, an inference error is a ModelError, not a warning.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)

        try:
            # onnx-ir's helper serializes the model without its large initializers (shapes do not
            # need their values): much faster, and never over protobuf's 2 GB limit.
            inferred = call_onnx_api(infer, model)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
            raise ModelError(
                f"ONNX shape inference rejected the model: {detail(error)} "
                "Fix the model (or export it again) so that onnx.shape_inference.infer_shapes accepts it."
            ) from None
        inferred_values = {
            info.name: info for info in list(inferred.graph.value_info) + list(inferred.graph.output)
        }
        modified = False
        for value in _all_values(model.graph):
            info = inferred_values.get(value.name)
            if info is None or not info.type.HasField("tensor_type"):
                continue
            tensor_type = info.type.tensor_type
            if value.dtype is None and tensor_type.elem_type:
                value.dtype = ir.DataType(tensor_type.elem_type)
                modified = True
            if tensor_type.HasField("shape"):
                shape = ir.Shape(
                    [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
                )
                if value.shape is None or _less_known(value.shape, shape):
                    value.shape = shape
                    modified = True
        return ir.passes.PassResult(model, modified)


def _less_known(old: ir.Shape, new: ir.Shape) -> bool:
    if len(old) != len(new):
        return False
    return any(not isinstance(o, int) and isinstance(n, int) for o, n in zip(old, new))


def _all_values(graph: ir.Graph):
    seen = set()
    for value in list(graph.inputs) + [o for node in graph for o in node.outputs]:
        if value.name and value.name not in seen:
            seen.add(value.name)
            yield value


@register_pass("lift-constants")
class LiftConstants(ir.passes.InPlacePass):
    """Turn tensor-valued Constant nodes into initializers.

    Guarantees: weights some exporters store as Constant nodes become initializers, so the
    quantizer sees (and shrinks) them like any other weight.
    """

    def __init__(self, context, *, size_limit: int = 16):
        super().__init__()
        self._inner = common_passes.LiftConstantsToInitializersPass(size_limit=size_limit)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return self._inner(model)


@register_pass("fold-constants")
class FoldConstants(ir.passes.InPlacePass):
    """Evaluate subgraphs whose inputs are all constant, with onnxscript's constant folder.

    Guarantees: shape computations and constant arithmetic become initializers. Never folds
    QuantizeLinear/DequantizeLinear (onnxscript leaves them alone), so it is safe after QDQ insertion.
    """

    def __init__(self, context, *, output_size_limit: int = 1 << 22):
        super().__init__()
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=False, output_size_limit=self.output_size_limit,
            should_fold=_fold_data_movement,
        )
        _restore_string_tensors(model.graph)
        return ir.passes.PassResult(model, bool(result.modified))


# Ops that only select, reorder or reshape their input's elements: folded on constants however
# large, since the output is no larger than the inputs together (onnxscript skips an input over
# 8192 elements that has several readers: PyTorch's LSTM export reorders the gates of W and R with
# three Slices of each and a Concat, and the LSTM then had no constant weights to quantize).
_DATA_MOVEMENT = {"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Split", "Flatten", "Identity"}


def _fold_data_movement(node: ir.Node) -> bool | None:
    if node.domain in ("", "ai.onnx") and node.op_type in _DATA_MOVEMENT:
        return True
    return None  # onnxscript's default rules


def _restore_string_tensors(graph: ir.Graph) -> None:
    """The folder stores a folded string constant as a numpy-backed ir.Tensor, which onnx-ir cannot
    serialize (it has no bit width); give such initializers back as ir.StringTensor."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype == ir.DataType.STRING and not isinstance(tensor, ir.StringTensor):
            strings = [s if isinstance(s, bytes) else str(s).encode() for s in tensor.numpy().ravel()]
            value.const_value = ir.StringTensor(strings, shape=tensor.shape, name=tensor.name)


@register_pass("fold-batchnorm")
class FoldBatchNorm(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

    Requires: constant BN parameters and weights. Guarantees: no BatchNormalization directly after
    those ops remains, so its scale is inside the quantized weights rather than a float op after them.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _count_op(model, "BatchNormalization")
        # The rules read initializers; lift-constants leaves tensors under 16 elements as Constant
        # nodes, and PP-OCR's direction classifier kept six 8-channel BatchNorms float that way.
        for node in list(model.graph):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                producer = node.inputs[0].producer() if node.inputs[0] is not None else None
                for owner in (node, producer):
                    if owner is not None and owner.op_type in ("BatchNormalization", *_BN_HOSTS):
                        _lift_constant_inputs(model.graph, owner)
        onnxscript.rewriter.rewrite(
            model,
            pattern_rewrite_rules=[
                fuse_batchnorm_into_conv_rule,
                fuse_batchnorm_into_conv_transpose_rule,
                fuse_batchnorm_into_gemm_rule,
            ],
        )
        return ir.passes.PassResult(model, _count_op(model, "BatchNormalization") < before)


_BN_HOSTS = ("Conv", "ConvTranspose", "Gemm")


@register_pass("fold-conv-bias")
class FoldConvBiasAdd(ir.passes.InPlacePass):
    """Fold an ``Add`` of a per-channel constant after a Conv or ConvTranspose into its bias.

    paddle2onnx writes every convolution as ``Conv`` (no bias) then ``Add(conv, bias)``: quantized,
    the Conv's output is rounded before the bias is added and again after (PP-OCRv6's recognizer
    has 54 such pairs). Requires: constant weights; the Conv's output read by that Add only and not
    a graph output; the constant broadcasting along the channel axis alone. Guarantees: the sum is
    the Conv's output (``Conv(x, W, b + c)``), under the Add's output name; If/Loop bodies too.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type in ("Conv", "ConvTranspose") and node.domain in ("", "ai.onnx"):
                folded += _fold_bias_add(node)
        if folded:
            logger.info("fold-conv-bias: %d Add(s) folded into convolution biases", folded)
        return ir.passes.PassResult(model, folded > 0)


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    """An initializer's or a Constant node's array (lift-constants leaves small ones as nodes)."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _fold_bias_add(conv: ir.Node) -> int:
    out = conv.outputs[0]
    uses = list(out.uses())
    weight = _constant_array(conv.inputs[1] if len(conv.inputs) > 1 else None)
    if len(uses) != 1 or out.is_graph_output() or weight is None or weight.dtype != np.float32:
        return 0
    add, _ = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return 0
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    addend = _constant_array(other)
    rank = weight.ndim  # the output's rank: (N, C, spatial...)
    group = conv.attributes["group"].as_int() if "group" in conv.attributes else 1
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * group
    if addend is None or addend.dtype != np.float32 or addend.ndim > rank or add.inputs[0] is add.inputs[1]:
        return 0
    shape = (1,) * (rank - addend.ndim) + addend.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return 0
    bias = np.broadcast_to(addend.reshape(-1), (channels,)).astype(np.float32)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        existing = _constant_array(conv.inputs[2])
        if existing is None:
            return 0
        bias = bias + existing.astype(np.float32)
    graph = conv.graph
    bias_value = add_initializer(graph, f"{add.name or out.name}_folded_bias", bias)
    inputs = list(conv.inputs[:2]) + [bias_value]
    new_conv = ir.Node(conv.domain, conv.op_type, inputs, attributes=list(conv.attributes.values()),
                       name=conv.name, num_outputs=1)
    total = add.outputs[0]
    new_out = new_conv.outputs[0]
    new_out.dtype, new_out.shape = total.dtype or out.dtype, total.shape or out.shape
    graph.insert_before(conv, new_conv)
    ir.convenience.replace_all_uses_with(total, new_out, replace_graph_outputs=True)
    # The sum's name (a graph output's, or what later passes and reports know it by) is kept.
    was, total.name = total.name, None
    new_out.name = was
    graph.remove([add, conv], safe=True)
    return 1


def _lift_constant_inputs(graph: ir.Graph, node: ir.Node) -> None:
    """Make the parameter inputs (all but the first) of ``node`` that Constant nodes produce initializers."""
    for value in node.inputs[1:]:
        producer = value.producer() if value is not None else None
        if (producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx")
                or "value" not in producer.attributes or value.is_graph_output() or value.name in graph.initializers):
            continue
        tensor = producer.attributes["value"].as_tensor()
        initializer = ir.Value(name=value.name, const_value=tensor, type=value.type, shape=tensor.shape)
        initializer.dtype = tensor.dtype
        ir.convenience.replace_all_uses_with(value, initializer)
        graph.remove(producer, safe=True)
        graph.register_initializer(initializer)


def _count_op(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type)


@register_pass("deduplicate-initializers")
class DeduplicateInitializers(ir.passes.InPlacePass):
    """Merge initializers of equal type, shape and content into one, in each graph, and likewise
    Constant nodes of equal value.

    Guarantees: no two initializers of a graph hold the same tensor, so a weight read by several
    nodes is stored, and quantized, once. Constant folding gives every reader of a shared weight
    its own copy (an unrolled GRU's ``Transpose(W)`` at every time step: a CRNN's 4.8 M weight
    elements became 68.8 M); run this after folding. Graph inputs and outputs keep their own.
    Only tensors that share dtype and shape with another are hashed. The Constant nodes
    lift-constants leaves (tensors under 16 elements: Clip bounds, hard-swish's 3 and 6) are merged
    too: PP-LCNet's classifier carries 77 of them, 9 distinct, 4 KB of its 0.59 MB.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            groups: dict[tuple, list[ir.Value]] = {}
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.dtype == ir.DataType.STRING:
                    continue
                groups.setdefault((tensor.dtype, tuple(tensor.shape.numpy())), []).append(value)
            for candidates in groups.values():
                if len(candidates) > 1:
                    modified |= _merge_equal(graph, candidates)
            modified |= _merge_equal_constants(graph)
        return ir.passes.PassResult(model, modified)


def _merge_equal_constants(graph: ir.Graph) -> bool:
    """Replace each tensor-valued Constant node of ``graph`` (not its subgraphs') by the first one
    of equal dtype, shape and bytes; a Constant whose output is a graph output stays."""
    kept: dict[tuple, ir.Value] = {}
    merged = False
    for node in list(graph):
        if (node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or list(node.attributes) != ["value"]
                or node.outputs[0].is_graph_output()):
            continue
        tensor = node.attributes["value"].value
        if tensor.dtype == ir.DataType.STRING:
            continue
        key = (tensor.dtype, tuple(tensor.shape.numpy()), tensor.tobytes())
        first = kept.setdefault(key, node.outputs[0])
        if first is not node.outputs[0]:
            node.outputs[0].replace_all_uses_with(first)
            graph.remove(node, safe=True)
            merged = True
    return merged


def _merge_equal(graph: ir.Graph, candidates: list[ir.Value]) -> bool:
    kept: dict[bytes, ir.Value] = {}
    merged = False
    for value in candidates:
        data = value.const_value.tobytes()
        digest = hashlib.sha256(data).digest()
        first = kept.get(digest)
        if first is None:
            kept[digest] = value
        elif first.const_value.tobytes() == data:
            value.replace_all_uses_with(first)
            graph.initializers.pop(value.name)
            logger.debug("Merged initializer %r into its equal %r", value.name, first.name)
            merged = True
    return merged


@register_pass("remove-identity")
class RemoveIdentity(ir.passes.InPlacePass):
    """Remove Identity nodes, keeping graph input and output names."""

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _IdentityElimination()(model)


class _IdentityElimination(common_passes.IdentityEliminationPass):
    """onnx-ir's pass, except that ``y = Identity(x)`` stays when ``y`` is an output of its graph and
    removing the node would make that output invalid:

    - ``x`` is also an output of the graph: one value would be listed twice (a Scan body's state
      and scan output), and ONNX Runtime's Scan then returns garbage for both;
    - ``x`` comes from outside the graph (an If/Loop/Scan body returning an outer-scope value):
      ONNX Runtime refuses a subgraph output that is an outer-scope value, and onnx-ir would also
      rename the outer value to the subgraph output's name.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and len(node.inputs) == 1 and len(node.outputs) == 1:
            source, output = node.inputs[0], node.outputs[0]
            if source is not None and output.is_graph_output():
                if source.is_graph_output() or not _defined_in(source, node.graph):
                    return False
        return super()._try_eliminate_identity_node(node)


def _defined_in(value: ir.Value, graph) -> bool:
    """Whether ``value`` is produced by a node of ``graph`` or is one of its inputs or initializers."""
    producer = value.producer()
    if producer is not None:
        return producer.graph is graph
    return value in graph.inputs or graph.initializers.get(value.name) is value


@register_pass("remove-unused")
class RemoveUnused(ir.passes.InPlacePass):
    """Remove nodes, initializers, functions and opset imports nothing uses."""

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = ir.passes.Sequential(
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        )(model)
        return ir.passes.PassResult(model, result.modified | _remove_unused_subgraph_initializers(model))


def _remove_unused_subgraph_initializers(model: ir.Model) -> bool:
    """Drop initializers of If/Loop/Scan bodies that nothing reads. onnx-ir's pass removes only the
    main graph's: a branch weight that insert-qdq replaced by an integer copy would otherwise
    ship twice (silero-vad's quantized 16 kHz branch came out at 108% of fp32)."""
    removed = False
    # Read from the nodes themselves: a removed node's uses can linger on the values it read.
    read = {v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.inputs if v is not None}
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for name, value in list(graph.initializers.items()):
            if value not in read and not value.is_graph_output() and not value.is_graph_input():
                graph.initializers.pop(name)
                removed = True
    return removed


@register_pass("topological-sort")
class TopologicalSort(ir.passes.InPlacePass):
    """Sort nodes so every node comes after the producers of its inputs (stable)."""

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return common_passes.TopologicalSortPass()(model)


@register_pass("upgrade-opset")
class UpgradeOpset(ir.passes.InPlacePass):
    """Convert the model to the default-domain opset its quantization formats need.

    Per-axis QuantizeLinear/DequantizeLinear need opset 13, 16-bit formats need 21. Requires: a
    model onnx's version converter can convert. Guarantees: opset >= the required version; a
    model already there is returned unchanged.
    """

    def __init__(self, context, *, min_opset: int = 13):
        super().__init__()
        self.context = context
        self.option_min_opset = min_opset

    @property
    def min_opset(self) -> int:
        # The config is resolved before any pass is built, a later pass's run-wide options
        # included (plan-quantization(activation_type=...), as the llm-fp8 recipe sets).
        config, target = self.context.config, self.context.target
        return max(
            self.option_min_opset,
            quant_type(config.activation_type or target.default_activation_type).min_opset,
            quant_type(target.weight_type_name(config)).min_opset,
            # Mixed precision: a 16-bit override needs opset 21 as much as a 16-bit default does.
            *(quant_type(name).min_opset for name in config.activation_type_overrides.values()),
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        if current >= self.min_opset:
            return ir.passes.PassResult(model, False)
        try:
            converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), self.min_opset)
        except Exception as error:  # noqa: BLE001  (the converter raises bare RuntimeErrors from C++)
            raise ModelError(
                f"Could not convert the model from opset {current} to {self.min_opset}, which the "
                f"chosen quantization formats need: {detail(error)}. Export the model "
                f"with opset {self.min_opset} or newer."
            ) from None
        logger.info("Converted the model from opset %d to %d", current, self.min_opset)
        upgraded = ir.serde.deserialize_model(converted)
        model.graph = upgraded.graph  # the model's opset imports are its graph's
        return ir.passes.PassResult(model, True)


@register_pass("fix-names")
class FixNames(ir.passes.InPlacePass):
    """Give every node and value a unique name, keeping the names that already are unique.

    Guarantees what the planner and the reports rely on: a node name identifies one node.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return common_passes.NameFixPass()(model)


@register_pass("check-model")
class CheckModel(ir.passes.InPlacePass):
    """Run onnx.checker on the model; a failure is a bug in an earlier pass, reported as such."""

    def __init__(self, context):
        super().__init__()
        self.workspace = context.workspace

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            if self.workspace is not None:
                # A large model is checked as a file whose weights are references (no 2 GB proto).
                with self.workspace.session_model(model) as path:
                    onnx.checker.check_model(path)
            else:
                onnx.checker.check_model(ir.serde.serialize_model(model))
        except onnx.checker.ValidationError as error:
            raise ModelError(
                f"The compiled model fails onnx.checker: {detail(error)}. This is a qcompile "
                "bug: please report it with the model, or exclude the node it names."
            ) from None
        return ir.passes.PassResult(model, False)
