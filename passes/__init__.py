"""qcompile's passes. Importing this package registers every pass a pipeline can name."""

from qcompile.passes import calibration, cleanup, preparation, qdq_insertion, quantization_plan, smooth_quant  # noqa: F401
from qcompile.passes.registry import create_pass, register_pass, registered_passes

__all__ = ["create_pass", "register_pass", "registered_passes"]
