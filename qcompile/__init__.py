"""qcompile: a quantization compiler for ONNX models.

    import qcompile
    result = qcompile.compile("model.onnx", "calib/", target="cpu")
    result.save("model.int8.onnx"); print(result.report)
"""

from qcompile.api import CompileResult, compile  # noqa: A004
from qcompile.config import CompileConfig, load_config
from qcompile.errors import (
    AccuracyGateError,
    CalibrationDataError,
    ConfigError,
    ModelError,
    OutputError,
    PipelineError,
    QcompileError,
)

__all__ = [
    "compile",
    "CompileResult",
    "CompileConfig",
    "load_config",
    "QcompileError",
    "ModelError",
    "CalibrationDataError",
    "ConfigError",
    "PipelineError",
    "OutputError",
    "AccuracyGateError",
]
