"""calibration_memory: peak RSS of calibration must not grow with the number of samples.

qcompile folds every calibration batch into fixed-size histograms right away, so its memory should
be the same for 64 samples as for 1024 (target: within 10%). onnxruntime's ``quantize_static``
with ``CalibrationMethod.Percentile`` keeps every intermediate output of every batch until the end,
so it grows linearly: it runs on the same model, fed by the same generator, for comparison.

Each measurement runs in a child process (``_calibrate_child.py``) that imports only numpy,
onnxruntime and the quantizer, and reports its own peak RSS (VmHWM; see there why not ru_maxrss). Samples come one 1x3xHxW batch at
a time from a seeded generator, so the data itself is never held. The model is the ResNet-18-shaped
CNN at 112x112 (at 224x224 ORT would hold ~23 MB per sample, more than this machine has for 1024);
--quick uses a half-width one at 64x64 and 16 vs 128 samples. Each child gets an address-space
cap (70% of the memory available at start), so that a run that would exhaust the machine fails.
"""

from __future__ import annotations

__all__ = ["run"]

import json
import logging
import subprocess
import sys
from pathlib import Path

from benchmarks.models import export_resnet18
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("_calibrate_child.py")
TARGET_RATIO = 1.10
METHOD = "percentile"


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def _measure(tool: str, model: Path, samples: int, size: int, cap_gib: float) -> dict:
    command = [sys.executable, str(CHILD), "--tool", tool, "--model", str(model), "--samples", str(samples),
               "--size", str(size), "--method", METHOD, "--max-gib", f"{cap_gib:.1f}"]
    logger.info("calibration_memory: %s, %d samples", tool, samples)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        logger.error("%s with %d samples failed (exit %d): %s", tool, samples, done.returncode, done.stderr[-2000:])
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(results[-1][len("RESULT "):])


def run(quick: bool, workdir: Path) -> CaseResult:
    from onnxruntime.quantization import quant_pre_process

    size, width, small, large = (64, 32, 16, 128) if quick else (112, 64, 64, 1024)
    model = export_resnet18(workdir / f"resnet18_w{width}_{size}.onnx", size=size, width=width)
    # ORT's recommended flow preprocesses first; done here so that it is not part of the measurement.
    ort_model = workdir / f"resnet18_w{width}_{size}_ort_pre.onnx"
    quant_pre_process(str(model), str(ort_model), skip_symbolic_shape=True)
    cap = 0.7 * _available_gib()

    rows, details = [], {}
    measured = {tool: {} for tool in ("qcompile", "ort")}
    for samples in (small, large):  # both tools at one size, then both at the other: side by side
        measured["qcompile"][samples] = _measure("qcompile", model, samples, size, cap)
        measured["ort"][samples] = _measure("ort", ort_model, samples, size, cap)
    for tool, label in (("qcompile", f"qcompile ({METHOD})"), ("ort", "ORT quantize_static (Percentile)")):
        a, b = measured[tool][small], measured[tool][large]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"] if "error" not in a and "error" not in b else None
        rows.append({
            "quantizer": label,
            f"peak MB @{small}": a.get("peak_rss_mb", a.get("error")),
            f"peak MB @{large}": b.get("peak_rss_mb", b.get("error")),
            "ratio": round(ratio, 3) if ratio else None,
            "within 10%": None if ratio is None else ("yes" if ratio <= TARGET_RATIO else "NO"),
            f"s @{small}": a.get("seconds"),
            f"s @{large}": b.get("seconds"),
        })
        details[tool] = {str(k): v for k, v in measured[tool].items()}
    notes = [
        (f"model: ResNet-18-shaped (width {width}) at 1x3x{size}x{size}, batch 1 per sample; "
         f"baseline RSS after imports ~{measured['qcompile'][small].get('baseline_rss_mb', '?')} MB; "
         f"child address-space cap {cap:.1f} GiB"),
        f"ratio = peak RSS at {large} samples / peak RSS at {small}; target for qcompile <= {TARGET_RATIO}",
    ]
    return CaseResult(
        name="calibration_memory",
        description=f"peak RSS of one calibration run (child process), {small} vs {large} samples",
        columns=["quantizer", f"peak MB @{small}", f"peak MB @{large}", "ratio", "within 10%", f"s @{small}", f"s @{large}"],
        rows=rows, notes=notes,
        details={"model": {"size": size, "width": width}, "samples": [small, large], "cap_gib": round(cap, 1),
                 "method": METHOD, "measurements": details},
    )
