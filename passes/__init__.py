"""qcompile's passes. Importing this package registers every pass a pipeline can name."""

from qcompile.passes import (  # noqa: F401
    adaround, awq, bias_correction, calibration, cleanup, cross_layer_equalization, fix_shapes, fuse_gelu, gguf_weights,
    gptq_rounding,
    loops,
    lower_gathernd, mask_fill, outliers, preparation, qdq_insertion, qparams_assignment, quantization_plan, recurrent,
    smooth_quant,
    weight_only, wide_matmuls,
)
from qcompile.passes.registry import create_pass, register_pass, registered_passes

__all__ = ["create_pass", "register_pass", "registered_passes"]
