"""One quantizer run in a fresh process: prints ``RESULT {json}`` with its wall time and peak RSS.

Run as a script (not through the ``benchmarks`` package) so that nothing but numpy, onnxruntime
and the quantizer under test is imported: the peak RSS it reports is the compile's own. The peak
is ``VmHWM`` from /proc/self/status (this process image's high-water mark), not ``ru_maxrss``:
Linux carries ``ru_maxrss`` over fork and exec, so a child of a parent that imported torch would
report the parent's RSS (~500 MB) as its own peak.

Data: ``--calib DIR`` (a directory of .npz batches, read by both tools one file at a time) or
``--random N --shape 1x3x224x224`` (seeded standard-normal batches made one at a time, so the
data itself is never held). qcompile gets its evaluation batches separately (``--eval DIR``, or
one random batch with ``--random``), so that every calibration batch calibrates, as with ORT;
with ``--calib`` and no ``--eval`` it holds out every 10th file, as it does by default.

Tools:
- ``qcompile``: ``qcompile.compile`` with its defaults, except the calibration method when given
  and ``measure_latency`` off (the benchmark measures latency itself, for every model alike).
- ``ort-u8`` / ``ort-s8``: ONNX Runtime's recommended flow, ``quant_pre_process`` then
  ``quantize_static`` (QDQ, per-channel INT8 weights, UINT8 or INT8 activations).
- ``ort-dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` (per-channel INT8 weights,
  activations quantized at run time; no calibration data), ORT's usual choice for transformers.
- ``ort-nbits``: ``MatMulNBitsQuantizer`` (weight-only, ``--bits``, ``--block``, symmetric, RTN),
  ORT's tool for language models; no calibration data.
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

ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0  # kB


def batches(args):
    if args.calib:
        for path in sorted(Path(args.calib).glob("*.npz")):
            with np.load(path) as arrays:
                yield {name: arrays[name] for name in arrays.files}
        return
    rng = np.random.default_rng(args.seed)
    shape = tuple(int(d) for d in args.shape.split("x"))
    for _ in range(args.random):
        yield {args.input_name: rng.standard_normal(shape, dtype=np.float32)}


def run_qcompile(args) -> dict:
    import qcompile

    config = {"measure_latency": False}
    if args.recipe:
        config["recipe"] = args.recipe
    if args.pipeline:
        config["pipeline"] = [args.pipeline]
    if args.method:
        config["calibration_method"] = args.method
    if args.eval:
        eval_data = args.eval
    elif args.calib:
        eval_data = None  # qcompile's default: every 10th calibration file is held out for its report
    else:
        rng = np.random.default_rng(args.seed + 1)
        eval_data = [{args.input_name: rng.standard_normal(tuple(int(d) for d in args.shape.split("x")), dtype=np.float32)}]
        config["eval_batches"] = 1
    # A directory is what users pass; it can be read more than once (smooth-quant needs that).
    data = args.calib if args.calib else batches(args)
    result = qcompile.compile(args.model, data, config=config, eval_data=eval_data)
    result.save(args.out, report_path=Path(args.out).with_suffix(".report.json"))
    # Weight-only recipes without a calibrating pass have no calibration section.
    return {"calibration_batches": result.report.to_dict()["calibration"].get("batches")}


def run_ort(args) -> dict:
    from onnxruntime import quantization as q

    if args.tool == "ort-nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(args.model, bits=args.bits, block_size=args.block, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(args.out, use_external_data_format=False)
        return {}

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.source = batches(args)

        def get_next(self):
            return next(self.source, None)

    activation_type = q.QuantType.QUInt8 if args.tool == "ort-u8" else q.QuantType.QInt8
    method = getattr(q.CalibrationMethod, ORT_METHODS[args.method or "minmax"])
    with tempfile.TemporaryDirectory() as tmp:
        preprocessed = str(Path(tmp) / "preprocessed.onnx")
        q.quant_pre_process(args.model, preprocessed, skip_symbolic_shape=True)
        if args.tool == "ort-dynamic":
            q.quantize_dynamic(preprocessed, args.out, per_channel=True, weight_type=q.QuantType.QInt8)
            return {}
        q.quantize_static(preprocessed, args.out, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=activation_type, weight_type=q.QuantType.QInt8, calibrate_method=method)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", choices=("qcompile", "ort-u8", "ort-s8", "ort-dynamic", "ort-nbits"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--calib", help="directory of .npz calibration batches")
    parser.add_argument("--eval", help="directory of .npz evaluation batches (qcompile's report)")
    parser.add_argument("--random", type=int, default=0, help="this many random batches instead of --calib")
    parser.add_argument("--shape", default="1x3x224x224", help="shape of each random batch")
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--method", choices=tuple(ORT_METHODS) + ("mse",), help="calibration method (default: the tool's)")
    parser.add_argument("--recipe", help="qcompile recipe (llm-int4, ...)")
    parser.add_argument("--pipeline", help="qcompile pipeline, comma-separated")
    parser.add_argument("--bits", type=int, default=4, help="ort-nbits: weight bits")
    parser.add_argument("--block", type=int, default=128, help="ort-nbits: block size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gib", type=float, default=0.0, help="address-space cap (0: none)")
    args = parser.parse_args()
    if args.max_gib:
        limit = int(args.max_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import onnxruntime  # noqa: F401  (imported before the baseline, as both quantizers import it)

    baseline = peak_rss_mb()
    start = time.perf_counter()
    extra = (run_qcompile if args.tool == "qcompile" else run_ort)(args)
    result = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
              "baseline_rss_mb": round(baseline, 1), **extra}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
