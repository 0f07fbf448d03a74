"""resnet18_cnn and mobilenetv2_cnn: CNNs at 224x224 quantized by qcompile and by onnxruntime.

Random weights (seeded), so accuracy is output SQNR against the fp32 model on 8 held-out random
images: 10 log10(sum x^2 / sum (x - x_q)^2). Every quantizer calibrates on the same 32 images
(batch 1 each, one .npz file per image) and runs in its own child process (``_compile_child.py``),
which measures its wall time (ORT's includes ``quant_pre_process``; qcompile's includes its own
evaluation on the 8 images) and peak RSS.

- qcompile: ``qcompile.compile`` with its defaults (UINT8 activations, per-channel INT8 weights,
  MSE calibration); only its latency measurement is off, since latency is measured here.
- ORT u8 / ORT s8: ``quant_pre_process`` then ``quantize_static`` (QDQ, per_channel=True, QInt8
  weights, MinMax) with QUInt8 or QInt8 activations.

Latency: ORT CPU sessions with 2 intra-op threads, at batch 1 and batch 8, medians over runs in
which the models take turns (see ``harness.alternating_latencies``). ``int kernels`` counts the
integer kernels ORT's CPU provider made of each model; ``float conv/gemm`` the compute left float.
"""

from __future__ import annotations

__all__ = ["run_resnet18", "run_mobilenetv2"]

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    QUANTIZERS,
    THREADS,
    alternating_latencies,
    compile_variants,
    cpu_session,
    ratio_note,
    sqnr_db,
)
from benchmarks.models import (
    INPUT_NAME,
    export_mobilenetv2,
    export_resnet18,
    random_images,
)
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

CALIB_SEED, EVAL_SEED = 1, 2
CALIB_IMAGES, EVAL_IMAGES = 32, 8


def _write_images(directory: Path, seed: int, count: int, size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, x in enumerate(random_images(seed, count, size)):
        np.savez(directory / f"image_{index:03d}.npz", **{INPUT_NAME: x})
    return directory


def run_cnn_case(name: str, title: str, export: Callable[[Path, int], Path], quick: bool, workdir: Path) -> CaseResult:
    size, runs, warmup = (64, 10, 3) if quick else (224, 20, 5)
    fp32 = export(workdir / f"{name}_{size}.onnx", size)
    calib_dir = _write_images(workdir / f"{name}_calib", CALIB_SEED, CALIB_IMAGES, size)
    eval_dir = _write_images(workdir / f"{name}_eval", EVAL_SEED, EVAL_IMAGES, size)
    eval_x = np.concatenate(list(random_images(EVAL_SEED, EVAL_IMAGES, size)))

    variants = {label: (tool, {"calib": calib_dir, "eval": eval_dir if tool == "qcompile" else None})
                for label, tool in QUANTIZERS.items()}
    paths, compiles, failed = compile_variants(fp32, workdir, variants)

    sessions, fusion = {}, {}
    for label, path in paths.items():
        sessions[label], fusion[label] = cpu_session(path)
    reference = sessions["fp32"].run(None, {INPUT_NAME: eval_x})[0]
    sqnr = {label: sqnr_db(reference, s.run(None, {INPUT_NAME: eval_x})[0]) for label, s in sessions.items() if label != "fp32"}
    logger.info("%s: timing %d runs after %d warm-up, batch 1 and %d", name, runs, warmup, EVAL_IMAGES)
    latency = {batch: alternating_latencies(sessions, {INPUT_NAME: eval_x[:batch]}, runs, warmup) for batch in (1, EVAL_IMAGES)}

    rows = {}
    for label, path in paths.items():
        compiled = compiles.get(label, {})
        rows[label] = {
            "model": label,
            "SQNR dB": round(sqnr[label], 2) if label in sqnr else None,
            "b1 ms": round(latency[1][label], 2),
            "b1 speedup": round(latency[1]["fp32"] / latency[1][label], 2),
            f"b{EVAL_IMAGES} ms": round(latency[EVAL_IMAGES][label], 2),
            f"b{EVAL_IMAGES} speedup": round(latency[EVAL_IMAGES]["fp32"] / latency[EVAL_IMAGES][label], 2),
            "compile s": compiled.get("seconds"),
            "compile peak MB": compiled.get("peak_rss_mb"),
            "size MB": round(path.stat().st_size / 1e6, 2),
            "size % fp32": round(100.0 * path.stat().st_size / fp32.stat().st_size, 1),
            "int kernels": sum(fusion[label]["integer_kernels"].values()),
            "float conv/gemm": fusion[label]["float_compute_nodes"],
        }
    notes = [(f"input {EVAL_IMAGES}x3x{size}x{size} (batch 1: first image); {THREADS} threads; "
              f"median of {runs} runs after {warmup} warm-up, models alternating; compile in a child process each")]
    keys = {"b1 ms": "latency b1", f"b{EVAL_IMAGES} ms": f"latency b{EVAL_IMAGES}", "compile s": "compile time",
            "compile peak MB": "compile peak RSS", "size MB": "size"}
    for label in ("ORT u8", "ORT s8"):
        if label in rows and "qcompile" in rows:
            notes.append(ratio_note(rows["qcompile"], rows[label], label, keys)
                         + f"; SQNR {sqnr['qcompile'] - sqnr[label]:+.2f} dB")
    notes += [f"{label} failed: {error}" for label, error in failed.items()]
    report = {}
    if "qcompile" in paths:
        report = json.loads(paths["qcompile"].with_suffix(".report.json").read_text())
        notes.append(f"qcompile's own report: integer kernels {report.get('fusion', {}).get('integer_kernels')}")
    return CaseResult(
        name=name, description=f"{title} at {size}x{size}: qcompile vs ORT quantize_static",
        columns=list(next(iter(rows.values()))), rows=list(rows.values()), notes=notes,
        details={"size": size, "runs": runs, "warmup": warmup, "latency_ms": {str(b): v for b, v in latency.items()},
                 "sqnr_db": sqnr, "compiles": compiles, "fusion": fusion,
                 "qcompile_report": {k: report.get(k) for k in ("evaluation", "fusion", "size", "calibration", "plan")}},
    )


def run_resnet18(quick: bool, workdir: Path) -> CaseResult:
    width = 32 if quick else 64
    return run_cnn_case("resnet18_cnn", "ResNet-18-shaped CNN",
                        lambda path, size: export_resnet18(path, size=size, width=width), quick, workdir)


def run_mobilenetv2(quick: bool, workdir: Path) -> CaseResult:
    width = 50 if quick else 100
    return run_cnn_case("mobilenetv2_cnn", "MobileNetV2-shaped CNN",
                        lambda path, size: export_mobilenetv2(path, size=size, width=width), quick, workdir)
