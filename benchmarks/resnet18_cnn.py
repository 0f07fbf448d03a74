"""resnet18_cnn: a ResNet-18-shaped CNN quantized by qcompile and by onnxruntime, side by side.

All quantizers calibrate on the same 32 seeded random-normal images (batch 1 each) and are
evaluated on 8 other images: output SQNR against the fp32 model, 10 log10(sum x^2 / sum (x - x_q)^2).

- qcompile: ``qcompile.compile`` with its defaults (UINT8 activations, per-channel INT8 weights,
  minmax); only ``measure_latency`` is off, since latency is measured here for every model alike.
  The 8 evaluation images are passed as ``eval_data`` so that all 32 images calibrate.
- ORT u8: the recommended flow, ``quant_pre_process`` then ``quantize_static`` (QDQ,
  per_channel=True, QUInt8 activations, QInt8 weights, MinMax).
- ORT s8: the same with ``activation_type=QInt8``, the symmetric default many users pick.

Latency: ORT CPU sessions with intra_op_num_threads=2, at batch 1 and batch 8. After warm-up, the
models run in turns (round-robin, starting model rotated each round), so that machine noise hits
all of them alike (thread spinning is off, or idle sessions would steal the cores of the one being
timed; the turns also make each run start with colder caches than back-to-back runs would, which
inflates small-input latencies most); the table shows medians, speedups vs fp32 and qcompile/ORT ratios. Also: compile
wall time (ORT's includes quant_pre_process; qcompile's includes its own evaluation on 8 images),
file sizes, and the integer kernels ORT's CPU provider made of each model (from its optimized graph).
"""

from __future__ import annotations

__all__ = ["run"]

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.models import INPUT_NAME, export_resnet18, random_images
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

CALIB_SEED, EVAL_SEED = 1, 2
CALIB_IMAGES, EVAL_IMAGES = 32, 8
THREADS = 2


def _quantize_qcompile(fp32: Path, out: Path, calib: list[dict], eval_batches: list[dict]) -> dict:
    import qcompile

    result = qcompile.compile(str(fp32), calib, target="cpu", config={"measure_latency": False}, eval_data=eval_batches)
    result.save(out)
    return result.report.to_dict()


def _quantize_ort(fp32: Path, out: Path, calib: list[dict], activation_type) -> None:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib)

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    q.quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    q.quantize_static(str(pre), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=activation_type, weight_type=q.QuantType.QInt8)


def _session(path: Path) -> tuple[ort.InferenceSession, dict]:
    """A 2-thread CPU session, and what ORT made of the model: integer kernels, float compute left."""
    from qcompile.backends.cpu import cpu_fusion_report

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    # Idle sessions must not spin: their threads would steal the 2 cores from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fusion = cpu_fusion_report(onnx.load_model(options.optimized_model_filepath), set())
    return session, fusion


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    x, y = reference.astype(np.float64), candidate.astype(np.float64)
    return float(10.0 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2)))


def _latencies(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per model; the models take turns so that noise is shared."""
    names = list(sessions)
    feed = {INPUT_NAME: x}
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool, workdir: Path) -> CaseResult:
    from onnxruntime.quantization import QuantType

    size, runs, warmup = (64, 10, 3) if quick else (224, 20, 5)
    fp32 = export_resnet18(workdir / f"resnet18_{size}.onnx", size=size)
    calib = [{INPUT_NAME: x} for x in random_images(CALIB_SEED, CALIB_IMAGES, size)]
    eval_x = np.concatenate(list(random_images(EVAL_SEED, EVAL_IMAGES, size)))

    paths = {"fp32": fp32}
    compile_s, report = {"fp32": None}, None
    for name in ("qcompile", "ORT u8", "ORT s8"):
        paths[name] = workdir / f"resnet18_{size}_{name.replace(' ', '_')}.onnx"
        logger.info("resnet18_cnn: quantizing with %s", name)
        start = time.perf_counter()
        if name == "qcompile":
            report = _quantize_qcompile(fp32, paths[name], calib, [{INPUT_NAME: x[None]} for x in eval_x])
        else:
            _quantize_ort(fp32, paths[name], calib, QuantType.QUInt8 if name == "ORT u8" else QuantType.QInt8)
        compile_s[name] = time.perf_counter() - start

    sessions, fusion = {}, {}
    for name, path in paths.items():
        sessions[name], fusion[name] = _session(path)
    reference = sessions["fp32"].run(None, {INPUT_NAME: eval_x})[0]
    sqnr = {name: _sqnr_db(reference, s.run(None, {INPUT_NAME: eval_x})[0]) for name, s in sessions.items() if name != "fp32"}
    logger.info("resnet18_cnn: timing %d runs after %d warm-up, batch 1 and %d", runs, warmup, EVAL_IMAGES)
    latency = {batch: _latencies(sessions, eval_x[:batch], runs, warmup) for batch in (1, EVAL_IMAGES)}

    rows = []
    for name, path in paths.items():
        rows.append({
            "model": name,
            "SQNR dB": round(sqnr[name], 2) if name in sqnr else None,
            "b1 ms": round(latency[1][name], 2),
            "b1 speedup": round(latency[1]["fp32"] / latency[1][name], 2),
            f"b{EVAL_IMAGES} ms": round(latency[EVAL_IMAGES][name], 2),
            f"b{EVAL_IMAGES} speedup": round(latency[EVAL_IMAGES]["fp32"] / latency[EVAL_IMAGES][name], 2),
            "compile s": round(compile_s[name], 2) if compile_s[name] is not None else None,
            "size MB": round(path.stat().st_size / 1e6, 2),
            "int kernels": sum(fusion[name]["integer_kernels"].values()),
            "float conv/gemm": fusion[name]["float_compute_nodes"],
        })
    notes = [(f"input {EVAL_IMAGES}x3x{size}x{size} (batch 1: first image); {THREADS} threads; "
              f"median of {runs} runs after {warmup} warm-up, models alternating")]
    for other in ("ORT u8", "ORT s8"):
        notes.append(
            f"qcompile / {other}: latency b1 {latency[1]['qcompile'] / latency[1][other]:.2f}x, "
            f"b{EVAL_IMAGES} {latency[EVAL_IMAGES]['qcompile'] / latency[EVAL_IMAGES][other]:.2f}x (<1: qcompile faster); "
            f"SQNR {sqnr['qcompile'] - sqnr[other]:+.2f} dB; compile time {compile_s['qcompile'] / compile_s[other]:.2f}x; "
            f"size {paths['qcompile'].stat().st_size / paths[other].stat().st_size:.2f}x"
        )
    reported = report["evaluation"]["outputs"]
    sqnr_reported = ", ".join(f"{k} {v['sqnr_db']} dB" for k, v in reported.items())
    notes.append(f"qcompile's own report: SQNR {sqnr_reported}; "
                 f"integer kernels {report.get('fusion', {}).get('integer_kernels')}")
    return CaseResult(
        name="resnet18_cnn",
        description=f"ResNet-18-shaped CNN at {size}x{size}: qcompile vs ORT quantize_static",
        columns=list(rows[0]), rows=rows, notes=notes,
        details={"size": size, "runs": runs, "warmup": warmup, "latency_ms": {str(b): v for b, v in latency.items()},
                 "sqnr_db": sqnr, "compile_s": compile_s, "fusion": fusion,
                 "qcompile_report": {k: report.get(k) for k in ("evaluation", "fusion", "size", "calibration", "plan")}},
    )
