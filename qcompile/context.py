"""The CompileContext: what every pass of one run shares (config, target, data, analyses)."""

from __future__ import annotations

__all__ = ["CompileContext"]

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from qcompile.errors import PipelineError

if TYPE_CHECKING:
    from qcompile.backends.base import Target
    from qcompile.config import CompileConfig
    from qcompile.data import BatchSource
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

    def require_analysis(self, name: str, pass_name: str, produced_by: str) -> Any:
        if name not in self.analyses:
            raise PipelineError(
                f"Pass {pass_name!r} needs the {name!r} analysis, which no earlier pass produced. "
                f"Put {produced_by!r} before {pass_name!r} in the pipeline."
            )
        return self.analyses[name]
