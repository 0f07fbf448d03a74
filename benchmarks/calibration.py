"""calibration: compile time and peak memory of calibration, qcompile vs onnxruntime, per method.

The issue's reference case: all-MiniLM-L6-v2 calibrated on 128 real sentences padded to 128
tokens (8 batches of 16). Both quantizers get the same .npz files and run in child processes
(``_compile_child.py``) that report wall time and peak RSS (VmHWM):

- per method (minmax, percentile, entropy): qcompile with that method (and its other defaults,
  smooth-quant included; evaluation on one held-out batch) vs ORT ``quant_pre_process`` +
  ``quantize_static`` QDQ with the same ``CalibrationMethod``;
- memory growth: percentile calibration on 64 and on 1024 sentences (qcompile streams into
  fixed-size histograms; ORT keeps every activation of every batch, so it is run at 64 and 128
  only: at 1024 it would need ~70 GB).

Targets (issue 3): qcompile's peak RSS <= 1 GB at 128 and flat (+-10%) from 64 to 1024;
wall time <= 0.5x ORT's for every method.
"""

from __future__ import annotations

__all__ = ["run"]

import logging
from pathlib import Path

from benchmarks.harness import compile_in_child, examples_module
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")


def _write(minilm, tokenizer, sentences: list[str], directory: Path, tokens: int) -> Path:
    batches = minilm.tokenize_batches(tokenizer, sentences, batch_size=16, pad_to_max_tokens=True)
    for batch in batches:  # padded to ``tokens`` (MAX_TOKENS is 128; --quick uses fewer)
        for name in batch:
            batch[name] = batch[name][:, :tokens]
    minilm.write_calibration_batches(batches, directory)
    return directory


def run(quick: bool, workdir: Path) -> CaseResult:
    minilm = examples_module("minilm")
    base, small, large, tokens = (32, 16, 128, 32) if quick else (128, 64, 1024, 128)
    sentences = minilm.all_sentences()
    pool = (sentences * (large // len(sentences) + 1))[:large]  # 1024 > the ~970 distinct sentences
    tokenizer = minilm.load_tokenizer()
    folder = workdir / "calibration"
    fp32 = minilm.export_minilm(folder)
    data = {count: _write(minilm, tokenizer, pool[:count], folder / f"calib_{count}", tokens) for count in {base, small, large}}
    eval_dir = _write(minilm, tokenizer, sentences[-16:], folder / "eval", tokens)

    def measure(tool: str, method: str, count: int) -> dict:
        out = folder / f"{tool}_{method}_{count}.onnx"
        return compile_in_child(tool, fp32, out, calib=data[count], method=method,
                                eval=eval_dir if tool == "qcompile" else None)

    rows, measured = [], {}
    for method in METHODS:  # side by side: both tools on one method, then the next
        ours, theirs = measure("qcompile", method, base), measure("ort-u8", method, base)
        measured[method] = {"qcompile": ours, "ort": theirs}
        ratio = ours["seconds"] / theirs["seconds"] if "seconds" in ours and "seconds" in theirs else None
        rows.append({
            "measurement": f"{method}, {base} sentences",
            "qcompile s": ours.get("seconds", ours.get("error")),
            "ORT s": theirs.get("seconds", theirs.get("error")),
            "time ratio": round(ratio, 2) if ratio else None,
            "qcompile peak MB": ours.get("peak_rss_mb"),
            "ORT peak MB": theirs.get("peak_rss_mb"),
        })
    growth = {"qcompile": {small: measure("qcompile", "percentile", small), large: measure("qcompile", "percentile", large)},
              "ort": {small: measure("ort-u8", "percentile", small), base: measured["percentile"]["ort"]}}
    for tool, label in (("qcompile", "qcompile"), ("ort", "ORT")):
        runs = growth[tool]
        low, high = min(runs), max(runs)
        peak = {n: r.get("peak_rss_mb") for n, r in runs.items()}
        rows.append({
            "measurement": f"{label} percentile peak MB, {low} -> {high} sentences",
            "qcompile s" if tool == "qcompile" else "ORT s": f"{runs[low].get('seconds')} -> {runs[high].get('seconds')}",
            "time ratio": None,
            "qcompile peak MB" if tool == "qcompile" else "ORT peak MB": f"{peak[low]} -> {peak[high]}",
        })
    q_growth = (growth["qcompile"][large].get("peak_rss_mb") or 0) / (growth["qcompile"][small].get("peak_rss_mb") or 1)
    notes = [
        f"all-MiniLM-L6-v2, batches of 16 sentences padded to {tokens} tokens; each run in its own child process",
        "time ratio = qcompile / ORT wall time (quant_pre_process + quantize_static for ORT; load, smooth-quant, "
        "calibrate, quantize, one-batch evaluation and save for qcompile)",
        f"qcompile percentile peak RSS grows {q_growth:.3f}x from {small} to {large} sentences (target <= 1.10x); "
        f"ORT not run at {large}: it keeps every activation (~{growth['ort'][base].get('peak_rss_mb', 0) / base * large / 1024:.0f} GB extrapolated)",
    ]
    return CaseResult(
        name="calibration", description=f"calibration wall time and peak RSS, MiniLM, {base} sentences: qcompile vs ORT",
        columns=["measurement", "qcompile s", "ORT s", "time ratio", "qcompile peak MB", "ORT peak MB"],
        rows=rows, notes=notes, details={"methods": measured, "growth": {t: {str(k): v for k, v in r.items()} for t, r in growth.items()}},
    )
