"""How a target states, as data, what its execution provider accelerates.

In the spirit of torch.ao's quantizer specs: a target is a table of ``OpRule`` s read by one
planner (``qcompile.passes.quantization_plan``); adding a target is adding one module with a table,
never an ``if target == ...`` in a pass.
"""

from __future__ import annotations

__all__ = ["InputRole", "OutputRole", "TypeSource", "ConstantFormat", "OpRule", "Kernel", "KernelTable", "Target"]

import dataclasses
import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir


class InputRole(enum.Enum):
    """What a node input is, for quantization."""

    ACTIVATION = "activation"  # per-tensor activation parameters
    WEIGHT = "weight"  # constant, quantized per channel along OpRule.weight_axis
    BIAS = "bias"  # constant, int32 with scale = input scale * weight scale
    FLOAT = "float"  # left alone (shapes, indices, parameters)


class OutputRole(enum.Enum):
    """What happens to a quantized node's output."""

    QUANTIZE = "quantize"  # the kernel writes integers: a Q must follow for it to fuse
    OPTIONAL = "optional"  # the kernel can write float (e.g. MatMulIntegerToFloat): Q only if consumers want it
    SHARED = "shared"  # data movement: the output reuses the input's scale and zero point
    ABSORBED = "absorbed"  # a clamp (Relu, Clip) the next QuantizeLinear's saturation performs


class TypeSource(enum.Enum):
    """Which integer type a constant input is stored in, relative to the run's settings."""

    WEIGHT = "weight"  # the weight type (int8 by default)
    ACTIVATION = "activation"  # the activation type (uint8, uint16, ...)
    ACTIVATION_8BIT = "activation-8bit"  # 8 bits with the activation type's signedness (uint8 for uint16)


@dataclasses.dataclass(frozen=True)
class ConstantFormat:
    """How one constant input is stored: integer type, symmetry, and per channel or per tensor.

    ``per_channel`` uses the rule's ``weight_axis`` (and only when the run allows per-channel
    weights); otherwise the constant gets one scale. Asymmetric constants get a zero point that
    maps [min(w, 0), max(w, 0)] onto the type, like an activation.
    """

    qtype: TypeSource = TypeSource.WEIGHT
    symmetric: bool = True
    per_channel: bool = True


@dataclasses.dataclass(frozen=True)
class OpRule:
    """What the provider does with one op type when its inputs are quantized.

    ``anchor`` ops (Conv, MatMul, ...) are quantized wherever they have a float activation input;
    follower ops (Add, pooling, data movement, ...) only where every activation input is already
    quantized, so quantizing them never adds a requantization the float model did not need.
    ``weight_axis`` maps the node to the per-channel axis of its weight (None: per tensor).
    """

    op_type: str
    inputs: tuple[InputRole, ...]
    output: OutputRole
    anchor: bool = False
    weight_axis: Callable[[Any], int | None] | None = None
    # For lookups (Gather): the axis of a constant table input 0 that is stored as int8 with one
    # scale per slice, dequantized before the op runs in float (weight-only: the file shrinks).
    table_axis: Callable[[Any], int | None] | None = None
    # For ABSORBED ops: the float interval the op clamps to, given the node; None if unknown.
    clamp: Callable[[Any], tuple[float, float] | None] | None = None
    # Input index -> how that constant input is stored, where it differs from the target's default
    # (e.g. QNN's LayerNormalization scale: 8 bits with the activations' signedness, per tensor).
    constant_formats: Mapping[int, ConstantFormat] = dataclasses.field(default_factory=dict)
    # Activation type name -> (scale, zero point) the output must have whatever calibration says
    # (e.g. Softmax on QNN: uint8 1/256, zp 0). Such outputs are not calibrated.
    fixed_output: Mapping[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    # The op copies values without arithmetic (Concat, Reshape, MaxPool): in float it costs what it
    # costs on integers, so where no quantized node reads its output it is left float.
    moves_data: bool = False

    def role(self, index: int) -> InputRole:
        if index < len(self.inputs):
            return self.inputs[index]
        # Variadic ops (Concat) repeat their last role.
        return self.inputs[-1] if self.output is not OutputRole.ABSORBED else InputRole.FLOAT


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One op the provider has a kernel for, and the element types that kernel is registered for.

    ``typed_by`` names the tensor whose element type selects the kernel: ``"input:0"`` (a
    DequantizeLinear's integer input), ``"output:0"`` (a QuantizeLinear's integer output).
    ``types`` None: every type the op allows (a float op the input model already had).
    """

    op_type: str
    domain: str = ""
    types: frozenset[str] | None = None
    typed_by: str = "input:0"


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """Which of the ops a compile emits the provider runs itself (the rest go to the CPU provider).

    A table of the provider's kernel registrations for what qcompile writes: Q/DQ per integer
    type and the contrib ops its passes emit, not every ONNX op. Ops of the default domain that
    are not listed are the input model's own float ops and are taken as runnable; ops of any
    other domain (``com.microsoft`` contrib ops) run only where listed. The planner reads it (an
    int32 bias stays int32 only where ``DequantizeLinear`` has an int32 kernel), and the compile
    checks its output against it (``nodes_without_kernel``).
    """

    provider: str
    kernels: tuple[Kernel, ...]

    def _find(self, domain: str, op_type: str) -> Kernel | None:
        domain = "" if domain == "ai.onnx" else domain
        return next((k for k in self.kernels if k.op_type == op_type and k.domain == domain), None)

    def runs(self, domain: str, op_type: str, element_type: str | None = None) -> bool:
        """Whether the provider has a kernel for ``op_type`` whose typed tensor is ``element_type``."""
        kernel = self._find(domain, op_type)
        if kernel is None:
            return (domain or "") in ("", "ai.onnx")
        return kernel.types is None or element_type is None or element_type in kernel.types

    def nodes_without_kernel(self, model: ir.Model | onnx.ModelProto,
                             ignore: Collection[tuple[str, str]] = ()) -> list[dict[str, str]]:
        """The nodes of ``model`` (subgraphs included) the provider has no kernel for, each as
        {name, op_type, domain, element_type}: ONNX Runtime places them on the CPU provider.
        ``ignore``: (domain, op_type) pairs not to report (e.g. the input model's own ops)."""
        if isinstance(model, onnx.ModelProto):
            model = ir.serde.deserialize_model(model)
        missing = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            domain = "" if node.domain == "ai.onnx" else node.domain
            if (domain, node.op_type) in ignore:
                continue
            kernel = self._find(domain, node.op_type)
            element_type = _element_type(node, kernel.typed_by) if kernel is not None else None
            if not self.runs(domain, node.op_type, element_type):
                missing.append({"name": node.name or "", "op_type": node.op_type, "domain": domain,
                                "element_type": element_type or ""})
        return missing


def _element_type(node: ir.Node, typed_by: str) -> str | None:
    """The element type (lower case: "int8", "int32", "float8e4m3fn") of the tensor ``typed_by``
    names, None where unknown. Types of intermediates may be stripped (strip-value-info), so a
    QuantizeLinear's output type is read from its zero point or ``output_dtype``, like ONNX does."""
    where, index = typed_by.split(":")
    if where == "input":
        value = node.inputs[int(index)] if int(index) < len(node.inputs) else None
        if value is None:
            return None
        producer = value.producer()
        if value.dtype is None and producer is not None and producer.op_type == "QuantizeLinear":
            return _quantized_type(producer)
        return None if value.dtype is None else value.dtype.name.lower()
    if node.op_type == "QuantizeLinear":
        return _quantized_type(node)
    value = node.outputs[int(index)]
    return None if value.dtype is None else value.dtype.name.lower()


def _quantized_type(node: ir.Node) -> str:
    """A QuantizeLinear's output type: its zero point's, else ``output_dtype``, else uint8."""
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and zero_point.dtype is not None:
        return zero_point.dtype.name.lower()
    attribute = node.attributes.get("output_dtype")
    if attribute is not None and attribute.value:
        return ir.DataType(attribute.value).name.lower()
    return "uint8"


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: its provider, formats it accelerates, op rules and default pipeline."""

    name: str
    description: str
    providers: tuple[str, ...]
    activation_types: tuple[str, ...]
    weight_types: tuple[str, ...]
    default_activation_type: str
    default_weight_type: str
    activation_symmetric: bool
    weight_per_channel: bool
    rules: Mapping[str, OpRule]
    default_pipeline: Sequence[str]
    install_hint: str = ""
    # True: every op with a rule is planned like an anchor, quantized wherever its inputs can be,
    # so the provider sees no float op between quantized ones (NPUs that run integers only).
    # False: followers join only where their inputs are already quantized (CPU: no requantization).
    quantize_all: bool = False
    # How constants in activation positions (Add's bias, Mul's scale, a Gather table) are stored
    # when their op is quantized; None: like a per-tensor weight.
    constant_input_format: ConstantFormat | None = None
    # Activation type of attention-mask tensors (computed from integer inputs) and of the Adds that
    # read them, where it is wider than the run's type with the same signedness: a mask's fill and
    # the scores beside it need more than 8 bits (QNN: uint16, the rest of the graph uint8).
    mask_activation_type: str | None = None
    # Provider options for the target's provider (a plugin EP needs e.g. its backend library).
    provider_options: Callable[[], dict[str, str]] | None = None
    # Where the report's float-vs-quantized evaluation runs; None: ``providers``. A provider that a
    # plain session cannot open (a plugin EP) or that is slow to simulate evaluates on the CPU's
    # run of the same QDQ model, and ``verify`` checks the provider against that.
    evaluation_providers: tuple[str, ...] | None = None
    # Runs the compiled model on the target's provider after compiling: placement and fidelity
    # against the CPU provider's QDQ reference. Called as verify(compiled_proto, batches, config).
    verify: Callable[..., dict] | None = None
    # Inspects the provider-optimized model and says which quantized groups became integer kernels.
    fusion_report: Callable[..., dict] | None = None
    # How many significant bits the provider keeps of a weighted op's requantization multiplier,
    # input scale x weight scale / output scale (QNN HTP: fp16's 11); None: enough (float32).
    # Where that rounding can move an output code by a step or more (2**bits < the activation
    # type's span: 16-bit activations, not 8-bit ones) the planner makes the multiplier exact on
    # this grid: weight scales rounded up to ``bits`` significant bits, and the output scale the
    # input scale x a power of two (rounded up, so the calibrated range still fits).
    requantization_significand_bits: int | None = None
    # The provider's kernels for what a compile emits (see ``KernelTable``); None: the provider
    # runs every op and type qcompile writes (the CPU provider, whose kernels the rules describe).
    kernels: KernelTable | None = None
    # Ops whose bias is stored as float, already on the int32 grid input scale x weight scale:
    # the provider quantizes a float bias of a node whose input and weight are dequantized back
    # onto that grid itself when it fuses the node into an integer kernel (ORT's CPU provider:
    # Conv -> QLinearConv, Gemm -> QGemm, measured bit-identical to an int32 DequantizeLinear on
    # onnxruntime 1.31.1 and 1.32.0), so the int32 codes, their scales and the DequantizeLinear
    # are not stored (PP-LCNet direction classifier: 43.9 -> 39.8 % of the fp32 file).
    float_grid_bias_ops: frozenset[str] = frozenset()
    # Ops whose symmetric integer weight the provider fuses without a stored zero point (ONNX's
    # default, 0): ORT's CPU provider fuses Conv into QLinearConv so (onnxruntime 1.31.1 and
    # 1.32.0), but not Gemm into QGemm, so a Gemm's weight keeps its zero points.
    zero_point_free_weight_ops: frozenset[str] = frozenset()
    # Measured facts a user of this target should know before deploying, each carried by every
    # report as a warning (and logged): e.g. that the provider runs the QDQ model slower than fp32.
    warnings: tuple[str, ...] = ()
    # The default weight type where the run's activation type calls for another than
    # ``default_weight_type`` (CPU: int7 weights keep its 8-bit kernels from saturating; with
    # 16-bit activations there are no such kernels, so the weights keep all of int8's range).
    default_weight_type_by_activation: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def rule(self, op_type: str) -> OpRule | None:
        return self.rules.get(op_type)

    def weight_type_name(self, config) -> str:
        """The run's weight type: the config's, else the default for its activation type."""
        if config.weight_type:
            return config.weight_type
        activation_type = config.activation_type or self.default_activation_type
        return self.default_weight_type_by_activation.get(activation_type, self.default_weight_type)

    @property
    def int32_bias(self) -> bool:
        """Whether biases are stored as int32 DequantizeLinear on the input x weight scale grid
        (where integer kernels add them to their int32 accumulator) or left as float initializers.

        int32 only where the provider dequantizes int32: ORT's CUDA provider has no int32
        DequantizeLinear (its Q/DQ kernels are int8, uint8, int4, uint4 and FP8), so there an int32
        bias runs on the CPU provider, one CPU node per biased layer (issue 14: 20 of a
        ResNet-18-shaped CNN's 127 nodes); TensorRT and the CUDA kernels add a float bias anyway.
        """
        return self.kernels is None or self.kernels.runs("", "DequantizeLinear", "int32")

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "providers": list(self.providers),
            "activation_types": list(self.activation_types),
            "weight_types": list(self.weight_types),
            "default_activation_type": self.default_activation_type,
            "default_weight_type": self.default_weight_type,
            "default_weight_type_by_activation": dict(self.default_weight_type_by_activation),
            "activation_symmetric": self.activation_symmetric,
            "weight_per_channel": self.weight_per_channel,
            "quantized_ops": sorted(self.rules),
            "quantize_all": self.quantize_all,
            "fixed_output_encodings": {
                op: {t: list(v) for t, v in rule.fixed_output.items()}
                for op, rule in sorted(self.rules.items()) if rule.fixed_output
            },
            "default_pipeline": list(self.default_pipeline),
            "bias": ("float" if not self.int32_bias else
                     f"int32; {', '.join(sorted(self.float_grid_bias_ops))}: float on the int32 grid" if self.float_grid_bias_ops
                     else "int32"),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }
