"""The ``tensorrt`` target: NVIDIA GPUs through ONNX Runtime's TensorRT provider (explicit quantization).

TensorRT builds an engine from the QDQ model as it is ("explicit quantization": it honours every
Q/DQ pair and adds none; TensorRT docs, "Explicit Quantization",
docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):

* quantization is symmetric: INT8 is signed with zero point 0, for activations and weights
  ("Working with Quantized Types": "TensorRT employs a symmetric quantization scheme");
  FP8 E4M3 is the 8-bit float format (Hopper and newer); no uint8, no 16-bit integers;
* weights per output channel, activations per tensor;
* Q/DQ placement ("Q/DQ Layer-Placement Recommendations" in the same guide): quantize all inputs
  of weighted ops (Conv, ConvTranspose, Gemm, MatMul), but by default not their outputs, which
  stay in higher precision for whatever reads them (a residual Add fuses into the Conv before it);
  let Relu/Clip fuse (they are not separate quantized ops); pooling and data movement commute
  with Q/DQ. So the weighted ops' outputs are OPTIONAL here (quantized only where a quantized op
  reads them), and pointwise ops TensorRT fuses into a kernel's epilogue in float (Mul, Sigmoid,
  LeakyRelu) get no Q/DQ pair. Not yet expressed: the guide also quantizes the *residual* input
  of such an Add (the planner quantizes an Add's inputs all or none);
* biases are float initializers, not int32 DequantizeLinear: TensorRT adds a float bias in the
  kernel's epilogue, and the CUDA provider it hands unsupported nodes to has no int32
  DequantizeLinear (``cuda_kernels.CUDA_KERNELS``; ``Target.int32_bias``);
* the pipeline is the CPU target's without ``dynamic-quantize-lstm``: com.microsoft
  DynamicQuantizeLSTM is a CPU-provider contrib op (no TensorRT layer, no CUDA kernel), so an LSTM
  stays an ONNX LSTM, which TensorRT and the CUDA provider run;
* the engine is cached (``trt_engine_cache_enable``, ``trt_engine_cache_path``): building one
  takes seconds to minutes, loading a cached one milliseconds. ``trt_int8_enable`` lets the
  builder pick INT8 kernels for the Q/DQ-marked layers (no calibration table is read: the scales
  are in the model). ORT's TensorRT provider has no ``trt_fp8_enable`` option (ORT refuses
  unknown options); FP8 comes from the float8 Q/DQ nodes themselves.
"""

from __future__ import annotations

__all__ = ["TARGET", "RULES", "provider_options", "check_zero_points"]

import dataclasses
import logging

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.backends.base import OutputRole, Target
from qcompile.backends.cpu import COMMON_RULES, PROVIDER_NEUTRAL_PIPELINE
from qcompile.backends.cuda_kernels import CUDA_KERNELS
from qcompile.core.cache import cache_directory
from qcompile.errors import ConfigError
from qcompile.io.providers import verify_if_installed

logger = logging.getLogger(__name__)

# Pointwise ops TensorRT runs in float inside another kernel's epilogue: no Q/DQ pair around them.
_FUSED_IN_FLOAT = {"Mul", "Sigmoid", "LeakyRelu"}
# Weighted ops: every input quantized, the output only where a quantized op reads it.
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")

RULES = {
    **{name: rule for name, rule in COMMON_RULES.items() if name not in _FUSED_IN_FLOAT},
    **{name: dataclasses.replace(COMMON_RULES[name], output=OutputRole.OPTIONAL) for name in _WEIGHTED},
}

# Signed INT8 and FP8 E4M3: the 8-bit formats TensorRT's explicit quantization computes in.
ACTIVATION_TYPES = ("int8", "float8e4m3fn")
WEIGHT_TYPES = ("int8", "float8e4m3fn")


def _engine_cache_dir() -> str:
    return str(cache_directory() / "tensorrt-engines")


def provider_options(weight_type: str = "int8") -> dict[str, str]:
    """TensorRT provider options for a model whose weights are ``weight_type``."""
    options = {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": _engine_cache_dir(),
        "trt_timing_cache_enable": "1",
    }
    if weight_type == "int8":
        options["trt_int8_enable"] = "1"
    return options


def check_zero_points(proto: onnx.ModelProto, target_name: str) -> None:
    """Every Q/DQ zero point must be 0: TensorRT's quantization is symmetric and refuses others."""
    constants = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is not None and np.any(numpy_helper.to_array(zero_point).astype(np.int64) != 0):
            raise ConfigError(
                f"{node.op_type} {node.name!r} has a nonzero zero point; target {target_name!r} "
                "computes symmetric INT8 only. Leave activation_symmetric unset (or true) and use "
                "int8 activations."
            )


def _verify(compiled_proto, batches, config) -> dict:
    check_zero_points(compiled_proto, TARGET.name)
    weight_type = TARGET.weight_type_name(config)
    target = dataclasses.replace(TARGET, provider_options=lambda: provider_options(weight_type))
    return verify_if_installed(compiled_proto, batches, target, allow_fallback=config.allow_fallback)


TARGET = Target(
    name="tensorrt",
    description="NVIDIA GPU through ONNX Runtime's TensorRT provider (explicit INT8/FP8 quantization, cached engines)",
    providers=("TensorrtExecutionProvider",),
    activation_types=ACTIVATION_TYPES,
    weight_types=WEIGHT_TYPES,
    default_activation_type="int8",
    default_weight_type="int8",
    activation_symmetric=True,
    weight_per_channel=True,
    rules=RULES,
    default_pipeline=PROVIDER_NEUTRAL_PIPELINE,
    install_hint="pip install onnxruntime-gpu in a virtual environment of its own, plus the TensorRT "
    "libraries its release names (pip install "
    "tensorrt-cu12==<that version>, their folder on LD_LIBRARY_PATH); needs an NVIDIA GPU with CUDA 12 "
    "(FP8: Hopper or newer)",
    provider_options=provider_options,
    evaluation_providers=("CPUExecutionProvider",),
    verify=_verify,
    kernels=CUDA_KERNELS,
)
