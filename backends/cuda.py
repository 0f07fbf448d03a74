"""The ``cuda`` target: NVIDIA GPUs through ONNX Runtime's CUDA provider.

The model is the one the ``tensorrt`` target makes (same rules: symmetric INT8 or FP8 E4M3,
per-channel weights, Q/DQ on the inputs of weighted ops), so one file runs on both providers.
What the CUDA provider does with it differs: it has QuantizeLinear/DequantizeLinear kernels but
no QDQ fusion into integer or FP8 GEMMs (ORT's QDQ fusions are CPU-provider transformations), so
each quantized op runs as DequantizeLinear -> float kernel -> QuantizeLinear: the file is 4x
smaller and the outputs are what TensorRT computes to within rounding, but the speed is float's
or lower. For integer or FP8 kernels on an NVIDIA GPU compile for ``tensorrt``.

Measured (issue 14, H200, onnxruntime-gpu 1.31.1): ResNet-18's QDQ INT8 model on the CUDA provider
ran 1.49x slower than fp32 at batch 1 (1.30 vs 0.87 ms) and 1.27x slower at batch 32. Every report
of this target carries that as a warning (``SLOWER_THAN_FP32``).
"""

from __future__ import annotations

__all__ = ["TARGET", "SLOWER_THAN_FP32"]

import dataclasses

from qcompile.backends.tensorrt import TARGET as TENSORRT, check_zero_points
from qcompile.io.providers import verify_if_installed


SLOWER_THAN_FP32 = (
    "QDQ INT8 on CUDAExecutionProvider runs slower than fp32: ResNet-18 took 1.30 ms vs 0.87 ms fp32 "
    "at batch 1 (1.49x slower) and 1.27x slower at batch 32 (H200, onnxruntime-gpu 1.31.1): the CUDA "
    "provider runs each quantized op as DequantizeLinear -> float kernel -> QuantizeLinear. "
    "Use --target tensorrt for INT8/FP8 kernels on an NVIDIA GPU; the cuda target buys a smaller file, not speed."
)


def _verify(compiled_proto, batches, config) -> dict:
    check_zero_points(compiled_proto, TARGET.name)
    return verify_if_installed(compiled_proto, batches, TARGET, allow_fallback=config.allow_fallback)


TARGET = dataclasses.replace(
    TENSORRT,
    name="cuda",
    description="NVIDIA GPU through ONNX Runtime's CUDA provider (the tensorrt target's QDQ model; "
    "Q/DQ run as kernels, compute in float: smaller files, not integer speed)",
    providers=("CUDAExecutionProvider",),
    install_hint="pip install onnxruntime-gpu in a virtual environment of its own; needs an NVIDIA "
    "GPU with CUDA 12 and cuDNN 9",
    provider_options=None,
    verify=_verify,
    warnings=(SLOWER_THAN_FP32,),
)
