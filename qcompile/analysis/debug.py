"""Per-layer error analysis: where a quantized model loses accuracy against its float original.

For every activation the quantized model rounds (a tensor T read by a QuantizeLinear whose output a
DequantizeLinear reads), on the same data:

- **accumulated SQNR**: the quantized model's value of T (the DequantizeLinear output, with every
  quantization upstream of it) against the float model's T. This is ONNX Runtime's
  ``qdq_loss_debug`` "xmodel_err".
- **isolated SQNR**: the float T rounded on the quantized model's grid (numpy QuantizeLinear then
  DequantizeLinear with its scale and zero point) against the float T: the error if only T were
  quantized. ORT's "qdq_err" rounds the quantized model's own T, whose inputs already carry the
  upstream error; rounding the float T instead separates a tensor's own error from what it
  inherits (the per-quantizer view of AIMET's QuantAnalyzer, measured at the tensor).

SQNR is 10 log10(sum x^2 / sum (x - y)^2) with the sums taken over all the data, not averaged
per batch. Weights (DequantizeLinear of a constant) are compared with the float weight they
replaced, per output channel; activations also get range statistics (``TensorError``).

The float value of T is read from the *reference*: the quantized graph with its quantization
undone (activation Q/DQ pairs bypassed, each weight DequantizeLinear replaced by the float weight
it came from, found through the float model's node of the same name). The reference computes
the float model's function in the quantized graph's form, so tensors that the compiler created
or rescaled (SmoothQuant's ``X / s``) have a float value too, and names never have to match. It
is checked against the float model's outputs on the first batch.

Memory stays bounded: the tensors are analysed in groups of ``group_size``; for each group a
session of each model exposes only that group's tensors as extra outputs, the data is run through
both (in chunks of ``chunk`` samples), and every tensor's values are folded into running sums at
once. Peak memory holds ``group_size`` tensors of one chunk, whatever the number of tensors or
batches; the cost is one pass over the data per group.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_GROUP_SIZE", "DEFINITIONS", "DebugReport", "TensorError", "WeightError", "activation_errors", "analyze",
]

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.io.chunked_runs import DEFAULT_CHUNK, ChunkedRunner, split_batch
from qcompile.io.data import input_specs, read_npz, validate_batch
from qcompile.analysis.debug_report import DEFINITIONS, OUTLIER_STDS, DebugReport, TensorError, WeightError, rounded
from qcompile.analysis.qdq_structure import Activation, QuantizedGraph, along, sum_of_squares
from qcompile.errors import CalibrationDataError, ModelError, detail
from qcompile.analysis.evaluate import OutputError, sqnr_db
from qcompile.io.loader import describe_source, load_model
from qcompile.numerics.qparams import dequantize, quantize
from qcompile.io.runtime import make_session
from qcompile.numerics.statistics import HALF_BINS, TensorStatistics

logger = logging.getLogger(__name__)

# Tensors exposed per ONNX Runtime session: peak memory holds this many activations of one chunk.
DEFAULT_GROUP_SIZE = 32
# The reference must compute the float model's function: outputs below this SQNR mean QUANT was
# not compiled from FLOAT.
_REFERENCE_MIN_DB = 10.0
HISTOGRAM_BINS = 64


# ----------------------------------------------------------------------------- data


def _batch_source(data: Any) -> tuple[str, Callable[[], Iterator[tuple[str, Any]]]]:
    """(description, opener): the opener yields (where, batch) each time it is called."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_file() and path.suffix == ".npz":
            return str(path), lambda: iter([(path.name, read_npz(path, label="debug data"))])
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise CalibrationDataError(
                    f"debug data: directory {str(path)!r} has no .npz files. Save each batch with "
                    "numpy.savez(path, **{input_name: array})."
                )
            return f"{len(files)} .npz files in {path}", lambda: ((f.name, read_npz(f, label="debug data")) for f in files)
        raise CalibrationDataError(
            f"debug data: {str(path)!r} is neither a directory of .npz files nor an .npz file."
        )
    if isinstance(data, Mapping):
        return "1 in-memory batch", lambda: iter([("batch 0", data)])
    if isinstance(data, Iterable):
        # Each group of tensors reads the data again: an iterator's batches (model inputs, not
        # activations) are kept.
        items = list(data)
        return f"{len(items)} in-memory batches", lambda: ((f"batch {i}", b) for i, b in enumerate(items))
    raise CalibrationDataError(
        f"debug data must be a directory of .npz files, an .npz file, a dict or an iterable of dicts, "
        f"not {type(data).__name__}."
    )


# ----------------------------------------------------------------------------- streaming statistics


class _Accumulator:
    """Running sums for one activation; ``update`` folds one run's values and keeps nothing of them."""

    def __init__(self, activation: Activation):
        self.activation = activation
        self.statistics = TensorStatistics()
        self.count = self.nonfinite = self.clipped = 0
        self.signal = self.noise = self.isolated_noise = self.total = 0.0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        a = self.activation
        if reference.shape != quantized.shape:
            raise ModelError(
                f"Tensor {a.error.tensor!r} has shape {list(reference.shape)} in the float reference but "
                f"{list(quantized.shape)} in the quantized model: the two models do not match."
            )
        x = np.asarray(reference, dtype=np.float32)
        y = np.asarray(quantized, dtype=np.float32)
        finite = np.isfinite(x) & np.isfinite(y)
        count = x.size
        if not finite.all():
            count = int(np.count_nonzero(finite))
            self.nonfinite += x.size - count
            # Zeros add nothing to any sum below; the shape stays, for per-axis parameters.
            x, y = np.where(finite, x, np.float32(0)), np.where(finite, y, np.float32(0))
        self.statistics.update(x[finite] if count < x.size else x)
        self.count += count
        # Sums of squares in float64 (einsum accumulates in its dtype without a float64 copy).
        self.signal += sum_of_squares(x)
        self.total += float(np.sum(x, dtype=np.float64))
        self.noise += sum_of_squares(x - y)
        if a.qtype is not None:
            axis = a.axis % x.ndim if a.axis is not None else None
            rounded = dequantize(quantize(x, a.q_scale, a.q_zero_point, a.qtype, axis), a.dq_scale, a.dq_zero_point, axis)
            self.isolated_noise += sum_of_squares(x - rounded)
            low, high = along(a.clip_low, x.ndim, axis), along(a.clip_high, x.ndim, axis)
            outside = (x < low) | (x > high)
            self.clipped += int(np.count_nonzero(outside & finite if count < x.size else outside))

    def finish(self) -> TensorError:
        error, stats = self.activation.error, self.statistics
        error.count = self.count
        if not self.count:
            return error
        mean = self.total / self.count
        variance = max(self.signal / self.count - mean * mean, 0.0)
        std, rms = math.sqrt(variance), math.sqrt(self.signal / self.count)
        error.accumulated_sqnr_db = rounded(sqnr_db(self.signal, self.noise))
        if self.activation.qtype is not None:
            error.isolated_sqnr_db = rounded(sqnr_db(self.signal, self.isolated_noise))
            error.clipped_fraction = self.clipped / self.count
        error.min, error.max = float(stats.min), float(stats.max)
        error.mean, error.std = mean, std
        error.dynamic_range = error.max - error.min
        peak = max(abs(error.min), abs(error.max))
        error.peak_to_rms_db = rounded(20 * math.log10(peak / rms)) if rms > 0 and peak > 0 else None
        width = 2.0 ** (stats.width_exponent or 0)
        centers = (np.arange(2 * HALF_BINS) - HALF_BINS + 0.5) * width
        if std > 0:
            error.outlier_fraction = float(stats.counts[np.abs(centers - mean) > OUTLIER_STDS * std].sum()) / stats.count
        else:
            error.outlier_fraction = 0.0
        folded = stats.counts[HALF_BINS:] + stats.counts[:HALF_BINS][::-1]
        cumulative = np.cumsum(folded)
        index = int(np.searchsorted(cumulative, 0.9999 * cumulative[-1], side="left"))
        error.abs_p9999 = min(float((index + 1) * width), peak)
        if error.grid_min is not None and error.scale:
            covered = max(0.0, min(error.max, error.grid_max) - max(error.min, error.grid_min))
            error.grid_steps_used = rounded(covered / float(np.max(self.activation.q_scale)), 1)
        error.histogram = _histogram(stats, centers, error)
        return error


def _histogram(stats: TensorStatistics, centers: np.ndarray, error: TensorError) -> dict[str, Any]:
    """The float values' fine histogram regrouped into HISTOGRAM_BINS bins over the data and the grid."""
    low = min(error.min, error.grid_min if error.grid_min is not None else error.min)
    high = max(error.max, error.grid_max if error.grid_max is not None else error.max)
    if high <= low:
        high = low + 1.0
    occupied = stats.counts > 0
    index = np.clip(((centers[occupied] - low) / (high - low) * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)
    counts = np.bincount(index, weights=stats.counts[occupied], minlength=HISTOGRAM_BINS)
    return {"start": low, "stop": high, "counts": [int(c) for c in counts]}


# ----------------------------------------------------------------------------- running


def _with_outputs(proto: onnx.ModelProto, names: list[str], what: str, threads: int,
                  optimization: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """A session on ``proto`` with ``names`` exposed as graph outputs (``proto`` is left as it was)."""
    existing = {o.name for o in proto.graph.output}
    count = len(proto.graph.output)
    for name in dict.fromkeys(names):
        if name not in existing:
            # No declared type: ORT reports the real one.
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        return make_session(proto, threads=threads, optimization=optimization, what=what, low_memory=True)
    finally:
        del proto.graph.output[count:]


def _paired_runs(reference: ChunkedRunner, quantized: ChunkedRunner, batch, where: str):
    """Both models' outputs on the same chunks of ``batch``: the reference decides how to cut it."""
    reference_runs = reference.runs(batch, where)
    first = next(reference_runs)
    quantized.independent = reference.independent
    quantized_runs = quantized.runs(batch, where)
    yield first, next(quantized_runs)
    yield from zip(reference_runs, quantized_runs)


def _load(model: Any, role: str) -> ir.Model:
    try:
        return load_model(model)
    except ModelError as error:
        raise ModelError(f"{role}: {error}") from None


def analyze(
    float_model: Any,
    quant_model: Any,
    data: Any,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    chunk: int = DEFAULT_CHUNK,
    max_batches: int | None = None,
    threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DebugReport:
    """Per-layer errors of ``quant_model`` (a QDQ model) against ``float_model`` on ``data``.

    Models: .onnx paths, ``onnx.ModelProto`` or ``onnx_ir.Model`` (not modified). ``data``: a
    directory of .npz batches (keys = input names, as for calibration), one .npz file, a dict, or
    an iterable of dicts. ``group_size`` tensors are exposed per ONNX Runtime session (memory
    bound), batches run in chunks of ``chunk`` samples (0: whole). ``progress`` receives a
    one-line status now and then.
    """
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    start = time.perf_counter()
    float_ir = _load(float_model, "float model")
    quant_ir = _load(quant_model, "quantized model")
    _check_interfaces(float_ir, quant_ir)
    specs = input_specs(float_ir)
    description, opener = _batch_source(data)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for index, (where, batch) in enumerate(opener()):
            if max_batches is not None and index >= max_batches:
                return
            yield validate_batch(batch, specs, f"debug data, {where}")

    first = next(batches(), None)
    if first is None:
        raise CalibrationDataError("debug data has no batches.")
    piece = (split_batch(first, chunk) or [first])[0]
    # One model's session at a time: the float model's outputs on the first chunk, for the check below.
    float_outputs = _run_once(ir.serde.serialize_model(float_ir), piece, threads, "float model")
    quant_proto = ir.serde.serialize_model(quant_ir)
    # Q/DQ nodes inside If/Loop/Scan subgraphs, which the analysis does not reach.
    inside = sum(1 for n in ir.traversal.RecursiveGraphIterator(quant_ir.graph)
                 if n.graph is not quant_ir.graph and n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    structure = QuantizedGraph(quant_ir, float_ir)  # quant_ir becomes the reference
    del float_ir, quant_ir
    if not structure.activations and not structure.weights and inside:
        # silero-vad: its whole 16 kHz network is one If branch.
        raise ModelError(
            f"The quantized model's {inside} QuantizeLinear/DequantizeLinear nodes are all inside "
            "If/Loop/Scan subgraphs, which qcompile debug does not analyse yet (ONNX Runtime cannot "
            "return a subgraph's values). Its outputs can still be compared: qcompile compile ... --eval DIR "
            "reports each output's SQNR, and qcompile sensitivity ranks its nodes."
        )
    if inside:
        logger.warning("qcompile debug analyses the main graph only: %d Q/DQ nodes inside If/Loop/Scan "
                       "subgraphs are not analysed", inside)
    if not structure.activations and not structure.weights:
        raise ModelError(
            "The quantized model has no QuantizeLinear -> DequantizeLinear pairs and no DequantizeLinear "
            "of a constant: there is nothing to analyse. Pass a QDQ model (qcompile compile's output, or "
            "ONNX Runtime's quantize_static with QuantFormat.QDQ) as QUANT."
        )
    reference_proto = ir.serde.serialize_model(structure.reference)
    del structure.reference
    reference_values = _run_once(reference_proto, piece, threads, "float reference (QUANT with its quantization undone)")
    check = _check_reference([o.name for o in reference_proto.graph.output], float_outputs, reference_values)
    del first, piece, float_outputs, reference_values

    activations = structure.activations
    groups = [activations[i : i + group_size] for i in range(0, len(activations), group_size)]
    output_names = [o.name for o in quant_proto.graph.output]
    reference_outputs = [o.name for o in reference_proto.graph.output]
    output_errors = {name: OutputError() for name in output_names}
    independent, batch_count, max_exposed = None, 0, 0
    finished: list[TensorError] = []
    for group_index, group in enumerate(groups):
        reference_names = [a.reference_name for a in group]
        quantized_names = [a.error.dequantized for a in group]
        with_outputs = group_index == 0  # the graph outputs ride along with the first group
        if with_outputs:
            reference_names, quantized_names = reference_names + reference_outputs, quantized_names + output_names
        max_exposed = max(max_exposed, len(group))
        basic, plain = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        reference_runner = ChunkedRunner(
            _with_outputs(reference_proto, reference_names, "float reference", threads, basic),
            reference_names, reference_outputs, chunk)
        # No graph optimizations: Q and DQ run as the reference kernels, no fusion hides a tensor.
        quantized_runner = ChunkedRunner(
            _with_outputs(quant_proto, quantized_names, "quantized model", threads, plain),
            quantized_names, output_names, chunk)
        reference_runner.independent = quantized_runner.independent = independent
        accumulators = [_Accumulator(a) for a in group]
        batch_count = 0
        for batch_index, batch in enumerate(batches()):
            for reference_values, quantized_values in _paired_runs(
                reference_runner, quantized_runner, batch, f"debug data batch {batch_index}"
            ):
                for accumulator, x, y in zip(accumulators, reference_values, quantized_values):
                    accumulator.update(x, y)
                if with_outputs:
                    for name, x, y in zip(output_names, reference_values[len(group):], quantized_values[len(group):]):
                        if np.issubdtype(np.asarray(x).dtype, np.floating):
                            output_errors[name].update(np.asarray(x), np.asarray(y))
            batch_count += 1
            if progress is not None:
                progress(f"tensors {group_index * group_size + 1}-{group_index * group_size + len(group)} "
                         f"of {len(activations)}: batch {batch_index + 1}, {time.perf_counter() - start:.1f} s")
        independent = reference_runner.independent
        if batch_count == 0:
            raise CalibrationDataError("debug data has no batches.")
        finished.extend(a.finish() for a in accumulators)
        del reference_runner, quantized_runner, accumulators
    if not groups:  # weights only: the outputs are still worth comparing
        batch_count = _compare_outputs(reference_proto, quant_proto, batches(), output_errors, chunk, threads)

    weights = structure.weights
    unmatched = [w.name for w in weights if w.float_name is None]
    reference = {
        "outputs_vs_float": check,
        "weights": len(weights),
        "weights_rescaled": sum(w.match.startswith("rescaled") for w in weights),
        "weights_without_float_original": unmatched,
        "notes": structure.notes + ([(
            f"{len(unmatched)} quantized constants have no float original in the float model; the reference "
            "keeps their dequantized values, so their rounding is not in the accumulated SQNR."
        )] if unmatched else []),
    }
    run = {
        "seconds": round(time.perf_counter() - start, 2),
        "group_size": group_size,
        "groups": len(groups),
        "max_tensors_per_session": max_exposed,
        "chunk": chunk,
        "simulation": "quantized model run by ONNX Runtime with graph optimizations off (QuantizeLinear/"
        "DequantizeLinear kernels, float compute); fused integer kernels may differ by a rounding step",
    }
    logger.debug("debug: %d activations, %d weights, %d batches, %.1f s", len(finished), len(weights), batch_count, run["seconds"])
    return DebugReport(
        float_model=describe_source(float_model),
        quant_model=describe_source(quant_model),
        data=description if max_batches is None else f"{description} (first {batch_count} batches)",
        batches=batch_count,
        tensors=sorted(finished, key=lambda t: t.index),
        weights=weights,
        outputs={name: e.summary() for name, e in output_errors.items() if e.norm_float or e.noise},
        reference=reference,
        run=run,
    )


def activation_errors(float_model: Any, quant_model: Any, data: Any, **options: Any) -> list[TensorError]:
    """Accumulated and isolated SQNR (and range statistics) of every quantized activation, in graph
    order: ``analyze(...).tensors``, for tools that rank tensors (``options`` as ``analyze``'s)."""
    return analyze(float_model, quant_model, data, **options).tensors


def _check_interfaces(float_ir: ir.Model, quant_ir: ir.Model) -> None:
    float_inputs = {s.name for s in input_specs(float_ir)}
    quant_inputs = {s.name for s in input_specs(quant_ir)}
    if float_inputs != quant_inputs:
        raise ModelError(
            f"The float model's inputs {sorted(float_inputs)} differ from the quantized model's "
            f"{sorted(quant_inputs)}. Pass the float model that QUANT was compiled from."
        )
    float_outputs = [o.name for o in float_ir.graph.outputs]
    quant_outputs = [o.name for o in quant_ir.graph.outputs]
    if float_outputs != quant_outputs:
        raise ModelError(
            f"The float model's outputs {float_outputs} differ from the quantized model's {quant_outputs}. "
            "Pass the float model that QUANT was compiled from."
        )


def _run_once(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, what: str) -> list[np.ndarray]:
    session = make_session(proto, threads=threads, what=what)
    try:
        return session.run(None, feed)
    except Exception as error:  # noqa: BLE001  (ORT raises its own exception types from C++)
        raise CalibrationDataError(f"ONNX Runtime failed on the first debug batch ({what}): {detail(error)}") from None


def _check_reference(names: list[str], float_values: list[np.ndarray], reference_values: list[np.ndarray]) -> dict[str, dict]:
    """The reference against the float model on the first chunk of the first batch: the same
    function, or QUANT was not compiled from FLOAT (and the analysis would mislead)."""
    results = {}
    for name, x, y in zip(names, float_values, reference_values):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ModelError(
                f"Output {name!r} has shape {list(x.shape)} in the float model but {list(y.shape)} in the "
                "quantized one. Pass the float model that QUANT was compiled from."
            )
        if not np.issubdtype(x.dtype, np.floating):
            continue
        error = OutputError()
        error.update(x, y)
        results[name] = error.summary()
        if results[name]["sqnr_db"] < _REFERENCE_MIN_DB:
            raise ModelError(
                f"With its quantization undone, the quantized model's output {name!r} differs from the float "
                f"model's (SQNR {results[name]['sqnr_db']} dB): QUANT does not look like a quantization of "
                "FLOAT. Pass the float model that QUANT was compiled from."
            )
    return results


def _compare_outputs(reference_proto, quant_proto, batches, errors: dict[str, OutputError], chunk, threads) -> int:
    names = list(errors)
    reference = ChunkedRunner(make_session(reference_proto, threads=threads, what="float reference"), names, names, chunk)
    quantized = ChunkedRunner(make_session(quant_proto, threads=threads, what="quantized model"), names, names, chunk)
    count = 0
    for index, batch in enumerate(batches):
        for xs, ys in _paired_runs(reference, quantized, batch, f"debug data batch {index}"):
            for name, x, y in zip(names, xs, ys):
                if np.issubdtype(np.asarray(x).dtype, np.floating):
                    errors[name].update(np.asarray(x), np.asarray(y))
        count += 1
    return count
