"""The CompileContext: what every pass of one run shares (config, target, data, analyses)."""

from __future__ import annotations

__all__ = ["CompileContext"]

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from qcompile.errors import CalibrationDataError, PipelineError

if TYPE_CHECKING:
    from qcompile.backends.base import Target
    from qcompile.config import CompileConfig
    from qcompile.data import BatchSource
    from qcompile.executors import Executor
    from qcompile.log import Progress
    from qcompile.workspace import Workspace


@dataclasses.dataclass
class CompileContext:
    """Options and shared results for all passes of a run, instead of flags in every signature.

    ``analyses`` holds results that passes compute and later passes consume (the calibration
    table, the quantization plan), like LLVM's analysis manager: a pass that needs one says so in
    ``requires()`` through ``require_analysis``; a pass that changes what one describes drops it.
    """

    config: CompileConfig
    target: Target
    data: BatchSource | None = None
    analyses: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What passes did that the report shows as is (pass name -> plain data), e.g. what smooth-quant changed.
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("qcompile"))
    # Told how far long steps (calibration) got; the command line renders it (qcompile.log).
    progress: Progress | None = None
    # Large models only: where their weights live on disk during the compile (qcompile.workspace).
    workspace: Workspace | None = None
    # Where repeated work runs (qcompile.executors): given by the caller, or made from the config on
    # first use by ``executor()`` and closed by ``close()``.
    given_executor: Executor | None = None
    _own_executor: Executor | None = dataclasses.field(default=None, repr=False)
    _config_frozen: bool = dataclasses.field(default=False, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "config" and getattr(self, "_config_frozen", False):
            raise PipelineError(
                "A pass tried to change the run's config. The config is resolved once, before the "
                "first pass (pass options that are run-wide settings included), and no pass writes it: "
                "declare the option in register_pass(config_options=...) instead."
            )
        super().__setattr__(name, value)

    def freeze_config(self, config: CompileConfig) -> None:
        """Set the run's resolved config; from now on it cannot be replaced."""
        if self._config_frozen and config != self.config:  # the same config again is fine
            raise PipelineError("The run's config is already resolved and frozen; a second pipeline cannot change it.")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_config_frozen", True)

    def executor(self) -> Executor:
        """The run's executor; the config's (``executor``, ``workers``, ``ray_address``) unless one was given."""
        if self.given_executor is not None:
            return self.given_executor
        if self._own_executor is None:
            from qcompile.executors import make_executor

            self._own_executor = make_executor(self.config.executor, workers=self.config.workers, threads=self.config.threads,
                                               address=self.config.ray_address)
        return self._own_executor

    def require_rereadable_data(self, pass_name: str, reads: str, fix: str) -> None:
        """For passes that run the model on the calibration data besides ``calibrate``: a
        CalibrationDataError unless that data can be read again (a directory or a list, not a
        one-shot iterator). ``reads`` says what the pass measures, ``fix`` the alternative."""
        if self.data is None or not self.data.rereadable:
            raise CalibrationDataError(
                f"{pass_name} {reads} on the calibration data, so the data must be readable again: "
                f"pass a directory of .npz batches (--calib DIR) or a list, or {fix}."
            )

    def close(self) -> None:
        """Release what the context started (an executor it made)."""
        if self._own_executor is not None:
            self._own_executor.close()
            self._own_executor = None

    def require_analysis(self, name: str, pass_name: str, produced_by: str) -> Any:
        if name not in self.analyses:
            raise PipelineError(
                f"Pass {pass_name!r} needs the {name!r} analysis, which no earlier pass produced. "
                f"Put {produced_by!r} before {pass_name!r} in the pipeline."
            )
        return self.analyses[name]
