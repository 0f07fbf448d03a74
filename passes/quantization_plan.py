"""Decide what to quantize: which nodes, tensors, weights and biases, with which parameters.

The planner reads the target's rule table (``qcompile.backends``) and the calibration table; it
changes nothing in the graph. ``insert-qdq`` carries the plan out.
"""

from __future__ import annotations

__all__ = [
    "ActivationQuant",
    "WeightQuant",
    "BiasQuant",
    "QuantizationPlan",
    "build_plan",
    "require_plan",
    "PlanQuantization",
    "KEEP_FLOAT",
    "plan_nodes",
]

import dataclasses
import hashlib
import logging
import re

import numpy as np
import onnx_ir as ir

from qcompile.backends.base import ConstantFormat, InputRole, OutputRole, Target, TypeSource
from qcompile.core.config import CompileConfig
from qcompile.errors import ConfigError
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import (
    QuantType,
    activation_qparams,
    activation_zero_point,
    constant_qparams,
    full_range,
    power_of_two_multiple,
    quant_type,
)
from qcompile.numerics.statistics import CalibrationTable
from qcompile.io.workspace import release_tensor

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT}


@dataclasses.dataclass
class ActivationQuant:
    """Per-tensor quantization of one activation; ``shares`` names the tensor whose parameters it reuses.

    ``fixed`` is set when the parameters do not come from calibration: a fixed output encoding
    of the target (Softmax), or the parameters of the constant a data-movement op reads.
    """

    tensor: str
    qtype: QuantType
    symmetric: bool
    shares: str | None = None
    fixed: tuple[np.float32, int] | None = None
    rmin: float | None = None
    rmax: float | None = None
    scale: np.float32 | None = None
    zero_point: int | None = None


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    node: str
    input_index: int
    axis: int | None
    qtype: QuantType
    symmetric: bool = True
    # Scales rounded up to this many significant bits (the target's requantization precision).
    significand_bits: int | None = None
    # False: the all-zero zero points are not stored (``Target.zero_point_free_weight_ops``).
    zero_point_stored: bool = True


@dataclasses.dataclass(frozen=True)
class BiasQuant:
    """A bias on the int32 grid (scale of ``activation``) x (scales of the node's weight input):
    stored as int32 codes with a DequantizeLinear, or with ``stored_float`` as the float values of
    that grid, which the provider quantizes itself (``Target.float_grid_bias_ops``)."""

    node: str
    input_index: int
    activation: str
    weight_index: int
    stored_float: bool = False


@dataclasses.dataclass
class QuantizationPlan:
    nodes: dict[str, str] = dataclasses.field(default_factory=dict)  # node name -> op type
    anchors: set[str] = dataclasses.field(default_factory=set)
    activations: dict[str, ActivationQuant] = dataclasses.field(default_factory=dict)
    weights: list[WeightQuant] = dataclasses.field(default_factory=list)
    biases: list[BiasQuant] = dataclasses.field(default_factory=list)
    absorbed: set[str] = dataclasses.field(default_factory=set)
    float_nodes: dict[str, str] = dataclasses.field(default_factory=dict)  # node name -> why float
    float_tensors: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> why float
    calibrate: list[str] = dataclasses.field(default_factory=list)  # tensors calibration observes
    # calibration_method = "auto": tensor -> the method chosen for it.
    calibration_methods: dict[str, str] = dataclasses.field(default_factory=dict)
    # Target.requantization_significand_bits: node -> its output scale, calibrated and as chosen.
    exact_requantization: dict[str, dict] = dataclasses.field(default_factory=dict)
    # The graph the plan was made for (graph_fingerprint): calibrate refines this plan with its
    # statistics instead of planning again, unless a pass in between changed the graph.
    fingerprint: str = ""
    # Set by insert-qdq once the plan is in the graph: from then on it records what was done
    # (the report reads it) and no graph change drops it (qcompile.core.context.Analyses).
    applied: bool = False

    def summary(self) -> dict:
        op_counts: dict[str, int] = {}
        for op_type in self.nodes.values():
            op_counts[op_type] = op_counts.get(op_type, 0) + 1
        return {
            "quantized_nodes": len(self.nodes),
            "quantized_by_op_type": dict(sorted(op_counts.items())),
            "quantized_activations": len(self.activations),
            "quantized_weights": len(self.weights),
            "quantized_biases": len(self.biases),
            "float_nodes": dict(sorted(self.float_nodes.items())),
            "float_tensors": dict(sorted(self.float_tensors.items())),
            **({"calibration_methods": {m: sorted(t for t, c in self.calibration_methods.items() if c == m)
                                        for m in sorted(set(self.calibration_methods.values()))}}
               if self.calibration_methods else {}),
            **({"exact_requantization": {
                "nodes": len(self.exact_requantization),
                # Output resolution given up: log2(chosen / calibrated scale), in [0, 1) bit each.
                "mean_bits_lost": round(float(np.mean([e["bits_lost"] for e in self.exact_requantization.values()])), 3),
            }} if self.exact_requantization else {}),
        }


_UNREACHED = "no calibration statistics"


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _is_float_activation(value: ir.Value | None) -> bool:
    # An unknown dtype (an op shape inference does not know) is settled by calibration.
    return value is not None and not _is_constant(value) and (value.dtype is None or value.dtype in _FLOAT_TYPES)


# A constant this small is a mask's fill value (0, 1, float32 min); a larger one is a table of
# signal (an embedding), and what is looked up in it is signal too.
_MASK_CONSTANT_LIMIT = 16
# Lookup tables smaller than this stay float: the saving would not pay for a DequantizeLinear.
_TABLE_MIN_SIZE = 4096


def plan_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The nodes the planner considers: ``graph``'s, and those of its If branches at any depth,
    each If before its branches' nodes. Loop and Scan bodies are not entered: a value there has
    one value per iteration, which calibration cannot observe (``workspace.add_outputs``), so
    they stay float (and valid)."""
    return list(ir.traversal.RecursiveGraphIterator(
        graph, recursive=lambda node: node.op_type == "If" and node.domain in ("", "ai.onnx")))


def _outer_reads(node: ir.Node) -> list[ir.Value]:
    """Values the subgraphs of ``node`` read from enclosing scopes: its implicit inputs."""
    subgraphs = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    if not subgraphs:
        return []
    inner = [n for g in subgraphs for n in ir.traversal.RecursiveGraphIterator(g)]
    defined = {v.name for g in subgraphs for v in (*g.inputs, *g.initializers.values())}
    defined |= {o.name for n in inner for o in n.outputs}
    for n in inner:
        for a in n.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                defined |= {v.name for v in (*a.value.inputs, *a.value.initializers.values())}
    return [v for n in inner for v in n.inputs if v is not None and v.name not in defined]


def _mask_tensors(graph: ir.Graph) -> dict[str, str]:
    """Float tensors computed only from non-float graph inputs and small constants.

    An additive attention mask is the typical case: Cast(int64 mask) -> Sub(1, .) -> Mul(float32 min).
    Such tensors carry structure, not signal, and a quantizer must not give them a scale. An
    embedding lookup (Gather from a large float table by integer ids) is signal, not a mask.
    """
    derived: set[str] = {v.name for v in graph.inputs if v.dtype not in _FLOAT_TYPES}
    masks = {}
    for node in plan_nodes(graph):
        # An If's outputs come from what its branches read (silero-vad's If on the int64 sample
        # rate returns the audio's speech probability): not a mask unless those reads are.
        live = [v for v in (*node.inputs, *_outer_reads(node)) if v is not None and not _is_constant(v)]
        if not live or not all(v.name in derived for v in live):
            continue
        tables = [
            v for v in node.inputs
            if _is_constant(v) and v.dtype in _FLOAT_TYPES and v.const_value.size > _MASK_CONSTANT_LIMIT
        ]
        if tables:
            continue
        for out in node.outputs:
            derived.add(out.name)
            if out.dtype in _FLOAT_TYPES:
                masks[out.name] = "computed only from integer/bool inputs and constants (a mask)"
    return masks


# Node metadata key by which a pass marks a node it added to stay float (the value says why): the
# float branch of split-outliers. The mark travels with the node, so any re-plan respects it.
KEEP_FLOAT = "qcompile.keep_float"


class _Exclusions:
    def __init__(self, config: CompileConfig):
        self.names = set(config.exclude_nodes)
        self.op_types = set(config.exclude_op_types)
        try:
            self.patterns = [re.compile(p) for p in config.exclude_regex]
        except re.error as error:
            raise ConfigError(f"exclude_regex has an invalid regular expression: {error}.") from None

    def reason(self, node: ir.Node) -> str | None:
        if (why := node.metadata_props.get(KEEP_FLOAT)) is not None:
            return why
        if node.name in self.names:
            return "excluded by name in the config"
        if node.op_type in self.op_types:
            return "op type excluded in the config"
        if any(p.search(node.name or "") for p in self.patterns):
            return "excluded by exclude_regex in the config"
        return None


def _check_activation_type(name: str, target: Target, where: str) -> QuantType:
    if name not in target.activation_types:
        raise ConfigError(
            f"Target {target.name!r} does not accelerate {name} activations ({where}); it supports "
            f"{', '.join(target.activation_types)}."
        )
    return quant_type(name)


def _activation_settings(config: CompileConfig, target: Target) -> tuple[QuantType, bool]:
    name = config.activation_type or target.default_activation_type
    symmetric = target.activation_symmetric if config.activation_symmetric is None else config.activation_symmetric
    qtype = _check_activation_type(name, target, "activation_type")
    # FP8 zero points are 0: FP8 activations are symmetric whatever the target's integer default.
    return qtype, symmetric or qtype.is_float


class _ActivationTypes:
    """The activation type of each tensor: ``activation_type_overrides`` (first matching regular
    expression over the tensor name), else the target's mask type for mask tensors and what reads
    them (when wider than the run's type), else the run's activation type."""

    def __init__(self, config: CompileConfig, target: Target, default: QuantType, masks: set[str]):
        self.default = default
        self.masks = set()
        if target.mask_activation_type is not None:
            wide = _check_activation_type(target.mask_activation_type, target, "mask_activation_type")
            if wide.signed == default.signed and wide.qmax - wide.qmin > default.qmax - default.qmin:
                self.masks, self.mask_type = masks, wide
        self.overrides = []
        for pattern, name in config.activation_type_overrides.items():
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"activation_type_overrides has an invalid regular expression {pattern!r}: {error}.") from None
            self.overrides.append((regex, _check_activation_type(name, target, f"activation_type_overrides[{pattern!r}]")))

    def __call__(self, tensor: str) -> QuantType:
        override = next((qtype for regex, qtype in self.overrides if regex.search(tensor)), None)
        if override is not None:
            return override
        return self.mask_type if tensor in self.masks else self.default


def _weight_settings(config: CompileConfig, target: Target) -> tuple[QuantType, bool]:
    name = target.weight_type_name(config)
    if name not in target.weight_types:
        raise ConfigError(
            f"Target {target.name!r} does not accelerate {name} weights; it supports "
            f"{', '.join(target.weight_types)}."
        )
    per_channel = target.weight_per_channel if config.per_channel is None else config.per_channel
    return quant_type(name), per_channel


# Weights (role WEIGHT) and constants elsewhere when the target names no format of its own.
_WEIGHT_FORMAT = ConstantFormat(TypeSource.WEIGHT, symmetric=True, per_channel=True)
_CONSTANT_FORMAT = ConstantFormat(TypeSource.WEIGHT, symmetric=True, per_channel=False)
# A constant that a data-movement op reads (a lookup table): stored like the activation it becomes,
# so the op's output can keep exactly its parameters.
_SHARED_CONSTANT_FORMAT = ConstantFormat(TypeSource.ACTIVATION, symmetric=False, per_channel=False)


def _fixed(scale: float, zero_point: int) -> tuple[np.float32, int]:
    return np.float32(scale), int(zero_point)


def _set_fixed(quant: ActivationQuant) -> ActivationQuant:
    """Give an activation with a fixed encoding its parameters now: it is not calibrated."""
    if quant.fixed is not None:
        quant.scale, quant.zero_point = quant.fixed
        quant.rmin = float((quant.qtype.qmin - quant.zero_point) * quant.scale)
        quant.rmax = float((quant.qtype.qmax - quant.zero_point) * quant.scale)
    return quant


def _build_once(
    graph: ir.Graph,
    target: Target,
    config: CompileConfig,
    excluded_tensors: dict[str, str],
    unabsorbable: set[str],
) -> QuantizationPlan:
    plan = QuantizationPlan(float_tensors=dict(excluded_tensors))
    act_type, symmetric = _activation_settings(config, target)
    masks = _mask_tensors(graph)
    # A mask and the sums that read it (scores + mask, the Softmax input).
    masks = set(masks) | {
        out.name for node in plan_nodes(graph) if any(v is not None and v.name in masks for v in node.inputs)
        for out in node.outputs
    }
    type_of = _ActivationTypes(config, target, act_type, masks)
    weight_type, per_channel = _weight_settings(config, target)
    exclusions = _Exclusions(config)
    nodes = plan_nodes(graph)
    quantized: set[ir.Node] = set()
    wanted: set[str] = set()  # activation tensors some quantized node reads

    def quantizable(value: ir.Value | None) -> bool:
        return _is_float_activation(value) and value.name not in excluded_tensors

    def rule_for(node: ir.Node):
        if node.domain not in ("", "ai.onnx"):
            return None
        return target.rule(node.op_type)

    def is_anchor(rule) -> bool:
        return rule.anchor or (target.quantize_all and rule.output is not OutputRole.ABSORBED)

    def constant_format(rule, index: int) -> ConstantFormat:
        if index in rule.constant_formats:
            return rule.constant_formats[index]
        if rule.role(index) is InputRole.WEIGHT:
            return _WEIGHT_FORMAT
        if rule.output is OutputRole.SHARED:
            return _SHARED_CONSTANT_FORMAT
        return target.constant_input_format or _CONSTANT_FORMAT

    def resolve_type(source: TypeSource, node: ir.Node) -> QuantType:
        if source is TypeSource.WEIGHT:
            return weight_type
        # A constant in an activation position is stored like the activation the node writes.
        node_type = type_of(node.outputs[0].name) if node.outputs else act_type
        if source is TypeSource.ACTIVATION:
            return node_type
        return quant_type("int8" if node_type.signed else "uint8")

    fixed_by_constant: dict[str, tuple[np.float32, int]] = {}  # output of data movement -> its constant's

    # 1. Anchors (every op with a rule, for quantize_all targets): quantized wherever their
    # activation inputs can be.
    for node in nodes:
        rule = rule_for(node)
        if rule is None or not is_anchor(rule):
            continue
        if (why := exclusions.reason(node)) is not None:
            plan.float_nodes[node.name] = why
            continue
        activations, weights, biases = [], [], []
        for index, value in enumerate(node.inputs):
            role = rule.role(index)
            if value is None or role is InputRole.FLOAT:
                continue
            if role is InputRole.BIAS:
                biases.append(index)
            elif _is_constant(value) and value.dtype in _FLOAT_TYPES:
                weights.append(index)
            else:
                activations.append(index)
        # A lookup in a constant table by computed indices has no activation input but still runs
        # on the provider: quantize_all targets store the table like an activation.
        reads_live = any(v is not None and not _is_constant(v) for v in node.inputs)
        if not activations and not (target.quantize_all and weights and reads_live):
            plan.float_nodes[node.name] = "no activation input"
            continue
        sentinels = [
            node.inputs[i].name for i in weights
            if not np.isfinite(arr := node.inputs[i].const_value.numpy()).all()
            or np.abs(arr).max(initial=0.0) >= config.sentinel_threshold
        ]
        arr = None
        for i in weights:  # a large model's weights were mapped to check them: unmap them
            release_tensor(node.inputs[i].const_value)
        if sentinels:
            # A mask's fill value (float32 min): on any integer grid it would swamp or overflow.
            plan.float_nodes[node.name] = f"constant {sentinels[0]!r} is a sentinel (magnitude >= sentinel_threshold)"
            continue
        if rule.anchor and len(activations) > 1 and not config.quantize_activation_matmul:
            plan.float_nodes[node.name] = "both inputs are activations (quantize_activation_matmul = false)"
            continue
        blocked = [node.inputs[i].name for i in activations if not quantizable(node.inputs[i])]
        if blocked:
            reason = excluded_tensors.get(blocked[0], "input is not a float32 tensor")
            plan.float_nodes[node.name] = f"input {blocked[0]!r} stays float: {reason}"
            if reason.startswith(_UNREACHED):
                # A branch the calibration data never took (silero's 8 kHz model beside its 16 kHz
                # one): no activation scale, but its weights still need no data. Stored as integers
                # and dequantized to float (weight-only), the branch keeps working and the file
                # shrinks. All of the type's range: no integer kernel multiplies them.
                stored = weight_type if weight_type.is_float else full_range(weight_type)
                axis = rule.weight_axis(node) if per_channel and rule.weight_axis is not None else None
                kept = [i for i in weights if rule.role(i) is InputRole.WEIGHT]
                for index in kept:
                    rank = node.inputs[index].const_value.numpy().ndim
                    plan.weights.append(WeightQuant(node.name, index, None if axis is None or rank < 2 else axis % rank, stored))
                if kept:
                    plan.float_nodes[node.name] += "; weights stored as integers (weight-only)"
            continue
        if any(not _is_constant(node.inputs[i]) or node.inputs[i].const_value.numpy().ndim != 1 for i in biases):
            plan.float_nodes[node.name] = "bias is not a constant vector"
            continue
        quantized.add(node)
        plan.anchors.add(node.name)
        wanted.update(node.inputs[i].name for i in activations)
        for index in weights:
            fmt = constant_format(rule, index)
            qtype = resolve_type(fmt.qtype, node)
            axis = None
            if (
                per_channel and fmt.per_channel and rule.role(index) is InputRole.WEIGHT
                and rule.weight_axis is not None
            ):
                axis = rule.weight_axis(node)
                rank = node.inputs[index].const_value.numpy().ndim
                axis = None if rank < 2 else axis % rank
            zero_point_free = fmt.symmetric and not qtype.is_float and node.op_type in target.zero_point_free_weight_ops
            plan.weights.append(WeightQuant(node.name, index, axis, qtype, fmt.symmetric, zero_point_stored=not zero_point_free))
            if rule.output is OutputRole.SHARED and index == 0:
                scale, zero_point = constant_qparams(node.inputs[0].const_value.numpy(), None, qtype, fmt.symmetric)
                for out in node.outputs:
                    fixed_by_constant[out.name] = _fixed(scale[0], zero_point[0])
        for index in biases:
            weight_index = next((i for i in weights if rule.role(i) is InputRole.WEIGHT), None)
            if weight_index is None or weight_type.is_float or not target.int32_bias:
                # No quantized weight to derive the bias scale from; or FP8: FP8 GEMMs accumulate
                # in float and add a float bias, there is no int32 accumulator grid; or a provider
                # without an int32 DequantizeLinear (CUDA: it would run on the CPU). Bias stays float.
                continue
            plan.biases.append(BiasQuant(node.name, index, node.inputs[activations[0]].name, weight_index,
                                         stored_float=node.op_type in target.float_grid_bias_ops))

    # Lookup tables (embeddings): stored as integers, one scale per looked-up slice.
    for node in nodes:
        rule = rule_for(node)
        table = node.inputs[0] if node.inputs else None
        if (
            rule is not None and rule.table_axis is not None and _is_constant(table)
            and table.dtype in _FLOAT_TYPES and table.const_value.size >= _TABLE_MIN_SIZE
            and exclusions.reason(node) is None
        ):
            axis = rule.table_axis(node) % len(table.shape)
            # ONNX Gather reads no float8 table: with FP8 weights a table is stored as int8 rows
            # (weight-only: looked-up rows are dequantized to float, no integer kernel involved).
            # A looked-up row is dequantized to float, no kernel multiplies it: all of int8's range.
            table_type = quant_type("int8") if weight_type.is_float else full_range(weight_type)
            plan.weights.append(WeightQuant(node.name, 0, axis if per_channel else None, table_type))

    # 2. Followers: join while every activation input is already quantized; repeat to a fixed point.
    def produces_integers(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None or producer not in quantized:
            return False
        return rule_for(producer).output in (OutputRole.QUANTIZE, OutputRole.SHARED, OutputRole.ABSORBED)

    changed = True
    while changed:
        changed = False
        for node in nodes:
            rule = rule_for(node)
            if rule is None or is_anchor(rule) or node in quantized:
                continue
            if (why := exclusions.reason(node)) is not None:
                plan.float_nodes[node.name] = why
                continue
            inputs = [
                v for i, v in enumerate(node.inputs) if v is not None and rule.role(i) is InputRole.ACTIVATION
            ]
            if not inputs or not all(quantizable(v) for v in inputs):
                continue
            if rule.output is OutputRole.ABSORBED:
                source = inputs[0]
                producer = source.producer()
                if (
                    node.name in unabsorbable
                    # No QuantizeLinear can perform the clamp of an output that stays float (a sentinel).
                    or not quantizable(node.outputs[0])
                    or producer not in quantized
                    or rule_for(producer).output not in (OutputRole.QUANTIZE, OutputRole.OPTIONAL)
                    or len(source.uses()) != 1
                    or source.is_graph_output()
                    or rule.clamp is None
                    or rule.clamp(node) is None
                ):
                    if not target.quantize_all:
                        continue
                    # Not foldable into a Q, but the provider must still run it on integers.
                    quantized.add(node)
                    wanted.update(v.name for v in inputs)
                    changed = True
                    continue
            elif not all(v.name in wanted or produces_integers(v) for v in inputs):
                continue
            quantized.add(node)
            if rule.output is not OutputRole.ABSORBED:
                wanted.update(v.name for v in inputs)
            else:
                plan.absorbed.add(node.name)
            changed = True

    # 2b. Data-movement followers whose outputs no quantized node reads give nothing back for their rounding:
    # a Concat of a YOLO head's box and class logits, read only by a float Sigmoid, would put the
    # class logits on the box logits' grid (nudenet: box F1 73 %). They stay float, reading the
    # dequantized inputs. An NPU runs every op on integers: it keeps them.
    if not target.quantize_all:
        wanted = _drop_unread_followers(graph, nodes, quantized, rule_for, is_anchor, wanted)

    # 3. Tensors: what quantized nodes read, and what they write where their kernels write integers.
    activations: dict[str, ActivationQuant] = {}
    absorbed_inputs = {n.inputs[0].name for n in quantized if n.name in plan.absorbed}
    for node in nodes:
        if node not in quantized:
            continue
        plan.nodes[node.name] = node.op_type
        rule = rule_for(node)
        for out in node.outputs:
            if not quantizable(out) or out.name in absorbed_inputs:
                continue
            qtype = type_of(out.name)
            if out.name in fixed_by_constant:
                activations[out.name] = _set_fixed(
                    ActivationQuant(out.name, qtype, symmetric, fixed=fixed_by_constant[out.name])
                )
            elif rule.output is OutputRole.SHARED:
                # Data movement keeps its input's type too (set from the root once planned).
                activations[out.name] = ActivationQuant(out.name, qtype, symmetric, shares=node.inputs[0].name)
            elif (
                is_anchor(rule) and not target.quantize_all
                and _feeds_only_float_data_movement(graph, out, quantized, rule_for)
            ):
                # A detection head's logits into a float Concat/Reshape (2b): the QuantizeLinear
                # would only round them. The node writes float (ORT runs that Conv on the
                # dequantized inputs).
                plan.float_tensors.setdefault(out.name, "only float data movement reads it")
                continue
            elif rule.output in (OutputRole.QUANTIZE, OutputRole.ABSORBED) or out.name in wanted:
                encoding = rule.fixed_output.get(qtype.name)
                fixed = _fixed(*encoding) if encoding is not None else None
                activations.setdefault(out.name, _set_fixed(ActivationQuant(out.name, qtype, symmetric, fixed=fixed)))
    for name in wanted:
        activations.setdefault(name, ActivationQuant(name, type_of(name), symmetric))
    if target.quantize_all:
        # An NPU's kernels read integers, so an absorbed clamp keeps the Q before it too, with the
        # clamp's output parameters: the producer's requantization saturates once (QNN fuses
        # Conv + Relu into one rounding with these parameters) and the clamp is exact on the grid,
        # where two encodings would round twice and differ from the fused kernel by a step.
        for node in nodes:
            if node in quantized and node.name in plan.absorbed:
                source, out = node.inputs[0].name, node.outputs[0].name
                activations[source] = ActivationQuant(source, type_of(source), symmetric, shares=out)
    for quant in activations.values():
        if quant.shares is not None and quant.shares in activations:
            root = quant
            seen = set()
            while root.shares is not None and root.shares in activations and root.shares not in seen:
                seen.add(root.shares)
                root = activations[root.shares]
            quant.qtype = root.qtype
    # Keep graph order so the rewrite is deterministic.
    order = {v.name: i for i, v in enumerate(list(graph.inputs) + [o for n in nodes for o in n.outputs])}
    plan.activations = dict(sorted(activations.items(), key=lambda kv: order.get(kv[0], 0)))
    # Fixed encodings are observed too: if a re-plan leaves their producer float, they need statistics.
    plan.calibrate = [
        name for name in plan.activations if plan.activations[name].shares is None
    ] + sorted(absorbed_inputs)
    for node in nodes:
        if node not in quantized and rule_for(node) is not None and node.name not in plan.float_nodes:
            plan.float_nodes[node.name] = "its inputs are not quantized (it would need a requantization)"
    # The provider quantizes a float bias only in a node it fuses with its output's QuantizeLinear
    # (ORT: a Gemm with a float output becomes QGemm with an int32 bias, not with a float one).
    by_name = {n.name: n for n in nodes}
    plan.biases = [dataclasses.replace(b, stored_float=_output_quantized(by_name[b.node], plan)) if b.stored_float else b
                   for b in plan.biases]
    return plan


def _output_quantized(node: ir.Node, plan: QuantizationPlan) -> bool:
    """Whether ``node``'s output, or that of the absorbed Relu/Clip that alone reads it, is quantized."""
    out = node.outputs[0]
    if out.name in plan.activations:
        return True
    uses = out.uses()
    return len(uses) == 1 and uses[0].node.name in plan.absorbed and uses[0].node.outputs[0].name in plan.activations


def _read_quantized(graph: ir.Graph, value: ir.Value, quantized: set, rule_for) -> bool:
    """Whether a quantized node reads ``value`` as a quantized input. An output of an If branch
    counts as read: what reads the If's output decides, and the branch must keep its form."""
    if value.is_graph_output() and value.graph is not graph:
        return True
    return any(
        user in quantized and rule_for(user).role(index) is not InputRole.FLOAT for user, index in value.uses()
    )


def _feeds_only_float_data_movement(graph: ir.Graph, value: ir.Value, quantized: set, rule_for) -> bool:
    """Whether ``value`` is read, and only by float data-movement nodes (``OpRule.moves_data``, not
    quantized), besides being an output of the main graph. An If branch's output is not: what
    reads the If decides. A Conv that writes a graph output and nothing else keeps its
    QuantizeLinear: without it ONNX Runtime has no integer kernel for it."""
    if value.is_graph_output() and value.graph is not graph:
        return False
    uses = list(value.uses())
    if not uses:
        return False
    for user, _ in uses:
        rule = rule_for(user)
        if user in quantized or rule is None or not rule.moves_data:
            return False
    return True


def _drop_unread_followers(
    graph: ir.Graph, nodes, quantized: set, rule_for, is_anchor, wanted: set[str]
) -> set[str]:
    """Remove from ``quantized`` the data-movement followers (``OpRule.moves_data``: Concat,
    Reshape, MaxPool, ...) none of whose outputs a quantized node reads as a quantized input;
    return the activation tensors the remaining quantized nodes read. Reverse graph order: one read
    only by a dropped one is dropped too. Followers that compute (Add, GlobalAveragePool) keep
    their integer kernels: they cost time in float, data movement does not."""
    dropped = False
    for node in reversed(nodes):
        rule = rule_for(node)
        if (
            node in quantized and not is_anchor(rule) and rule.moves_data
            and not any(_read_quantized(graph, out, quantized, rule_for) for out in node.outputs)
        ):
            quantized.discard(node)
            dropped = True
    if not dropped:
        return wanted
    # What only dropped followers read is wanted no more; what an anchor or a kept node reads is.
    still = set()
    for node in nodes:
        if node not in quantized:
            continue
        rule = rule_for(node)
        for index, value in enumerate(node.inputs):
            if value is not None and value.name in wanted and rule.role(index) is not InputRole.FLOAT:
                still.add(value.name)
    return still


def _root(plan: QuantizationPlan, name: str) -> ActivationQuant:
    quant = plan.activations[name]
    seen = set()
    while quant.shares is not None and quant.shares in plan.activations and quant.shares not in seen:
        seen.add(quant.shares)
        quant = plan.activations[quant.shares]
    return quant


def graph_fingerprint(graph: ir.Graph) -> str:
    """A digest of what a plan is made from: every planned-over node's name, type and inputs, in order."""
    digest = hashlib.sha256()
    for node in plan_nodes(graph):
        digest.update(repr((node.name, node.domain, node.op_type, [v.name if v is not None else None for v in node.inputs])).encode())
    return digest.hexdigest()


def build_plan(
    model: ir.Model,
    target: Target,
    config: CompileConfig,
    table: CalibrationTable | None = None,
    planned: QuantizationPlan | None = None,
) -> QuantizationPlan:
    """Plan the quantization of ``model``; with a calibration table, also fix every scale.

    Tensors whose statistics show a mask or sentinel (non-finite values, or a magnitude at or
    above ``config.sentinel_threshold``) stay float, and so do the nodes that would read them;
    a Relu/Clip is folded into the QuantizeLinear after it only when that Q's range really
    performs its clamp. Each exclusion re-plans until nothing changes. ``planned``: the plan
    ``plan-quantization`` made; when it was made for this very graph, it is refined rather than
    made again (the same rules on the same graph give the same plan), so a compile plans once
    unless its statistics exclude a tensor.
    """
    graph = model.graph
    fingerprint = graph_fingerprint(graph)
    if planned is not None and planned.fingerprint != fingerprint:
        logger.info("the graph changed since plan-quantization: planning again")
        planned = None
    # On a target that runs every op on integers, a mask is quantized too: its two values (0 and
    # the fill) are exact on an 8-bit grid. A sentinel fill (float32 min) still stays float, from
    # its calibrated magnitude.
    excluded = {} if target.quantize_all else _mask_tensors(graph)
    unabsorbable: set[str] = set()
    while True:
        plan, planned = planned or _build_once(graph, target, config, excluded, unabsorbable), None
        plan.fingerprint = fingerprint
        if table is None:
            return plan
        newly_excluded = {}
        for name, quant in plan.activations.items():
            if (quant.shares is not None and quant.shares in plan.activations) or quant.fixed is not None:
                continue
            stats = table.tensors.get(name)
            if name in table.non_float:
                newly_excluded[name] = f"not a float32 tensor ({table.non_float[name]} at calibration)"
            elif stats is None or stats.is_empty:
                newly_excluded[name] = f"{_UNREACHED} (never computed on the calibration data)"
            elif stats.nonfinite:
                newly_excluded[name] = f"{stats.nonfinite} non-finite values in calibration (a mask or sentinel)"
            elif stats.abs_max >= config.sentinel_threshold:
                newly_excluded[name] = (
                    f"magnitude {stats.abs_max:.3g} >= sentinel_threshold {config.sentinel_threshold:g} "
                    "(a mask or sentinel, not a signal)"
                )
        if newly_excluded:
            excluded.update(newly_excluded)
            continue
        for quant in plan.activations.values():
            if (quant.shares is not None and quant.shares in plan.activations) or quant.fixed is not None:
                continue
            levels = quant.qtype.qmax - quant.qtype.qmin + 1
            method = config.calibration_method
            if method == "auto":
                method = plan.calibration_methods[quant.tensor] = table[quant.tensor].best_method(
                    levels, config.percentile, qtype=quant.qtype
                )
            quant.rmin, quant.rmax = table[quant.tensor].range(method, levels, config.percentile, qtype=quant.qtype)
            quant.scale, quant.zero_point = activation_qparams(quant.rmin, quant.rmax, quant.qtype, quant.symmetric)
        if target.requantization_significand_bits is not None:
            _exact_requantization(graph, plan, target)
        for quant in plan.activations.values():
            root = _root(plan, quant.tensor)
            quant.rmin, quant.rmax, quant.scale, quant.zero_point = root.rmin, root.rmax, root.scale, root.zero_point
        broken = {name for name in plan.absorbed if not _clamp_implied(graph, name, plan, target)}
        if broken:
            unabsorbable |= broken
            continue
        return plan


def _exact_requantization(graph: ir.Graph, plan: QuantizationPlan, target: Target) -> None:
    """Make each weighted op's requantization multiplier exact on the target's grid of
    ``target.requantization_significand_bits`` significant bits, where the output type is wide
    enough for that rounding to matter.

    multiplier = input scale x weight scale / output scale. With weight scales of ``bits``
    significant bits and output scale = input scale x 2**k, it is a weight scale times a power of
    two: exact. The output scale is rounded up (``power_of_two_multiple``) so the calibrated range
    still fits, at the cost of up to 1 bit of output resolution; the zero point follows the new
    scale. Graph order: an op's input scale is final (its producer came earlier) when it is read.
    """
    bits = target.requantization_significand_bits
    weights_of: dict[str, list[int]] = {}
    for i, w in enumerate(plan.weights):
        weights_of.setdefault(w.node, []).append(i)
    clamps = {node.outputs[0].name: node for node in plan_nodes(graph) if node.name in plan.absorbed}
    for node in plan_nodes(graph):
        rule = target.rule(node.op_type)
        if node.name not in plan.anchors or rule is None or not rule.anchor:
            continue
        weights = [
            i for i in weights_of.get(node.name, [])
            if rule.role(plan.weights[i].input_index) is InputRole.WEIGHT and not plan.weights[i].qtype.is_float
        ]
        inputs = [
            v.name for index, v in enumerate(node.inputs)
            if v is not None and rule.role(index) is InputRole.ACTIVATION and v.name in plan.activations
        ]
        if not weights or len(inputs) != 1 or node.outputs[0].name not in plan.activations:
            continue
        out = _root(plan, node.outputs[0].name)
        # 2**bits levels or fewer: the multiplier's rounding moves a code by under a step.
        if out.fixed is not None or (out.qtype.qmax - out.qtype.qmin) < 2**bits or out.qtype.is_float:
            continue
        clamp = clamps.get(out.tensor)
        if clamp is not None and np.isfinite(target.rule(clamp.op_type).clamp(clamp)[1]):
            continue  # a wider range would no longer perform the clamp's upper bound (Clip(0, 6))
        for i in weights:
            plan.weights[i] = dataclasses.replace(plan.weights[i], significand_bits=bits)
        calibrated = out.scale
        out.scale = power_of_two_multiple(calibrated, _root(plan, inputs[0]).scale)
        out.zero_point = activation_zero_point(out.rmin, out.scale, out.qtype, out.symmetric)
        plan.exact_requantization[node.name] = {
            "tensor": out.tensor, "calibrated_scale": float(calibrated), "scale": float(out.scale),
            "bits_lost": round(float(np.log2(out.scale / calibrated)), 4),
        }


def _clamp_implied(graph: ir.Graph, node_name: str, plan: QuantizationPlan, target: Target) -> bool:
    """Whether the QuantizeLinear after an absorbed Relu/Clip saturates inside the op's clamp."""
    node = next(n for n in plan_nodes(graph) if n.name == node_name)
    low, high = target.rule(node.op_type).clamp(node)
    quant = plan.activations[node.outputs[0].name]
    q_low = (quant.qtype.qmin - quant.zero_point) * float(quant.scale)
    q_high = (quant.qtype.qmax - quant.zero_point) * float(quant.scale)
    tolerance = float(quant.scale) * 1e-3
    return q_low >= low - tolerance and q_high <= high + tolerance


def require_plan(context, model: ir.Model, pass_name: str) -> QuantizationPlan:
    """The run's plan for ``pass_name``; planned again for ``model`` when a graph change since
    ``plan-quantization`` dropped it (LLVM's analysis manager computes an invalidated analysis
    again when a pass asks for it; a plan needs no data, so it can be)."""
    if context.analyses.plan is None and "plan" in context.analyses.dropped_by:
        logger.info("%s: %s changed the graph since plan-quantization: planning again",
                    pass_name, context.analyses.dropped_by["plan"])
        context.analyses.plan = build_plan(model, context.target, context.config)
        del context.analyses.dropped_by["plan"]
    return context.require_analysis("plan", pass_name, "plan-quantization")


@register_pass("plan-quantization",
               config_options={"activation_type": "activation_type", "weight_type": "weight_type"})
class PlanQuantization(ir.passes.InPlacePass):
    """Decide which nodes and tensors to quantize from the target's rules; the graph is unchanged.

    Guarantees: the ``plan`` analysis lists the tensors ``calibrate`` must observe. Quantization
    parameters are fixed later, once ``calibrate`` has produced statistics. ``activation_type`` and
    ``weight_type`` are those config keys, for the whole run (as recipes such as ``llm-fp8`` set
    them): the pipeline resolves them before any pass is built, so the passes before this one
    (upgrade-opset, smooth-quant's scoring) see them too.
    """

    def __init__(self, context, *, activation_type: str | None = None, weight_type: str | None = None):
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = build_plan(model, self.context.target, self.context.config)
        self.context.analyses.plan = plan
        logger.info(
            "Plan: %d nodes to quantize, %d activation tensors, %d weights",
            len(plan.nodes), len(plan.activations), len(plan.weights),
        )
        return ir.passes.PassResult(model, False)
