"""The benchmark harness's own logic: the targets table and the README block it writes.

The benchmarks themselves run real models for minutes (``python -m benchmarks``); what is tested
here is what decides "met" or "NO" and what rewrites the README, on tables made up in the test.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import README_BEGIN, README_END, _write_into_readme  # noqa: E402
from benchmarks.table import CaseResult  # noqa: E402
from benchmarks.targets import check_targets  # noqa: E402


def _case(name, columns, rows, details=None):
    return CaseResult(name=name, description=name, columns=columns, rows=rows, details=details or {})


def _verdicts(table):
    return {row["target"]: row["met"] for row in table.rows}


def test_targets_are_judged_from_the_qcompile_and_ort_rows():
    minilm = _case("minilm", ["model", "mean cosine", "speedup", "size % fp32"], [
        {"model": "fp32", "mean cosine": None, "speedup": 1.0, "size % fp32": 100.0},
        {"model": "qcompile", "mean cosine": 0.9971, "speedup": 1.98, "size % fp32": 25.4},
    ])
    resnet = _case("resnet18_cnn", ["model", "SQNR dB", "b1 speedup", "b8 speedup", "size % fp32"], [
        {"model": "qcompile", "SQNR dB": 40.0, "b1 speedup": 3.1, "b8 speedup": 3.2, "size % fp32": 25.6},
        {"model": "ORT u8", "SQNR dB": 40.5, "b1 speedup": 3.0, "b8 speedup": 3.0},
        {"model": "ORT s8", "SQNR dB": 39.0, "b1 speedup": 1.1, "b8 speedup": 1.1},
    ])
    verdicts = _verdicts(check_targets({"minilm": minilm, "resnet18_cnn": resnet}))
    assert verdicts["MiniLM static W8A8: mean embedding cosine >= 0.995"] == "yes"
    assert verdicts["MiniLM static W8A8: >= 2.0x fp32 speed (8x128 tokens)"] == "NO"
    assert verdicts["ResNet-18-shaped CNN: >= 3.0x fp32 speed at batch 1"] == "yes"
    assert verdicts["ResNet-18-shaped CNN: output SQNR >= ORT's best"] == "NO"  # 40.0 < ORT u8's 40.5
    assert verdicts["INT8 file size <= 25.5% of fp32 (minilm)"] == "yes"
    assert verdicts["INT8 file size <= 25.5% of fp32 (resnet18_cnn)"] == "NO"


def test_calibration_targets_and_a_failed_ort_run():
    rows = [
        {"measurement": "minmax, 128 sentences", "qcompile s": 6.0, "ORT s": 9.0, "time ratio": 0.67, "qcompile peak MB": 900.0},
        {"measurement": "percentile, 128 sentences", "qcompile s": 8.0, "ORT s": 37.0, "time ratio": 0.22, "qcompile peak MB": 950.0},
        {"measurement": "entropy, 128 sentences", "qcompile s": 8.5, "ORT s": "exit 1: ValueError: Too many bins", "time ratio": None},
    ]
    growth = {"qcompile": {"64": {"peak_rss_mb": 900.0}, "1024": {"peak_rss_mb": 1000.0}}}
    case = _case("calibration", ["measurement", "qcompile s", "ORT s", "time ratio", "qcompile peak MB"], rows, {"growth": growth})
    verdicts = _verdicts(check_targets({"calibration": case}))
    assert verdicts["calibration + quantization time <= 0.5x ORT's (minmax)"] == "NO"
    assert verdicts["calibration + quantization time <= 0.5x ORT's (percentile)"] == "yes"
    assert verdicts["calibration + quantization time <= 0.5x ORT's (entropy)"] == "n/a"
    assert verdicts["calibration peak RSS <= 1 GB (MiniLM percentile, 128 sentences)"] == "yes"
    assert verdicts["calibration peak RSS flat (+-10%) from 64 to 1024 samples"] == "NO"  # 1.11x


def test_no_cases_no_targets_table():
    assert check_targets({}) is None


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{README_BEGIN}\nold table\n{README_END}\n\n## After\n")
    _write_into_readme(readme, "# qcompile benchmarks\n\n## minilm\n\n| a |\n")
    text = readme.read_text()
    assert "old table" not in text
    assert "## qcompile benchmarks" in text and "### minilm" in text  # one level down
    assert text.startswith("# Title\n\nintro\n") and text.endswith("## After\n")


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(SystemExit, match="benchmarks:begin"):
        _write_into_readme(readme, "x")
    assert readme.read_text() == "# Title\n"


def test_smollm2_targets():
    rows = [
        {"model": "fp32", "perplexity": 14.57, "size % fp32": 100.0},
        {"model": "qcompile llm-int4 (b128)", "perplexity": 16.9, "size % fp32": 24.0},
        {"model": "qcompile int4 b32", "perplexity": 15.6, "size % fp32": 26.0},
        {"model": "qcompile llm-int8-weight", "perplexity": 14.60, "size % fp32": 50.0},
    ]
    verdicts = _verdicts(check_targets({"smollm2": _case("smollm2", ["model", "perplexity", "size % fp32"], rows)}))
    assert verdicts["SmolLM2 INT4 block 128: perplexity <= 17.0"] == "yes"
    assert verdicts["SmolLM2 INT4 block 32: perplexity <= 15.5"] == "NO"
    assert verdicts["SmolLM2 W8A8 static: perplexity <= 16.0"] == "n/a"  # that row did not run
    assert verdicts["SmolLM2 INT8 weight-only: perplexity <= 14.62"] == "yes"
    assert verdicts["SmolLM2 INT4 block 128: file <= 35% of fp32"] == "yes"


def test_depthwise_cnn_targets_read_the_accuracies():
    accuracy = {"fp32": 0.975, "plain int8": 0.90, "+CLE+BC": 0.972, "+CLE+AdaRound": 0.96}
    case = _case("depthwise_cnn", ["model", "top-1"], [{"model": "fp32", "top-1": 0.975}], {"accuracy": accuracy})
    verdicts = _verdicts(check_targets({"depthwise_cnn": case}))
    assert verdicts["depthwise CNN (badly scaled channels): plain INT8 loses > 2 points of top-1"] == "yes"
    assert verdicts["depthwise CNN: CLE + bias correction or AdaRound within 0.5 points of fp32"] == "yes"  # 0.3 points
