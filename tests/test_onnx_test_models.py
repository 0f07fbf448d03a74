"""The ONNX project's own test models (``onnx/backend/test/data``) through the compiler: no crashes.

Runs the sweep of ``benchmarks/onnx_test_models.py`` (``python -m benchmarks.onnx_test_models``
for the whole table) on every model but the six slowest of ``light/``: those run full-size
ImageNet networks at 224 x 224 (VGG-19 alone takes 20 s) and make the sweep ~60 s instead of
~12 s. ``QCOMPILE_ONNX_SWEEP=all`` includes them.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.onnx_test_models import discover, sweep

# Some pytorch-operator inputs are uninitialized float64 memory (1e199): squaring them for the
# report's SQNR overflows, harmlessly (those outputs are float64, never quantized, and exact).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

SLOW = {"light_bvlc_alexnet", "light_densenet121", "light_inception_v2", "light_resnet50", "light_vgg19",
        "light_zfnet512"}


@pytest.fixture(scope="module")
def outcomes():
    cases = discover()
    if os.environ.get("QCOMPILE_ONNX_SWEEP") != "all":
        cases = [case for case in cases if case.name not in SLOW]
    assert len(cases) > 100, "onnx ships ~150 test models; did its test data move?"
    return sweep(cases)


def test_no_test_model_crashes_the_compiler(outcomes):
    crashes = [f"{o.suite}/{o.name}: {o.detail}" for o in outcomes if o.status == "CRASH"]
    assert not crashes, "\n".join(crashes)


def test_every_refusal_says_why(outcomes):
    refused = [o for o in outcomes if o.status == "refused"]
    assert all(len(o.detail) > 20 for o in refused), [(o.name, o.detail) for o in refused]


def test_most_test_models_compile_within_tolerance(outcomes):
    # 139 of 149 with onnx 1.23 / onnxruntime 1.32; the refusals are models ONNX Runtime cannot run.
    ok = [o for o in outcomes if o.status == "ok"]
    assert len(ok) >= 0.85 * len(outcomes), [(o.name, o.status, o.detail) for o in outcomes if o.status != "ok"]
