"""Issue 3's targets, checked against the measured tables: one row per target, met or not."""

from __future__ import annotations

__all__ = ["check_targets"]

from benchmarks.table import CaseResult


def _row(case: CaseResult, first_column_value: str) -> dict:
    key = case.columns[0]
    return next((r for r in case.rows if r.get(key) == first_column_value), {})


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def check_targets(cases: dict[str, CaseResult]) -> CaseResult | None:
    """A table of (target, measured, met) for the cases that ran; None when none of them ran."""
    rows = []

    def add(target: str, measured, met: bool | None) -> None:
        rows.append({"target": target, "measured": measured, "met": "n/a" if met is None else ("yes" if met else "NO")})

    if "minilm" in cases:
        ours = _row(cases["minilm"], "qcompile")
        cosine, speedup = _number(ours.get("mean cosine")), _number(ours.get("speedup"))
        add("MiniLM static W8A8: mean embedding cosine >= 0.995", cosine, None if cosine is None else cosine >= 0.995)
        add("MiniLM static W8A8: >= 2.0x fp32 speed (8x128 tokens)", speedup, None if speedup is None else speedup >= 2.0)
    for name, title in (("resnet18_cnn", "ResNet-18-shaped CNN"), ("mobilenetv2_cnn", "MobileNetV2-shaped CNN")):
        if name not in cases:
            continue
        case = cases[name]
        ours = _row(case, "qcompile")
        best_ort = max((_number(_row(case, label).get("SQNR dB")) or float("-inf")) for label in ("ORT u8", "ORT s8"))
        sqnr = _number(ours.get("SQNR dB"))
        if name == "resnet18_cnn":
            for batch in ("b1", "b8"):
                value = _number(ours.get(f"{batch} speedup"))
                add(f"{title}: >= 3.0x fp32 speed at batch {batch[1:]}", value, None if value is None else value >= 3.0)
        add(f"{title}: output SQNR >= ORT's best", f"{sqnr} vs {best_ort} dB", None if sqnr is None else sqnr >= best_ort)
    if "calibration" in cases:
        case = cases["calibration"]
        for method in ("minmax", "percentile", "entropy"):
            row = next((r for r in case.rows if r["measurement"].startswith(f"{method},")), {})
            ratio = _number(row.get("time ratio"))
            ort_seconds = row.get("ORT s")
            if ratio is None and isinstance(ort_seconds, str):
                add(f"calibration + quantization time <= 0.5x ORT's ({method})", f"ORT failed: {ort_seconds[:60]}", None)
            else:
                add(f"calibration + quantization time <= 0.5x ORT's ({method})", ratio, None if ratio is None else ratio <= 0.5)
        percentile = next((r for r in case.rows if r["measurement"].startswith("percentile,")), {})
        peak = _number(percentile.get("qcompile peak MB"))
        add("calibration peak RSS <= 1 GB (MiniLM percentile, 128 sentences)", peak, None if peak is None else peak <= 1024)
        growth = case.details.get("growth", {}).get("qcompile", {})
        peaks = [g.get("peak_rss_mb") for _, g in sorted(growth.items(), key=lambda kv: int(kv[0]))]
        if len(peaks) == 2 and all(isinstance(p, (int, float)) for p in peaks):
            ratio = peaks[1] / peaks[0]
            add(f"calibration peak RSS flat (+-10%) from {min(growth, key=int)} to {max(growth, key=int)} samples",
                round(ratio, 3), 0.9 <= ratio <= 1.1)
    if "depthwise_cnn" in cases:
        accuracy = cases["depthwise_cnn"].details.get("accuracy", {})
        if "fp32" in accuracy and "plain int8" in accuracy:
            loss = round(100 * (accuracy["fp32"] - accuracy["plain int8"]), 2)
            add("depthwise CNN (badly scaled channels): plain INT8 loses > 2 points of top-1", loss, loss > 2.0)
        recovered = [100 * (accuracy["fp32"] - accuracy[label]) for label in ("+CLE+BC", "+CLE+AdaRound") if label in accuracy]
        if "fp32" in accuracy and recovered:
            best = round(min(recovered), 2)
            add("depthwise CNN: CLE + bias correction or AdaRound within 0.5 points of fp32", best, best <= 0.5)
    if "smollm2" in cases:
        case = cases["smollm2"]
        for label, limit, what in (
            ("qcompile llm-int4 (b128)", 17.0, "SmolLM2 INT4 block 128: perplexity <= 17.0"),
            ("qcompile int4 b32", 15.5, "SmolLM2 INT4 block 32: perplexity <= 15.5"),
            ("qcompile llm-w8a8", 16.0, "SmolLM2 W8A8 static: perplexity <= 16.0"),
            ("qcompile llm-int8-weight", 14.62, "SmolLM2 INT8 weight-only: perplexity <= 14.62"),
        ):
            value = _number(_row(case, label).get("perplexity"))
            add(what, value, None if value is None else value <= limit)
        size = _number(_row(case, "qcompile llm-int4 (b128)").get("size % fp32"))
        add("SmolLM2 INT4 block 128: file <= 35% of fp32", size, None if size is None else size <= 35.0)
    for name, case in cases.items():
        size = _number(_row(case, "qcompile").get("size % fp32"))
        if size is not None:
            add(f"INT8 file size <= 25.5% of fp32 ({name})", size, size <= 25.5)
    if not rows:
        return None
    return CaseResult(name="targets", description="issue 3's and the LLM issue's targets against the tables below",
                      columns=["target", "measured", "met"], rows=rows)
