"""The ``qnn-htp`` target: Qualcomm's Hexagon NPU through ONNX Runtime's QNN plugin provider.

The rules come from running every op and format on the HTP backend that ``onnxruntime-qnn``
ships (an x86-64 simulator of the NPU; QNN SDK 2.51) with CPU fallback disabled:

* the whole graph is quantized: the NPU computes on integers, and a float op between quantized
  ones becomes DQ -> float -> Q inside the QNN graph (the simulator runs it; a device may not);
* per-channel weights must be symmetric int8 with zero point 0 (uint8 or asymmetric int8
  per-channel weights are rejected, error 3110); 16-bit weights are rejected;
* LayerNormalization's scale must be 8-bit with the activations' signedness (uint8 for uint8
  and uint16 activations), per tensor; its bias int32 with scale = input scale x scale's scale;
* Softmax needs a fixed output encoding: int8 with zero point 0 gives silently wrong results;
* MaxPool, Gather, Reshape, Transpose (data movement) need identical input/output parameters;
  a Gather from a constant table stores the table with its output's parameters;
* a Relu/Clip after Conv (Q -> DQ -> Relu -> Q) is fused into the Conv, which requantizes once,
  straight to the clamp's output encoding: the Conv's output gets that encoding too, so the CPU
  reference also rounds once (with two encodings it rounded twice: digits CNN 96.8 % of logits
  within 1 step of HTP instead of 99.96 %);
* Erf is not supported: GELU must be the Gelu op (opset 20), see the ``fuse-gelu`` pass;
* dynamic dimensions make QNN reject the whole graph: ``fix-shapes`` makes them static.

The reference HTP is compared with is the CPU provider running the same QDQ model as written
(``qcompile.io.providers.reference_session``: MatMulNBits' accuracy level 0). What HTP itself
computes differently (measured op by op on MiniLM, uint16): a MatMul requantizes with a multiplier (input scale x weight scale / output scale) rounded to fp16 -- 10-20 % of
outputs within 1 step, up to ~25 steps, exact when the multiplier is fp16-exact --, activation x
activation MatMuls are further off (up to ~270 steps), Gelu (up to ~20 steps) and Softmax (up to
~40 steps) are approximations; LayerNormalization, Add, Mul, Where and Gather agree within 1 step.
"""

from __future__ import annotations

__all__ = ["TARGET"]

import dataclasses

from qcompile.backends.base import ConstantFormat, InputRole, OpRule, OutputRole, Target, TypeSource
from qcompile.backends.cpu import COMMON_RULES, DATA_MOVEMENT_RULES, shared_rule
from qcompile.io.providers import verify_on_target

A, W, B, F = InputRole.ACTIVATION, InputRole.WEIGHT, InputRole.BIAS, InputRole.FLOAT

# Softmax's output is a probability in [0, 1]: the fixed grid puts 0 at the lowest code
# (any zero point = qmin encoding is exact on HTP; int8 with zero point 0 is not).
_PROBABILITY = {"uint8": (1 / 256, 0), "int8": (1 / 256, -128), "uint16": (1 / 65536, 0), "int16": (1 / 32768, 0)}
# ORT's QNN configuration fixes 16-bit Sigmoid/Tanh outputs (their HTP kernels assume them);
# 8-bit ones run calibrated.
_SIGMOID = {"uint16": (1 / 65536, 0), "int16": (1 / 32768, 0)}
_TANH = {"uint16": (1 / 32768, 32768), "int16": (1 / 32768, 0)}

# LayerNormalization's scale: 8 bits with the activations' signedness, one scale.
_LAYERNORM_SCALE = ConstantFormat(TypeSource.ACTIVATION_8BIT, symmetric=False, per_channel=False)


def _op(op_type: str, inputs=(A,), **fields) -> OpRule:
    return OpRule(op_type, inputs, OutputRole.QUANTIZE, **fields)


_RULES = {
    # Compute with weights: the CPU rules (per-channel symmetric int8), but the output is always
    # requantized: HTP has no integer-in, float-out kernel (a float Gemm output is rejected).
    **{
        name: dataclasses.replace(COMMON_RULES[name], output=OutputRole.QUANTIZE)
        for name in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    },
    **{
        rule.op_type: rule
        for rule in (
            _op("LayerNormalization", (A, W, B), constant_formats={1: _LAYERNORM_SCALE}),
            _op("Softmax", fixed_output=_PROBABILITY),
            _op("Sigmoid", fixed_output=_SIGMOID),
            _op("Tanh", fixed_output=_TANH),
            _op("Gelu"),
            # Clamps: the planner gives their input their output's parameters (saturating at the
            # clamp), which is what QNN computes when it fuses Conv + Relu into one requantization.
            COMMON_RULES["Relu"],
            COMMON_RULES["Clip"],
            _op("LeakyRelu"),
            _op("HardSigmoid"),
            _op("Add", (A, A)),
            _op("Sub", (A, A)),
            _op("Mul", (A, A)),
            _op("Div", (A, A)),
            _op("Concat"),
            # A mask select: Where(condition, 0, fill) once clamp-mask-fill made the fill finite.
            _op("Where", (F, A, A)),
            _op("AveragePool"),
            _op("GlobalAveragePool"),
            _op("ReduceMean", (A, F)),
            _op("Resize", (A, F, F, F)),
            *DATA_MOVEMENT_RULES,
            shared_rule("Split", (A, F)),
            shared_rule("Gather", (A, F)),
            shared_rule("Expand", (A, F)),
        )
    },
}


def _htp_provider_options() -> dict[str, str]:
    import onnxruntime_qnn  # only called once the provider was found installed

    # offload_graph_io_quantization=0: the graph input's Quantize and output's Dequantize run on
    # HTP too, instead of on the CPU provider (the default), so the whole model is on the NPU.
    return {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "offload_graph_io_quantization": "0"}


def _verify(compiled_proto, batches, config) -> dict:
    return verify_on_target(compiled_proto, batches, TARGET, allow_fallback=config.allow_fallback,
                            ep_context_path=config.ep_context_path)


TARGET = Target(
    name="qnn-htp",
    description="Qualcomm Hexagon NPU (HTP) through ONNX Runtime's QNN provider; the whole graph in integers",
    providers=("QNNExecutionProvider",),
    activation_types=("uint8", "uint16", "int8"),
    weight_types=("int8",),
    default_activation_type="uint8",
    default_weight_type="int8",
    activation_symmetric=False,
    weight_per_channel=True,
    rules=_RULES,
    default_pipeline=(
        "fix-names",
        "fix-shapes",
        "shape-inference",
        "lift-constants",
        "fold-constants",
        "fold-batchnorm",
        "fold-conv-bias",
        "deduplicate-initializers",
        "remove-identity",
        "lower-gathernd",
        "clamp-mask-fill",
        "remove-unused",
        "upgrade-opset(min_opset=21)",
        "fuse-gelu",
        "shape-inference",
        "topological-sort",
        "plan-quantization",
        # Whole batches: the model's batch axis is now fixed to the calibration batch's size.
        "calibrate(chunk=0)",
        "assign-qparams",
        "insert-qdq",
        "remove-unused",
        "strip-metadata",
        "strip-value-info",
        "check-model",
    ),
    install_hint="pip install onnxruntime-qnn (x86-64 Linux and Windows on Arm/x64 wheels; "
    "it installs beside onnxruntime and ships the HTP simulator)",
    quantize_all=True,
    constant_input_format=ConstantFormat(TypeSource.ACTIVATION, symmetric=False, per_channel=False),
    # Measured on the tiny transformer block: the mask Add and Softmax input at uint16 bring the
    # uint8 model back from 7 dB to 29 dB SQNR against float, all on HTP.
    mask_activation_type="uint16",
    provider_options=_htp_provider_options,
    evaluation_providers=("CPUExecutionProvider",),
    verify=_verify,
    # HTP requantizes a Conv/Gemm/MatMul with its multiplier rounded to fp16: at uint16, 10-20 % of
    # a MatMul's outputs were within 1 step of the CPU reference (up to ~25 steps off), 100 % once
    # the multiplier is fp16-exact. 8-bit outputs move by at most 255 x 2^-12 of a step: unchanged.
    requantization_significand_bits=11,
)
