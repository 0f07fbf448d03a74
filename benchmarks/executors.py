"""executors: the same work on one process and on several (qcompile.scaleout.executors), side by side.

- **Sharded calibration on Ray**: all-MiniLM-L6-v2 calibrated on 1,024 real sentences (CPython's
  pydoc topics, topped up from the license texts Debian ships; 64 batches of 16), once in this
  process and once on a local Ray in 4 shards (``workers=4``). The compiled models must be
  byte-identical; wall times and their ratio are printed.
- **Sensitivity analysis**: ``qcompile.analysis.sensitivity.node_sensitivity`` (one compile per quantized
  node kept float) of the digits CNN, and of a small ResNet-18 (width 16, 32x32 images) where each
  compile is long enough for workers to pay off, in process and on ``--executor local --workers 2``
  (a pool started for the run, as the command line does). The rankings must be identical.

Each row is one workload: in-process seconds, parallel seconds, their ratio (in-process / parallel:
above 1 is faster in parallel), and whether the results are identical. Worker (or Ray) start-up is
in the parallel time, as a command-line user pays it. A row with one ORT thread per session on
both sides shows how the work splits when the machine has more cores than one session uses.
"""

from __future__ import annotations

__all__ = ["run"]

import glob
import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import CaseSkipped, examples_module
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

SHARDS = 4


def _sentences(minilm, count: int) -> list[str]:
    """``count`` distinct sentences: pydoc topics first, then the license texts."""
    sentences = list(dict.fromkeys(minilm.all_sentences()))
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if len(sentences) >= count:
            break
        try:
            text = Path(path).read_text(errors="ignore")
        except (IsADirectoryError, OSError):
            continue
        for sentence in minilm._prose_sentences(text):
            if sentence not in sentences:
                sentences.append(sentence)
    if len(sentences) < count:
        logger.warning("only %d distinct sentences; repeating them to reach %d", len(sentences), count)
        sentences = (sentences * (count // len(sentences) + 1))
    return sentences[:count]


def _sha(result) -> str:
    return hashlib.sha256(result.to_proto().SerializeToString(deterministic=True)).hexdigest()


def _minilm_on_ray(quick: bool, workdir: Path) -> dict:
    import qcompile
    from qcompile.scaleout.executors import make_executor

    try:
        import ray  # noqa: F401
    except ImportError:
        raise CaseSkipped("needs Ray: pip install -e '.[ray]'") from None
    minilm = examples_module("minilm")
    count = 64 if quick else 1024
    tokenizer = minilm.load_tokenizer()
    fp32 = minilm.export_minilm(workdir / "minilm")
    calib = workdir / "minilm" / f"calibration-{count}"
    minilm.write_calibration_batches(minilm.tokenize_batches(tokenizer, _sentences(minilm, count)), calib)
    config = {"measure_latency": False}
    start = time.perf_counter()
    alone = qcompile.compile(str(fp32), str(calib), config=config)
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    with make_executor("ray", workers=SHARDS) as executor:
        sharded = qcompile.compile(str(fp32), str(calib), config=config, executor=executor)
    ray_s = time.perf_counter() - start
    record = sharded.report.transformations["calibrate"]
    calibrate = {t["name"]: t["seconds"] for t in alone.report.passes}.get("calibrate")
    return {
        "workload": f"MiniLM compile, {count} sentences, Ray {record['shards']} shards",
        "in-process s": round(alone_s, 1), "parallel s": round(ray_s, 1), "ratio": round(alone_s / ray_s, 2),
        "identical": _sha(alone) == _sha(sharded),
        "detail": (f"calibrate pass {calibrate:.1f} s in process vs {record['seconds']:.1f} s on Ray "
                   f"(shards of {record['batches_per_shard']} batches); Ray start-up included in the parallel time"),
    }


def _sensitivity(label: str, model: Path, calib: Path, threads: int = 0) -> dict:
    from qcompile.scaleout.executors import make_executor
    from qcompile.analysis.sensitivity import node_sensitivity

    config = {"threads": threads}
    start = time.perf_counter()
    alone, summary = node_sensitivity(str(model), str(calib), config=config)
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    with make_executor("local", workers=2) as executor:
        spread, _ = node_sensitivity(str(model), str(calib), config=config, executor=executor)
    local_s = time.perf_counter() - start
    return {
        "workload": f"{label} sensitivity, {summary['nodes']} nodes, local 2 workers"
                    + (f", {threads} ORT thread per session" if threads else ""),
        "in-process s": round(alone_s, 2), "parallel s": round(local_s, 2), "ratio": round(alone_s / local_s, 2),
        "identical": spread == alone,
        "detail": f"most sensitive: {alone[0]['node']} ({alone[0]['gain_db']:+.2f} dB); worker start-up included",
    }


def _resnet_calibration(directory: Path, batches: int) -> Path:
    from benchmarks.models import INPUT_NAME, random_images

    directory.mkdir(parents=True, exist_ok=True)
    for index, images in enumerate(random_images(7, 8 * batches, 32, batch=8)):
        np.savez(directory / f"batch{index:03d}.npz", **{INPUT_NAME: images})
    return directory


def run(quick: bool, workdir: Path) -> CaseResult:
    rows, skipped = [], []
    digits = examples_module("digits_cnn")
    fp32, calib_dir, _ = digits.build_digits_model(workdir / "digits")
    rows.append(_sensitivity("digits CNN", fp32, calib_dir))
    if not quick:
        from benchmarks.models import export_resnet18

        resnet = export_resnet18(workdir / "resnet18-w16.onnx", size=32, width=16)
        resnet_calib = _resnet_calibration(workdir / "resnet-calib", 8)
        rows.append(_sensitivity("ResNet-18 (w16, 32x32)", resnet, resnet_calib))
        # Both sides on one ORT thread per session: how well the work splits across workers when
        # there are more cores than one session uses (on this 2-core machine, one session uses both).
        rows.append(_sensitivity("ResNet-18 (w16, 32x32)", resnet, resnet_calib, threads=1))
    try:
        rows.append(_minilm_on_ray(quick, workdir))
    except CaseSkipped as why:
        skipped.append(f"MiniLM on Ray skipped: {why}")
    notes = [row.pop("detail") for row in rows] + skipped
    if not all(row["identical"] for row in rows):
        notes.append("RESULTS DIFFER between executors: a bug")
    return CaseResult(
        name="executors", description="the same work in process and on parallel executors (2 cores)",
        columns=list(rows[0]), rows=rows, notes=notes,
    )
