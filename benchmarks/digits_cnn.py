"""digits_cnn: the example's CNN trained on scikit-learn's 8x8 digits, qcompile vs onnxruntime.

The model, its calibration files (8 batches of 32 training images) and the 360 test images are
the example's (``examples/digits_cnn.py``, deterministic). Accuracy: top-1 on the test set.
Quantizers as in the CNN cases: qcompile defaults; ORT ``quantize_static`` QDQ with UINT8 and
INT8 activations. Latency at batch 1 and 64, the models taking turns.
"""

from __future__ import annotations

__all__ = ["run"]

import logging
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    QUANTIZERS,
    THREADS,
    alternating_latencies,
    compile_variants,
    cpu_session,
    examples_module,
    ratio_note,
)
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)


def run(quick: bool, workdir: Path) -> CaseResult:
    digits = examples_module("digits_cnn")
    runs, warmup = (10, 3) if quick else (50, 10)
    fp32, calib_dir, (x_test, y_test) = digits.build_digits_model(workdir / "digits")
    input_name = digits.onnx_input_name(fp32)

    variants = {label: (tool, {"calib": calib_dir, "input_name": input_name}) for label, tool in QUANTIZERS.items()}
    paths, compiles, failed = compile_variants(fp32, workdir / "digits", variants)
    sessions = {label: cpu_session(path)[0] for label, path in paths.items()}
    accuracy = {label: float(np.mean(s.run(None, {input_name: x_test})[0].argmax(axis=1) == y_test)) for label, s in sessions.items()}
    latency = {batch: alternating_latencies(sessions, {input_name: x_test[:batch]}, runs, warmup) for batch in (1, 64)}

    rows = {}
    for label, path in paths.items():
        compiled = compiles.get(label, {})
        rows[label] = {
            "model": label,
            "top-1": round(accuracy[label], 4),
            "b1 ms": round(latency[1][label], 3),
            "b1 speedup": round(latency[1]["fp32"] / latency[1][label], 2),
            "b64 ms": round(latency[64][label], 3),
            "b64 speedup": round(latency[64]["fp32"] / latency[64][label], 2),
            "compile s": compiled.get("seconds"),
            "compile peak MB": compiled.get("peak_rss_mb"),
            "size KB": round(path.stat().st_size / 1024, 1),
            "size % fp32": round(100.0 * path.stat().st_size / fp32.stat().st_size, 1),
        }
    notes = [f"{len(y_test)} test images; {THREADS} threads; median of {runs} runs after {warmup} warm-up, models alternating; "
             "qcompile holds out every 10th calibration file for its own report (ORT calibrates on all 8)"]
    keys = {"b1 ms": "latency b1", "b64 ms": "latency b64", "compile s": "compile time",
            "compile peak MB": "compile peak RSS", "size KB": "size"}
    for label in ("ORT u8", "ORT s8"):
        if label in rows and "qcompile" in rows:
            notes.append(ratio_note(rows["qcompile"], rows[label], label, keys)
                         + f"; top-1 {100 * (accuracy['qcompile'] - accuracy[label]):+.2f} points")
    notes += [f"{label} failed: {error}" for label, error in failed.items()]
    return CaseResult(
        name="digits_cnn", description="digits CNN (8x8 images, trained in the example): qcompile vs ORT quantize_static",
        columns=list(next(iter(rows.values()))), rows=list(rows.values()), notes=notes,
        details={"accuracy": accuracy, "latency_ms": {str(b): v for b, v in latency.items()}, "compiles": compiles},
    )
