"""The one exception family qcompile raises for anything a user can fix."""

from __future__ import annotations

__all__ = [
    "QcompileError",
    "ModelError",
    "CalibrationDataError",
    "ConfigError",
    "PipelineError",
    "OutputError",
    "AccuracyGateError",
    "ProviderError",
    "PlacementError",
    "ExecutorError",
    "detail",
]


class QcompileError(Exception):
    """Base of every error qcompile raises on bad input; the CLI maps it to exit code 2.

    Messages name the problem and the fix in one paragraph.
    """

    exit_code = 2


class ModelError(QcompileError):
    """The model cannot be read, or uses something the compiler cannot handle."""


class CalibrationDataError(QcompileError):
    """Calibration or evaluation data is missing or does not match the model's inputs."""


class ConfigError(QcompileError):
    """The configuration (file, flags or API arguments) is invalid."""


class PipelineError(QcompileError):
    """The pass pipeline is invalid: an unknown pass, bad options, or a broken precondition."""


class OutputError(QcompileError):
    """The output cannot be written."""


class ProviderError(QcompileError):
    """The execution provider a target needs is not installed (or cannot be loaded) here."""


class PlacementError(QcompileError):
    """Nodes of the model would not run on the target's provider."""


class ExecutorError(QcompileError):
    """A worker process or Ray task died, and kept dying when retried."""


class AccuracyGateError(QcompileError):
    """The compiled model is below the accuracy the user required; the CLI exits with 3."""

    exit_code = 3


def detail(error: BaseException, limit: int = 600) -> str:
    """An exception's whole message on one line (onnx spreads the node name over several lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
