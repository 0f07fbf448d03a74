"""The ``cpu`` target: ONNX Runtime's CPU execution provider.

The rules list the QDQ node groups ORT's CPU provider turns into integer kernels (QLinearConv,
QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul, QLinearConcat, QLinear pooling,
QLinearSigmoid/Softmax/LeakyRelu) or runs on integers directly (data movement).
Activations default to UINT8: with signed INT8 activations ORT on x86 leaves a Conv/MatMul whose
input has several consumers unfused (measured: ResNet-18 1.1x fp32 instead of 2.9x).
"""

from __future__ import annotations

__all__ = ["TARGET", "COMMON_RULES", "DATA_MOVEMENT_RULES", "CPU_ONLY_PASSES", "PROVIDER_NEUTRAL_PIPELINE",
           "shared_rule"]

import logging
from collections import Counter

from qcompile.backends.base import InputRole, OpRule, OutputRole, Target
from qcompile.core.graph_edit import proto_nodes

logger = logging.getLogger(__name__)

A, W, B, F = InputRole.ACTIVATION, InputRole.WEIGHT, InputRole.BIAS, InputRole.FLOAT


def _attr(node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _gemm_weight_axis(node) -> int:
    # B is [K, N] (axis 1 holds output channels) unless transB=1 makes it [N, K].
    return 0 if _attr(node, "transB", 0) else 1


def _relu_clamp(node):
    return (0.0, float("inf"))


def _clip_clamp(node):
    bounds = []
    for index, default in ((1, float("-inf")), (2, float("inf"))):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(default)
        elif value.const_value is not None and value.const_value.size == 1:
            bounds.append(float(value.const_value.numpy().reshape(())))
        else:
            return None  # bounds computed at run time: cannot be folded into a QuantizeLinear
    return tuple(bounds)


def shared_rule(op_type: str, inputs=(A,)) -> OpRule:
    """Data movement: integers in, integers out, the output keeps the input's scale."""
    return OpRule(op_type, inputs, OutputRole.SHARED, moves_data=True)


# The data movement every target runs on integers with its input's parameters.
DATA_MOVEMENT_RULES = (
    shared_rule("MaxPool"),
    shared_rule("Reshape", (A, F)),
    shared_rule("Transpose"),
    shared_rule("Flatten"),
    shared_rule("Squeeze", (A, F)),
    shared_rule("Unsqueeze", (A, F)),
    shared_rule("Slice", (A, F, F, F, F)),
)


COMMON_RULES = {
    rule.op_type: rule
    for rule in (
        # Anchors: the compute that integer kernels speed up.
        OpRule("Conv", (A, W, B), OutputRole.QUANTIZE, anchor=True, weight_axis=lambda n: 0),
        OpRule("ConvTranspose", (A, W, B), OutputRole.QUANTIZE, anchor=True, weight_axis=lambda n: 1),
        OpRule("Gemm", (A, W, B), OutputRole.OPTIONAL, anchor=True, weight_axis=_gemm_weight_axis),
        OpRule("MatMul", (A, W), OutputRole.OPTIONAL, anchor=True, weight_axis=lambda n: -1),
        # Followers with integer kernels.
        OpRule("Add", (A, A), OutputRole.QUANTIZE),
        OpRule("Mul", (A, A), OutputRole.QUANTIZE),
        OpRule("Concat", (A,), OutputRole.QUANTIZE, moves_data=True),
        OpRule("AveragePool", (A,), OutputRole.QUANTIZE),
        OpRule("GlobalAveragePool", (A,), OutputRole.QUANTIZE),
        OpRule("Sigmoid", (A,), OutputRole.QUANTIZE),
        OpRule("LeakyRelu", (A,), OutputRole.QUANTIZE),
        # Clamps the QuantizeLinear after them performs (ORT's ReluQuantFusion/ClipQuantFusion).
        OpRule("Relu", (A,), OutputRole.ABSORBED, clamp=_relu_clamp),
        OpRule("Clip", (A, F, F), OutputRole.ABSORBED, clamp=_clip_clamp),
        *DATA_MOVEMENT_RULES,
        OpRule("Gather", (A, F), OutputRole.SHARED, table_axis=lambda n: _attr(n, "axis", 0)),
        shared_rule("Resize", (A, F, F, F)),
    )
}

# ORT's CPU names for the integer kernels its QDQ fusions produce.
_INTEGER_KERNELS = {
    "QLinearConv",
    "QLinearConvTranspose",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "ConvInteger",
    "DynamicQuantizeMatMul",
}
_FLOAT_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
# onnx.TensorProto element types of the FP8 formats (FLOAT8E4M3FN .. FLOAT8E5M2FNUZ).
_FLOAT8_ELEMENT_TYPES = {17, 18, 19, 20}


def cpu_fusion_report(optimized_model, quantized_anchor_names: set[str]) -> dict:
    """What ORT's CPU provider made of the quantized model, read from its optimized graph.

    ``optimized_model`` is the onnx.ModelProto ORT wrote after its optimizations. A quantized
    anchor that still runs as a float Conv/MatMul/Gemm fed by DequantizeLinear was not fused:
    it runs as DQ -> float -> Q, slower than the float model.
    """
    nodes = proto_nodes(optimized_model.graph)  # ORT fuses inside If branches too
    producers = {out: node for node in nodes for out in node.output}
    kernels = Counter(node.op_type for node in nodes if node.op_type in _INTEGER_KERNELS)
    unfused = []
    for node in nodes:
        if node.op_type not in _FLOAT_COMPUTE:
            continue
        fed_by_dq = any(
            producers.get(name) is not None and producers[name].op_type == "DequantizeLinear"
            for name in node.input
        )
        if fed_by_dq or node.name in quantized_anchor_names:
            unfused.append({"node": node.name, "op_type": node.op_type})
    float_compute = sum(1 for node in nodes if node.op_type in _FLOAT_COMPUTE)
    report = {
        "integer_kernels": dict(sorted(kernels.items())),
        "quantized_anchors": len(quantized_anchor_names),
        "unfused_quantized_anchors": unfused,
        "float_compute_nodes": float_compute,
        "dequantize_nodes_left": sum(1 for n in nodes if n.op_type == "DequantizeLinear"),
    }
    # MatMulNBits by weight bits: 8 is what lower-wide-matmuls writes for 16-bit activations (float32
    # compute); the LLM recipes' weight-only MatMuls are 4-bit (and 8-bit heads).
    bits = Counter(next((a.i for a in n.attribute if a.name == "bits"), 4) for n in nodes if n.op_type == "MatMulNBits")
    if bits:
        report["weight_only_matmuls_by_bits"] = {str(b): bits[b] for b in sorted(bits)}
    float8 = {t.name for t in optimized_model.graph.initializer if t.data_type in _FLOAT8_ELEMENT_TYPES}
    float8_qdq = sum(
        1 for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") and (
            any(i in float8 for i in n.input)
            or any(a.name == "output_dtype" and a.i in _FLOAT8_ELEMENT_TYPES for a in n.attribute)
        )
    )
    if float8_qdq:
        report["float8_qdq_nodes"] = float8_qdq
        report["note"] = (
            "FP8 QDQ: ONNX Runtime's CPU provider has no FP8 compute kernels, so every FP8 anchor runs "
            "as DequantizeLinear -> float op (accuracy simulation, not speed); FP8 GEMMs need a GPU "
            "provider (CUDA/TensorRT on Hopper or newer)."
        )
    return report


TARGET = Target(
    name="cpu",
    description="ONNX Runtime CPU execution provider (x86-64 and Arm integer kernels)",
    providers=("CPUExecutionProvider",),
    # FP8 (float8e4m3fn, float8e5m2) runs here as QDQ with float compute: ORT's CPU provider has
    # float8 QuantizeLinear/DequantizeLinear but no FP8 Conv/MatMul kernel, so it simulates the
    # accuracy an FP8 GPU (CUDA/TensorRT on Hopper) gets, at float speed or slower.
    activation_types=("uint8", "int8", "uint16", "int16", "float8e4m3fn", "float8e5m2"),
    # int7 (int8 codes in [-64, 63]) by default: on x86-64 CPUs without VNNI (AVX2 only) ORT's
    # u8s8/s8s8 kernels saturate int16 pair sums with full-range int8 weights, and the model runs
    # less accurately than its QDQ arithmetic says (see qparams). int8 is for CPUs with VNNI
    # (AVX512-VNNI, AVX-VNNI) or Arm, where it buys one more bit of weight precision.
    weight_types=("int7", "int8", "float8e4m3fn", "float8e5m2"),
    default_activation_type="uint8",
    default_weight_type="int7",
    default_weight_type_by_activation={"uint16": "int8", "int16": "int8"},
    float_grid_bias_ops=frozenset({"Conv", "Gemm"}),
    zero_point_free_weight_ops=frozenset({"Conv"}),
    activation_symmetric=False,
    weight_per_channel=True,
    rules=COMMON_RULES,
    default_pipeline=(
        "fix-names",
        "shape-inference",
        "lift-constants",
        "fold-constants",
        "fold-batchnorm",
        "fold-conv-bias",
        "deduplicate-initializers",
        "remove-identity",
        "hoist-loop-invariants",
        "remove-unused",
        "upgrade-opset",
        "topological-sort",
        "smooth-quant",
        "plan-quantization",
        "calibrate",
        "assign-qparams",
        "insert-qdq",
        "dynamic-quantize-lstm",
        "quantize-loop-weights",
        "lower-wide-matmuls",
        "remove-unused",
        "strip-metadata",
        "strip-value-info",
        "check-model",
    ),
    fusion_report=cpu_fusion_report,
)

# Passes of the pipeline above that exist for ORT's CPU provider: com.microsoft DynamicQuantizeLSTM
# has no CUDA kernel, no TensorRT layer and no OpenVINO op, so on those providers the LSTM would
# leave the provider for the CPU; lower-wide-matmuls answers a CPU graph rewrite (its MatMulNBits
# is no TensorRT layer). (quantize-loop-weights writes plain DequantizeLinear, which every
# provider runs.)
CPU_ONLY_PASSES = ("dynamic-quantize-lstm", "lower-wide-matmuls")
# The CPU pipeline without them, for targets on other providers (tensorrt, cuda, openvino).
PROVIDER_NEUTRAL_PIPELINE = tuple(p for p in TARGET.default_pipeline if p not in CPU_ONLY_PASSES)
