"""The ``openvino`` target: Intel CPUs (and GPUs, NPUs) through ONNX Runtime's OpenVINO provider.

OpenVINO reads each QuantizeLinear/DequantizeLinear pair as a FakeQuantize and its low-precision
transformations (LPT) move the dequantization (Convert, optional Subtract of the zero point,
Multiply) through the graph until it meets an op that has an INT8 kernel; the plugin then fuses
the Quantize after a low-precision op into it ("Quantization Scheme", OpenVINO docs:
docs.openvino.ai/.../low-precision-transformations/quantization-scheme.html). So:

* activations are 8-bit, signed or unsigned, per tensor (ConvolutionTransformation: "dequantization
  on activations must be per-tensor"), with or without a zero point (the Subtract is optional);
  16-bit activations have no low-precision kernel (the NPU path strips int16 QDQ, ORT PR #20622);
* weights are int8, symmetric, per output channel (the dequantization Multiply on weights is a
  per-channel constant);
* the ops with low-precision transformations are the compute with weights (Convolution,
  GroupConvolution, ConvolutionBackpropData, MatMul), Add, Multiply, Concat, the poolings,
  Interpolate, the reductions, PRelu/Relu/Clamp and data movement. Sigmoid, LeakyRelu and Softmax
  have none: they are left in float, not wrapped in a Q/DQ pair that OpenVINO would only undo;
* ``device_type`` CPU pins the provider to the CPU plugin, and ``precision`` FP32 (the provider's
  default for CPU, stated so that a changed default cannot move the float ops to bf16) keeps the
  ops left in float in float32, as the CPU reference computes them.

``onnxruntime-openvino`` *replaces* the ``onnxruntime`` package (it installs the same module, with
the OpenVINO libraries inside it and the CPU provider beside OpenVINO's), so it lives in its own
virtual environment; compiling works anywhere, and running on the provider happens there.
"""

from __future__ import annotations

__all__ = ["TARGET", "RULES"]

from qcompile.backends.base import InputRole, OpRule, OutputRole, Target
from qcompile.backends.cpu import COMMON_RULES, PROVIDER_NEUTRAL_PIPELINE, shared_rule
from qcompile.io.providers import verify_if_installed

A, F = InputRole.ACTIVATION, InputRole.FLOAT

# No low-precision transformation in OpenVINO: quantizing around them buys no integer kernel.
_FLOAT_IN_OPENVINO = {"Sigmoid", "LeakyRelu"}

RULES = {
    **{name: rule for name, rule in COMMON_RULES.items() if name not in _FLOAT_IN_OPENVINO},
    **{
        rule.op_type: rule
        for rule in (
            OpRule("PRelu", (A, F), OutputRole.QUANTIZE),
            OpRule("ReduceMean", (A, F), OutputRole.QUANTIZE),
            # Max and min of integers on one grid are integers on that grid.
            shared_rule("ReduceMax", (A, F)),
            shared_rule("ReduceMin", (A, F)),
            shared_rule("Split", (A, F)),
            shared_rule("DepthToSpace"),
            shared_rule("SpaceToDepth"),
        )
    },
}


def _provider_options() -> dict[str, str]:
    return {"device_type": "CPU", "precision": "FP32"}


def _verify(compiled_proto, batches, config) -> dict:
    return verify_if_installed(compiled_proto, batches, TARGET, allow_fallback=config.allow_fallback)


TARGET = Target(
    name="openvino",
    description="Intel CPU through ONNX Runtime's OpenVINO provider (INT8 via OpenVINO's low-precision transformations)",
    providers=("OpenVINOExecutionProvider",),
    activation_types=("uint8", "int8"),
    # int7 by default, as NNCF's overflow_fix does: on a CPU without VNNI the plugin's u8s8 kernels
    # add product pairs in int16 and saturate with full-range int8 weights (on the AVX2-only CI
    # machine the tiny CNN's logits fell to 31.8 dB against the QDQ arithmetic, a Conv block's
    # output to 80 % within one step). int8 for CPUs with VNNI or AMX.
    weight_types=("int7", "int8"),
    # u8 activations x s8 weights is the CPU plugin's VNNI/AMX format; a zero point costs a
    # Subtract that LPT folds into the kernel's compensation (NNCF's "mixed" preset).
    default_activation_type="uint8",
    default_weight_type="int7",
    activation_symmetric=False,
    weight_per_channel=True,
    rules=RULES,
    # Without dynamic-quantize-lstm: OpenVINO has no com.microsoft DynamicQuantizeLSTM, so an LSTM
    # would run on the CPU provider beside it; as an ONNX LSTM OpenVINO runs it.
    default_pipeline=PROVIDER_NEUTRAL_PIPELINE,
    install_hint="pip install onnxruntime-openvino in a virtual environment of its own (the OpenVINO "
    "libraries ship inside it), then pip install --no-deps -e <qcompile checkout> there",
    provider_options=_provider_options,
    # The float-vs-quantized evaluation runs the QDQ model on the CPU provider, which every
    # onnxruntime build has; ``verify`` checks OpenVINO against that reference.
    evaluation_providers=("CPUExecutionProvider",),
    verify=_verify,
)
