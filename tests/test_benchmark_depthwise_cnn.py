"""The depthwise_cnn benchmark's claim, fast: a MobileNet-style digits CNN with badly scaled
depthwise channels loses more than 2 points of top-1 with plain INT8, and cross-layer equalization
with bias correction, or with AdaRound, brings it back within 0.5 points of float."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.depthwise_cnn import VARIANTS, build_depthwise_model, compile_variants, logits


def test_plain_int8_loses_and_equalization_recovers(tmp_path):
    path, calibration, (x, y) = build_depthwise_model(tmp_path, epochs=6)
    top1 = {"fp32": float((logits(str(path), x).argmax(axis=1) == y).mean())}
    chosen = {label: VARIANTS[label] for label in ("plain int8", "+CLE+BC", "+CLE+AdaRound")}
    for label, (model, _) in compile_variants(path, calibration, chosen).items():
        top1[label] = float((logits(model, x).argmax(axis=1) == y).mean())
    points = {label: 100 * (top1["fp32"] - value) for label, value in top1.items()}
    assert top1["fp32"] > 0.95, top1
    assert points["plain int8"] > 2.0, top1
    assert points["+CLE+BC"] <= 0.5, top1
    assert points["+CLE+AdaRound"] <= 0.5, top1
