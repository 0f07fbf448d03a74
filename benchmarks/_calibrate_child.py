"""One calibration run in a fresh process, for calibration_memory: prints ``RESULT {json}``.

Run as a script (not through the ``benchmarks`` package) so that nothing but numpy, onnxruntime
and the quantizer under test is imported: the peak RSS it reports is the calibration's own.
The peak is ``VmHWM`` from /proc/self/status (this process image's high-water mark), not
``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec, so a child of a parent that imported
torch would report the parent's RSS (~500 MB) as its own peak, hiding the calibration's.
Samples come from a seeded generator, one 1xCxHxW batch at a time, so the data is never held.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INPUT_NAME = "input"


def batches(seed: int, count: int, size: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {INPUT_NAME: rng.standard_normal((1, 3, size, size), dtype=np.float32)}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0  # kB


def run_qcompile(args) -> dict:
    import qcompile

    config = {"measure_latency": False, "eval_batches": 1, "calibration_method": args.method}
    # A separate one-batch evaluation set, so that all ``samples`` batches are calibration batches.
    eval_data = list(batches(args.seed + 1, 1, args.size))
    result = qcompile.compile(args.model, batches(args.seed, args.samples, args.size),
                              config=config, eval_data=eval_data)
    report = result.report.to_dict()
    return {"calibration_batches": report["calibration"]["batches"]}


def run_ort(args) -> dict:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.source = batches(args.seed, args.samples, args.size)

        def get_next(self):
            return next(self.source, None)

    method = {"percentile": q.CalibrationMethod.Percentile, "minmax": q.CalibrationMethod.MinMax,
              "entropy": q.CalibrationMethod.Entropy}[args.method]
    with tempfile.TemporaryDirectory() as tmp:
        q.quantize_static(args.model, str(Path(tmp) / "out.onnx"), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, calibrate_method=method)
    return {"calibration_batches": args.samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", choices=("qcompile", "ort"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gib", type=float, default=0.0, help="address-space cap (0: none)")
    args = parser.parse_args()
    if args.max_gib:
        limit = int(args.max_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import onnxruntime  # noqa: F401  (imported before the baseline, like the quantizers import it)

    baseline = peak_rss_mb()
    start = time.perf_counter()
    extra = (run_qcompile if args.tool == "qcompile" else run_ort)(args)
    result = {"peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
              "seconds": round(time.perf_counter() - start, 2), **extra}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
