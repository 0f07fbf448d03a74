"""Streaming statistics: exact merge, bounded memory, and ranges checked against numpy."""

import numpy as np
import pytest

from qcompile.errors import ConfigError
from qcompile.numerics.statistics import CalibrationTable, TensorStatistics


def _stats(*arrays):
    s = TensorStatistics()
    for a in arrays:
        s.update(a)
    return s


def test_minmax_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 1000).astype(np.float32), rng.normal(3, 2, 1000).astype(np.float32)
    s = _stats(a, b)
    assert s.range("minmax", 256) == (float(min(a.min(), b.min())), float(max(a.max(), b.max())))
    assert s.count == 2000


def test_merge_equals_single_pass_in_any_order():
    rng = np.random.default_rng(1)
    parts = [rng.normal(0, scale, 500).astype(np.float32) for scale in (0.01, 5.0, 0.3, 100.0)]
    single = _stats(*parts)
    left, right = _stats(parts[0], parts[3]), _stats(parts[2], parts[1])
    for merged in (left.merge(right), right.merge(left)):
        assert merged.width_exponent == single.width_exponent
        np.testing.assert_array_equal(merged.counts, single.counts)
        assert (merged.min, merged.max, merged.count) == (single.min, single.max, single.count)


def test_table_merge_keeps_all_tensors():
    a, b = CalibrationTable(), CalibrationTable()
    a.update("x", np.ones(4, np.float32))
    b.update("x", -np.ones(4, np.float32))
    b.update("y", np.zeros(2, np.float32))
    merged = a.merge(b)
    assert set(merged.tensors) == {"x", "y"}
    assert merged["x"].range("minmax", 256) == (-1.0, 1.0)


def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, 200_000).astype(np.float32)
    s = _stats(x)
    lo, hi = s.range("percentile", 256, percentile=99.9)
    width = 2.0 ** s.width_exponent
    assert abs(hi - np.percentile(x, 99.9)) <= 2 * width
    assert abs(lo - np.percentile(x, 0.1)) <= 2 * width


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_clipping_methods_clip_outliers_and_stay_inside_minmax(method):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 100_000), [80.0, -60.0]]).astype(np.float32)
    lo, hi = _stats(x).range(method, 256)
    assert -60.0 <= lo < 0 < hi <= 80.0
    assert hi < 40.0, f"{method} kept the single outlier at 80"


def _quantization_mse(x, lo, hi, levels=256):
    scale = (hi - lo) / (levels - 1)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, levels - 1)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def test_mse_range_is_near_the_brute_force_optimum():
    """The histogram estimate picks a range whose real error is within 5% of the best shrink."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.laplace(0, 1, 200_000), [40.0, -30.0] * 5]).astype(np.float32)
    s = _stats(x)
    lo, hi = s.range("mse", 256)
    best = min(_quantization_mse(x, -30.0 * a, 40.0 * a) for a in np.linspace(0.05, 1.0, 96))
    assert hi < 40.0
    assert _quantization_mse(x, lo, hi) <= 1.05 * best


def test_nonfinite_values_are_counted_not_binned():
    s = _stats(np.array([1.0, np.inf, -np.inf, np.nan, -2.0], np.float32))
    assert s.nonfinite == 3 and s.range("minmax", 256) == (-2.0, 1.0)


def test_histogram_size_does_not_grow_with_data():
    s = _stats(np.zeros(10, np.float32))
    size = s.counts.nbytes
    for scale in (1e-3, 1.0, 1e3, 1e6):
        s.update(np.full(1000, scale, np.float32))
    assert s.counts.nbytes == size


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown calibration method"):
        _stats(np.ones(3, np.float32)).range("kl-magic", 256)


def test_entropy_is_not_pulled_down_by_the_zeros_of_a_relu():
    """Found by the fuzzer: on a Clip(0, 6) output the zero spike (half the values) made the KL
    threshold a fifth of the range (4 dB SQNR). Relu(N(0, 1)) should clip only its far tail, as
    N(0, 1) does: before the fix the threshold was 1.99 instead of ~4.1."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 100_000).astype(np.float32)
    _, relu_hi = _stats(np.maximum(x, 0)).range("entropy", 256)
    _, plain_hi = _stats(x).range("entropy", 256)
    assert relu_hi >= 0.9 * plain_hi, (relu_hi, plain_hi)


def test_entropy_threshold_keeps_values_that_are_all_far_from_zero():
    """Found by the fuzzer: a Conv output with every value in [-1.5, -0.5] got the range
    (-0.548, -0.548) (6 dB SQNR). A threshold below every |x| clips them all into one bin, a point
    mass its quantized form matches exactly: KL 0, the minimum. Thresholds now keep the bulk."""
    x = -np.random.default_rng(0).uniform(0.55, 1.47, 2000).astype(np.float32)
    lo, hi = _stats(x).range("entropy", 256)
    assert lo <= -1.4 and hi == x.max()


def _simulated_error(values: np.ndarray, rmin: float, rmax: float, levels: int = 256) -> float:
    """Squared error of rounding the raw values on the grid of [rmin, rmax] (numpy, no histogram)."""
    low, high = min(rmin, 0.0), max(rmax, 0.0)
    step = (high - low) / (levels - 1)
    return float(np.sum((values - (low + np.clip(np.round((values - low) / step), 0, levels - 1) * step)) ** 2))


@pytest.mark.parametrize("case", ["outlier", "uniform", "relu_heavy_tail"])
def test_auto_picks_the_method_with_the_least_error_on_the_data_itself(case):
    rng = np.random.default_rng(7)
    values = {
        "outlier": np.concatenate([rng.standard_normal(200_000), [400.0]]),
        "uniform": rng.uniform(-3, 5, 200_000),
        "relu_heavy_tail": np.maximum(rng.standard_t(2, 200_000), 0),
    }[case].astype(np.float32)
    stats = TensorStatistics()
    stats.update(values)
    chosen = stats.best_method(256)
    errors = {m: _simulated_error(values, *stats.range(m, 256)) for m in ("mse", "percentile", "minmax", "entropy")}
    # The histogram's simulation agrees with the raw data's: the choice is within 2% of the best.
    assert errors[chosen] <= 1.02 * min(errors.values()), (chosen, errors)
    assert stats.range("auto", 256) == stats.range(chosen, 256)
    if case == "uniform":  # nothing to clip: any clipping method can only tie with minmax
        assert errors[chosen] <= errors["minmax"]


def test_auto_calibration_records_its_choice_per_tensor(tmp_path):
    import qcompile
    from tiny_models import tiny_cnn

    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile(tiny_cnn(), batches, config={"calibration_method": "auto", "measure_latency": False})
    chosen = result.report.plan["calibration_methods"]
    assert set(chosen) <= {"mse", "percentile", "minmax", "entropy"}
    # Every tensor with its own range (not one that shares its input's) has a choice.
    assert 0 < sum(len(t) for t in chosen.values()) <= result.report.plan["quantized_activations"]
    assert min(o["sqnr_db"] for o in result.report.evaluation["outputs"].values()) > 25
