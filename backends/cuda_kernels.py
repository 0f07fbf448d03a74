"""Which of the ops qcompile emits ONNX Runtime's CUDA provider has kernels for.

Read by the ``cuda`` and ``tensorrt`` targets (TensorRT's provider hands what TensorRT does not
take to the CUDA provider, and what that has no kernel for to the CPU): the planner stores biases
in a form listed here, and every compile for those targets is checked against it
(``KernelTable.nodes_without_kernel``), so a node that would run on the CPU provider is reported
before anyone deploys the file.

The Q/DQ entries are ORT's registrations in onnxruntime/core/providers/cuda/tensor/quantize_linear.cc
(opsets 10-21; int4/uint4 from opset 21): QuantizeLinear and DequantizeLinear for int8, uint8,
int4, uint4, float8e4m3fn and float8e5m2, with float or float16 scales. No int16/uint16 and no
int32: on an H200 with onnxruntime-gpu 1.31.1 every int32 bias DequantizeLinear of a cuda-target
model ran on the CPU provider (issue 14: 4 nodes of the tiny CNN, 20 of 127 of a ResNet-18-shaped CNN).
"""

from __future__ import annotations

__all__ = ["CUDA_KERNELS"]

from qcompile.backends.base import Kernel, KernelTable

_QDQ_TYPES = frozenset({"int8", "uint8", "int4", "uint4", "float8e4m3fn", "float8e5m2"})

CUDA_KERNELS = KernelTable(
    provider="CUDAExecutionProvider",
    kernels=(
        Kernel("DequantizeLinear", types=_QDQ_TYPES, typed_by="input:0"),
        Kernel("QuantizeLinear", types=_QDQ_TYPES, typed_by="output:0"),
        # Weight-only 4/8-bit MatMul (the llm-int4 recipe): contrib kernel for float and float16
        # activations (onnxruntime/contrib_ops/cuda/quantization/matmul_nbits.cc).
        Kernel("MatMulNBits", "com.microsoft", frozenset({"float", "float16"})),
        # Float contrib ops exporters write that the CUDA provider runs
        # (onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc): com.microsoft Gelu.
        Kernel("Gelu", "com.microsoft", frozenset({"float", "double", "float16"})),
        # Not listed, so reported where emitted: com.microsoft DynamicQuantizeLSTM, MatMulInteger
        # to float and the other integer contrib ops of ORT's CPU QDQ fusions (CPU provider only).
    ),
)
