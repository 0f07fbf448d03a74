"""qcompile: a quantization compiler for ONNX models.

    import qcompile
    result = qcompile.compile("model.onnx", "calib/", target="cpu")
    result.save("model.int8.onnx"); print(result.report)

``compile``, ``CompileResult``, ``CompileConfig`` and ``load_config`` are imported on first use
(PEP 562): importing the package, or a light module of it such as ``qcompile.errors``, does not
load onnx, onnxruntime or onnxscript, so ``qcompile --help`` and ``--version`` answer at once.
"""

from typing import TYPE_CHECKING

from qcompile.errors import (
    AccuracyGateError,
    CalibrationDataError,
    ConfigError,
    ModelError,
    OutputError,
    PipelineError,
    QcompileError,
)

if TYPE_CHECKING:
    from qcompile.api import CompileResult, compile  # noqa: A004
    from qcompile.core.config import CompileConfig, load_config

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

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {"compile": "qcompile.api", "CompileResult": "qcompile.api",
         "CompileConfig": "qcompile.core.config", "load_config": "qcompile.core.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
