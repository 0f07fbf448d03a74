"""minilm: all-MiniLM-L6-v2 on real sentences, quantized by qcompile and by onnxruntime.

The model, sentences and metrics are the example's (``examples/minilm.py``): the encoder exported
with dynamic batch and sequence axes; 128 calibration and 500 evaluation sentences from CPython's
``pydoc_data.topics``, disjoint, in batches of 16 padded to their longest sentence. Accuracy: the
sentence embeddings (mean-pooled, unit length) against the fp32 model's, as mean and minimum
cosine, and nearest-neighbour agreement (the share of sentences whose most similar other
sentence is the same as with fp32).

- qcompile: defaults (static W8A8: UINT8 activations, per-channel INT8 weights, MSE calibration).
- ORT u8: ``quant_pre_process`` + ``quantize_static`` QDQ, per-channel, QUInt8/QInt8, MinMax.
- ORT dynamic: ``quant_pre_process`` + ``quantize_dynamic`` per-channel: no calibration; ORT's
  usual advice for transformers, and its best MiniLM configuration measured here.

Latency: batch 8 x 128 tokens (padded), 2 threads, the models taking turns.
"""

from __future__ import annotations

__all__ = ["run"]

import json
import logging
from pathlib import Path

from benchmarks.harness import (
    THREADS,
    alternating_latencies,
    compile_variants,
    cpu_session,
    examples_module,
    ratio_note,
)
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

QUANTIZERS = {"qcompile": "qcompile", "ORT u8": "ort-u8", "ORT dynamic": "ort-dynamic"}


def run(quick: bool, workdir: Path) -> CaseResult:
    minilm = examples_module("minilm")
    calibration_count, evaluation_count = (32, 64) if quick else (minilm.CALIBRATION_SENTENCES, minilm.EVALUATION_SENTENCES)
    runs, warmup = (5, 2) if quick else (20, 3)
    sentences = minilm.all_sentences()
    calibration, evaluation = sentences[:calibration_count], sentences[calibration_count:calibration_count + evaluation_count]

    tokenizer = minilm.load_tokenizer()
    fp32 = minilm.export_minilm(workdir / "minilm")
    calib_dir, eval_dir = workdir / "minilm" / "calibration", workdir / "minilm" / "evaluation"
    minilm.write_calibration_batches(minilm.tokenize_batches(tokenizer, calibration), calib_dir)
    evaluation_batches = minilm.tokenize_batches(tokenizer, evaluation)
    minilm.write_calibration_batches(evaluation_batches[:8], eval_dir)  # qcompile's own report
    (latency_batch,) = minilm.tokenize_batches(tokenizer, evaluation[:8], batch_size=8, pad_to_max_tokens=True)

    variants = {label: (tool, {"calib": calib_dir if tool != "ort-dynamic" else None,
                               "eval": eval_dir if tool == "qcompile" else None})
                for label, tool in QUANTIZERS.items()}
    paths, compiles, failed = compile_variants(fp32, workdir / "minilm", variants)

    sessions, fusion = {}, {}
    for label, path in paths.items():
        sessions[label], fusion[label] = cpu_session(path)
    reference = minilm.embed(sessions["fp32"], evaluation_batches)
    metrics = {label: minilm.compare_embeddings(reference, minilm.embed(s, evaluation_batches))
               for label, s in sessions.items() if label != "fp32"}
    latency = alternating_latencies(sessions, latency_batch, runs, warmup)

    rows = {}
    for label, path in paths.items():
        compiled, metric = compiles.get(label, {}), metrics.get(label, {})
        rows[label] = {
            "model": label,
            "mean cosine": round(metric["mean_cosine"], 4) if metric else None,
            "min cosine": round(metric["min_cosine"], 4) if metric else None,
            "NN agreement": round(metric["nearest_neighbour_agreement"], 3) if metric else None,
            "8x128 ms": round(latency[label], 1),
            "speedup": round(latency["fp32"] / latency[label], 2),
            "compile s": compiled.get("seconds"),
            "compile peak MB": compiled.get("peak_rss_mb"),
            "size MB": round(path.stat().st_size / 1e6, 2),
            "size % fp32": round(100.0 * path.stat().st_size / fp32.stat().st_size, 1),
            "int matmuls": sum(n for kernel, n in fusion[label]["integer_kernels"].items() if "MatMul" in kernel),
        }
    notes = [f"{len(evaluation)} evaluation / {len(calibration)} calibration sentences; latency batch 8x128 tokens, "
             f"{THREADS} threads, median of {runs} runs after {warmup} warm-up, models alternating"]
    keys = {"8x128 ms": "latency", "compile s": "compile time", "compile peak MB": "compile peak RSS", "size MB": "size"}
    for label in ("ORT u8", "ORT dynamic"):
        if label in rows and "qcompile" in rows:
            notes.append(ratio_note(rows["qcompile"], rows[label], label, keys))
    notes += [f"{label} failed: {error}" for label, error in failed.items()]
    report = json.loads(paths["qcompile"].with_suffix(".report.json").read_text()) if "qcompile" in paths else {}
    if report:
        notes.append(f"qcompile's own report: integer kernels {report.get('fusion', {}).get('integer_kernels')}")
    return CaseResult(
        name="minilm", description="all-MiniLM-L6-v2 sentence embeddings: qcompile vs ORT",
        columns=list(next(iter(rows.values()))), rows=list(rows.values()), notes=notes,
        details={"latency_ms": latency, "metrics": metrics, "compiles": compiles, "fusion": fusion,
                 "qcompile_report": {k: report.get(k) for k in ("evaluation", "fusion", "size", "calibration", "plan")}},
    )
