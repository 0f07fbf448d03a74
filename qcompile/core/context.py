"""The CompileContext: what every pass of one run shares (config, target, data, analyses)."""

from __future__ import annotations

__all__ = ["Analyses", "CompileContext"]

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from qcompile.errors import CalibrationDataError, PipelineError

if TYPE_CHECKING:
    import numpy as np

    from qcompile.backends.base import Target
    from qcompile.core.config import CompileConfig
    from qcompile.io.data import BatchSource
    from qcompile.scaleout.executors import Executor
    from qcompile.log import Progress
    from qcompile.passes.quantization_plan import QuantizationPlan
    from qcompile.numerics.statistics import CalibrationTable
    from qcompile.io.workspace import Workspace


@dataclasses.dataclass
class Analyses:
    """What passes compute about the graph for later passes, one typed field each (LLVM's
    analysis manager). A pass that changes the graph drops every analysis it does not list in its
    ``preserves`` (``run_pipeline`` does it); a pass that needs one says so in ``requires()``
    through ``CompileContext.require_analysis``."""

    # plan-quantization: what is quantized, with which types and shared encodings; assign-qparams
    # adds the scales. Once insert-qdq has written it into the graph it is the record of what was
    # applied (``plan.applied``): the report reads it, no graph change drops it.
    plan: QuantizationPlan | None = None
    # calibrate: the statistics of every tensor the plan observes, on the graph before insert-qdq.
    calibration: CalibrationTable | None = None
    # adaround: (node, input index) -> the float weight before its rounding, for bias-correction.
    unrounded_weights: dict[tuple[str, int], np.ndarray] | None = None
    # analysis -> the pass whose graph change dropped it (for the error a later pass raises).
    dropped_by: dict[str, str] = dataclasses.field(default_factory=dict)

    NAMES = ("plan", "calibration", "unrounded_weights")

    def invalidate(self, pass_name: str, preserves: tuple[str, ...] | frozenset[str]) -> list[str]:
        """Drop the analyses ``preserves`` does not name after ``pass_name`` changed the graph (an
        applied plan stays: it describes what was done, not the graph); the names dropped."""
        dropped = []
        for name in self.NAMES:
            value = getattr(self, name)
            if value is None or name in preserves or (name == "plan" and value.applied):
                continue
            setattr(self, name, None)
            self.dropped_by[name] = pass_name
            dropped.append(name)
        return dropped


@dataclasses.dataclass
class CompileContext:
    """Options and shared results for all passes of a run, instead of flags in every signature.

    ``analyses`` holds results that passes compute and later passes consume (``Analyses``: the
    quantization plan, the calibration table), like LLVM's analysis manager.
    """

    config: CompileConfig
    target: Target
    data: BatchSource | None = None
    analyses: Analyses = dataclasses.field(default_factory=Analyses)
    # What passes did that the report shows as is (pass name -> plain data), e.g. what smooth-quant changed.
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("qcompile"))
    # Told how far long steps (calibration) got; the command line renders it (qcompile.log).
    progress: Progress | None = None
    # Large models only: where their weights live on disk during the compile (qcompile.io.workspace).
    workspace: Workspace | None = None
    # Where repeated work runs (qcompile.scaleout.executors): given by the caller, or made from the config on
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
            from qcompile.scaleout.executors import make_executor

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
        """The ``name`` analysis (a field of ``Analyses``), or a PipelineError that says which pass
        produces it, or which pass's graph change dropped it."""
        value = getattr(self.analyses, name)
        if value is None:
            dropped = self.analyses.dropped_by.get(name)
            if dropped is not None:
                raise PipelineError(
                    f"Pass {pass_name!r} needs the {name!r} analysis, which {dropped!r} dropped: it changes the graph "
                    f"and does not preserve it. Move {dropped!r} before {produced_by!r}, or {pass_name!r} before {dropped!r}."
                )
            raise PipelineError(
                f"Pass {pass_name!r} needs the {name!r} analysis, which no earlier pass produced. "
                f"Put {produced_by!r} before {pass_name!r} in the pipeline."
            )
        return value
