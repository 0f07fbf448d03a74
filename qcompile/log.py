"""Where log records and progress go: human text or one JSON object per line, set up once by the CLI.

Library modules log through ``logging.getLogger(__name__)`` and never print. Long steps report
progress through the ``progress`` callback of the ``CompileContext`` (``Progress`` below); the
command line chooses how both are shown: ``setup_logging`` for records, ``TerminalProgress`` or
``LogProgress`` for progress.
"""

from __future__ import annotations

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogProgress", "Progress", "TerminalProgress", "setup_logging"]

import datetime
import json
import logging
import sys
import time
from typing import Protocol, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; any other attribute came from ``extra=`` and is a field of its own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_HANDLER_NAME = "qcompile"

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's
    extra fields (a pass's ``pass`` and ``seconds``, a progress event's ``batches``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test runners swap it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; stderr is read at emit time
        pass


def setup_logging(verbosity: int = 0, log_format: str = "text") -> logging.Handler:
    """Send log records to stderr, in ``log_format`` ("text" or "json").

    ``verbosity`` -1 (``-q``): warnings and errors only. 0: qcompile's info too (what each pass
    did). 1 (``-v``): qcompile's debug records (every pass with its time) and other libraries'
    info. Calling it again replaces the handler it installed, so it can run once per ``main()``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)  # other libraries (onnxscript, onnx-ir)
    own = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    logging.getLogger("qcompile").setLevel(own)
    return handler


class Progress(Protocol):
    """How a long step reports how far it got: ``progress("calibrating", 12, 3.1, False)``; the
    last call of a step has ``finished=True``."""

    def __call__(self, step: str, batches: int, seconds: float, finished: bool) -> None: ...


def _unit(step: str) -> str:
    # Latency steps count runs of one batch; the others count batches.
    return "runs" if step.startswith("latency") else "batches"


class TerminalProgress:
    """Progress on one line of a terminal, rewritten in place: ``calibrating: 12 batches, 3.1s``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def __call__(self, step: str, batches: int, seconds: float, finished: bool) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"\r{step}: {batches} {_unit(step)}, {seconds:.1f}s" + ("\n" if finished else ""))
        stream.flush()


class LogProgress:
    """Progress as log records (for ``--log-format json``): at most one per ``interval`` seconds,
    and the last one of each step, with ``step``, ``batches`` and ``seconds`` as fields."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._last = float("-inf")

    def __call__(self, step: str, batches: int, seconds: float, finished: bool) -> None:
        now = time.monotonic()
        if not finished and now - self._last < self.interval:
            return
        self._last = now
        logger.info(
            "%s: %d %s, %.1fs", step, batches, _unit(step), seconds,
            extra={"step": step, "batches": batches, "seconds": round(seconds, 3), "finished": finished},
        )
