"""Running an ONNX Runtime session on batches cut into chunks, so that peak memory holds one chunk's
activations whatever the batch size, and the one loop that observes tensors over the calibration
data with it: calibration, channel scaling, layer statistics and GPTQ's Hessians all run
``observe``; ``qcompile debug`` pairs two ``ChunkedRunner``s."""

from __future__ import annotations

__all__ = ["DEFAULT_CHUNK", "ChunkedRunner", "split_batch", "observe", "observe_calibration"]

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompile.errors import CalibrationDataError, detail
from qcompile.io.runtime import make_session

logger = logging.getLogger(__name__)


# Samples per ONNX Runtime run while calibrating: peak memory holds the activations of one run,
# so a batch of 16 sentences x 128 tokens is run as two runs of 8 (MiniLM: 1.25 GB -> 0.93 GB peak).
DEFAULT_CHUNK = 8


def split_batch(batch: dict[str, np.ndarray], chunk: int) -> list[dict[str, np.ndarray]] | None:
    """``batch`` cut along axis 0 into pieces of at most ``chunk`` samples; None if it cannot be cut
    (chunking off, a scalar input, inputs that disagree on axis 0, or nothing to cut)."""
    sizes = {value.shape[0] if value.ndim else None for value in batch.values()}
    if chunk <= 0 or len(sizes) != 1 or None in sizes:
        return None
    (size,) = sizes
    if size <= chunk:
        return None
    return [{name: value[start : start + chunk] for name, value in batch.items()} for start in range(0, size, chunk)]


class ChunkedRunner:
    """Runs a session on batches cut into chunks of at most ``chunk`` samples, for bounded memory.

    Activation statistics do not depend on how samples are grouped into runs, as long as the model
    computes each sample independently (true of inference graphs, but not checked by ONNX). The
    first batch that is cut is checked: the graph outputs of the whole batch must begin with those
    of its first chunk. If they differ, every batch runs whole from then on, with a warning.
    """

    def __init__(self, session: ort.InferenceSession, names: list[str], graph_outputs: list[str], chunk: int):
        self.session, self.names, self.graph_outputs, self.chunk = session, names, graph_outputs, chunk
        self.independent: bool | None = None if chunk > 0 else False
        # An input with a fixed first dimension takes whole batches only: a chunk would not fit it.
        if any(arg.shape and isinstance(arg.shape[0], int) and arg.shape[0] > 0 for arg in session.get_inputs()):
            self.independent = False

    def runs(self, batch: dict[str, np.ndarray], where: str) -> Iterator[list[np.ndarray]]:
        """Outputs ``names`` of each run in turn: a chunk's arrays are dropped before the next runs."""
        pieces = split_batch(batch, self.chunk) if self.independent is not False else None
        if pieces is not None and self.independent is None:
            self.independent = self._samples_are_independent(batch, pieces[0], where)
            if not self.independent:
                logger.warning("The model's outputs for a whole batch differ from those of its parts: "
                               "calibrating whole batches (more memory).")
                pieces = None
        for piece in pieces or [batch]:
            yield self._run(self.names, piece, where)

    def _run(self, names: list[str], feed: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
        try:
            return self.session.run(names, feed)
        except Exception as error:  # noqa: BLE001  (ORT raises its own exception types from C++)
            raise CalibrationDataError(f"ONNX Runtime failed on {where}: {detail(error)}") from None

    def _samples_are_independent(self, batch, piece, where: str) -> bool:
        whole = self._run(self.graph_outputs, batch, where)
        part = self._run(self.graph_outputs, piece, where)
        size, rows = len(next(iter(batch.values()))), len(next(iter(piece.values())))
        for expected, got in zip(whole, part):
            if expected.ndim == 0 or expected.shape[0] != size:
                continue  # not per sample: nothing to compare
            expected = expected[:rows]
            if np.issubdtype(expected.dtype, np.floating):
                tolerance = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
                if not np.allclose(got, expected, rtol=1e-3, atol=tolerance, equal_nan=True):
                    return False
            elif not np.array_equal(got, expected):
                return False
        return True


def observe(
    session: ort.InferenceSession, names: list[str], graph_outputs: list[str], batches: Iterable[dict[str, np.ndarray]],
    *, chunk: int, what: str | None = None, limit: int | None = None,
) -> Iterator[Iterator[list[np.ndarray]]]:
    """For each batch (the first ``limit``, or all), an iterator over its runs' arrays of ``names``,
    chunk by chunk (``ChunkedRunner``): a chunk's arrays are dropped before the next one runs, so
    the caller folds them into its statistics and memory holds one chunk's activations.
    ``what`` names the job in errors ("calibration batch 3 (GPTQ)")."""
    runner = ChunkedRunner(session, names, graph_outputs, chunk)
    suffix = f" ({what})" if what else ""
    for index, batch in enumerate(batches):
        if limit is not None and index >= limit:
            return
        yield runner.runs(batch, f"calibration batch {index}{suffix}")


def observe_calibration(
    model: ir.Model, names: list[str], context, *, chunk: int, what: str, limit: int | None = None,
) -> Iterator[Iterator[list[np.ndarray]]]:
    """``observe`` on ``model`` with ``names`` exposed as outputs, over the run's calibration data
    (``context.data``), in a low-memory session on the run's workspace and threads."""
    session = make_session(
        model, extra_outputs=names, workspace=context.workspace, threads=context.config.threads,
        what=f"model for {what}", low_memory=True,
    )
    graph_outputs = [o.name for o in model.graph.outputs]
    yield from observe(session, names, graph_outputs, context.data.calibration(), chunk=chunk, what=what, limit=limit)
