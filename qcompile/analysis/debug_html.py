"""The debug report as one self-contained HTML page: inline CSS and SVG drawn here, no scripts,
nothing fetched, so it opens offline and can be attached to an issue."""

from __future__ import annotations

__all__ = ["percent", "render_html"]

import html
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a renderer of the report (qcompile.analysis.debug_report): it imports nothing of it at run time
    from qcompile.analysis.debug_report import DebugReport, TensorError


def percent(value: float | None) -> str:
    """A fraction as the text table and the page print it: "-" when there is none."""
    return "-" if value is None else f"{100 * value:.3g}%"


ACCUMULATED, ISOLATED, GRID, WORST = "#1f6fb2", "#e07b00", "#c62828", "#c62828"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 24px auto; max-width: 1120px; padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #555; margin: 2px 0; } .note { color: #7a4b00; background: #fff6e5; padding: 6px 10px; border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; margin: 6px 0; }
.scroll { overflow-x: auto; }
th, td { padding: 3px 6px; border-bottom: 1px solid #e6e6e6; text-align: right; white-space: nowrap; }
th { background: #f3f5f8; font-weight: 600; white-space: normal; vertical-align: bottom; } td.l, th.l { text-align: left; }
td.name { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; max-width: 300px;
          overflow: hidden; text-overflow: ellipsis; }
tr:nth-child(even) td { background: #fafbfc; } .bad { color: #b00020; font-weight: 600; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; }
.card h3 { font-size: 13px; margin: 0 0 4px; font-family: ui-monospace, Menlo, Consolas, monospace;
           overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
svg { max-width: 100%; height: auto; display: block; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
dl { font-size: 13px; } dt { font-weight: 600; margin-top: 6px; } dd { margin-left: 16px; color: #444; }
details summary { cursor: pointer; color: #1f6fb2; margin: 8px 0; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.1f}"


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"{min(value):.4g} .. {max(value):.4g} ({len(value)})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _sqnr_plot(report: DebugReport, worst: set[str], width: int = 1080, height: int = 340) -> str:
    """Accumulated and isolated SQNR per tensor in graph order; the worst tensors ringed in red."""
    tensors = report.tensors
    left, right, top, bottom = 56, 16, 28, 44
    finite = [v for t in tensors for v in (t.accumulated_sqnr_db, t.isolated_sqnr_db) if v is not None and math.isfinite(v)]
    if not finite:
        return "<p>No finite SQNR to plot.</p>"
    low = min(0.0, math.floor(min(finite) / 10) * 10)
    high = math.ceil(max(finite) / 10) * 10 + 5
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(tensors)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(value: float) -> float:
        value = high if math.isinf(value) and value > 0 else max(low, min(high, value))
        return top + plot_h * (1 - (value - low) / (high - low))

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="SQNR per quantized tensor in graph order">'),
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fcfcfd" stroke="#ccc"/>']
    for tick in _ticks(low, high):
        ty = y(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{tick:g}</text>')
    step = max(1, n // 12)
    for i in range(0, n, step):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">quantized activation, in graph order</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">SQNR (dB)</text>')
    for attr, color in (("accumulated_sqnr_db", ACCUMULATED), ("isolated_sqnr_db", ISOLATED)):
        points = [(x(i), y(getattr(t, attr))) for i, t in enumerate(tensors) if getattr(t, attr) is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        radius = 3 if n <= 400 else 0
        for i, t in enumerate(tensors):
            value = getattr(t, attr)
            if value is None or not radius:
                continue
            label = f"#{i} {t.tensor} ({t.consumer_summary}): {attr.split('_')[0]} {_db(value)} dB"
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(value):.1f}" r="{radius}" fill="{color}"><title>{_e(label)}</title></circle>')
    for i, t in enumerate(tensors):
        if t.tensor in worst and t.isolated_sqnr_db is not None:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(t.isolated_sqnr_db):.1f}" r="7" fill="none" '
                         f'stroke="{WORST}" stroke-width="1.5"><title>{_e(t.tensor)}</title></circle>')
    legend_x = left + 10
    for k, (label, color) in enumerate((("accumulated (quantized model vs float)", ACCUMULATED),
                                         ("isolated (only this tensor rounded)", ISOLATED))):
        lx = legend_x + k * 300
        parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{top - 12}" y2="{top - 12}" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{lx + 28}" y="{top - 8}">{label}</text>')
    lx = legend_x + 600
    parts.append(f'<circle cx="{lx + 8}" cy="{top - 12}" r="6" fill="none" stroke="{WORST}" stroke-width="1.5"/>')
    parts.append(f'<text x="{lx + 20}" y="{top - 8}">the {len(worst)} worst by isolated SQNR</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram_plot(t: TensorError, width: int = 520, height: int = 190) -> str:
    """The float values' histogram (log counts) with the quantization grid's range shaded."""
    hist = t.histogram
    if not hist:
        return "<p>No values.</p>"
    counts, start, stop = hist["counts"], hist["start"], hist["stop"]
    left, right, top, bottom = 44, 10, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(math.log10(c + 1) for c in counts) or 1.0

    def x(value: float) -> float:
        return left + plot_w * (value - start) / (stop - start)

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="histogram of {_e(t.tensor)}">'),
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fcfcfd" stroke="#ccc"/>']
    if t.grid_min is not None:
        gx0, gx1 = x(t.grid_min), x(t.grid_max)
        parts.append(f'<rect x="{gx0:.1f}" y="{top}" width="{max(gx1 - gx0, 1):.1f}" height="{plot_h}" fill="#e8f5e9"/>')
    bar_w = plot_w / len(counts)
    for i, count in enumerate(counts):
        if not count:
            continue
        h = plot_h * math.log10(count + 1) / peak
        parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 0.5, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="{ACCUMULATED}"><title>{count} values</title></rect>')
    if t.grid_min is not None:
        # The labels sit on two lines, so they cannot overlap when the range is narrow.
        for edge, label, anchor, line in ((t.grid_min, "grid min", "start", 1), (t.grid_max, "grid max", "end", 2)):
            ex = x(edge)
            parts.append(f'<line x1="{ex:.1f}" x2="{ex:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{GRID}" '
                         'stroke-width="1.5" stroke-dasharray="4 3"/>')
            parts.append(f'<text x="{ex + (3 if anchor == "start" else -3):.1f}" y="{top + 12 * line}" '
                         f'text-anchor="{anchor}" fill="{GRID}">{label} {edge:.3g}</text>')
    for tick in _ticks(start, stop, 5):
        tx = x(tick)
        parts.append(f'<text x="{tx:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">float value '
                 '(bars: log count; green: representable range)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tensor_rows(tensors, rank: bool) -> str:
    rows = []
    for number, t in enumerate(tensors, 1):
        low = t.isolated_sqnr_db is not None and t.isolated_sqnr_db < 20
        rows.append(
            "<tr>" + (f"<td>{number}</td>" if rank else "") + f"<td>{t.index}</td>"
            f'<td class="name" title="{_e(t.tensor)}">{_e(t.tensor)}</td>'
            f'<td class="l">{_e(t.producer_op)}</td><td class="l">{_e(t.consumer_summary)}</td>'
            f'<td class="{"bad" if low else ""}">{_db(t.isolated_sqnr_db)}</td><td>{_db(t.accumulated_sqnr_db)}</td>'
            f"<td>{percent(t.clipped_fraction)}</td><td>{percent(t.outlier_fraction)}</td>"
            f"<td>{_num(t.min)} .. {_num(t.max)}</td><td>{_num(t.scale)}</td><td>{_num(t.zero_point)}</td>"
            f"<td>{_num(t.grid_steps_used)}</td></tr>"
        )
    header = ("<tr>" + ("<th>rank</th>" if rank else "") + '<th>#</th><th class="l">tensor</th><th class="l">made by</th>'
              '<th class="l">read by</th><th>isolated dB</th><th>accum. dB</th><th>clipped</th><th>outliers</th>'
              "<th>float range</th><th>scale</th><th>zp</th><th>steps used</th></tr>")
    return f"<div class=\"scroll\"><table>{header}{''.join(rows)}</table></div>"


def _weight_rows(weights) -> str:
    rows = []
    for number, w in enumerate(weights, 1):
        original = f"{w.float_name} ({w.match})" if w.float_name else "not found"
        rows.append(
            f'<tr><td>{number}</td><td class="name" title="{_e(w.name)}">{_e(w.name)}</td><td class="l">{_e(w.kind)}</td>'
            f'<td class="l">{_e(", ".join(sorted(set(w.consumer_ops))))}</td><td>{_e("x".join(map(str, w.shape)))}</td>'
            f'<td class="name" title="{_e(original)}">{_e(original)}</td><td>{_e(w.qtype)}</td><td>{_db(w.sqnr_db)}</td>'
            f"<td>{_db(w.worst_channel_sqnr_db)}</td><td>{_num(w.worst_channel)} of {w.channels}</td>"
            f"<td>{_db(w.mean_channel_sqnr_db)}</td></tr>"
        )
    header = ('<tr><th>rank</th><th class="l">weight</th><th class="l">kind</th><th class="l">read by</th><th>shape</th>'
              '<th class="l">float original</th><th>type</th><th>tensor dB</th><th>worst ch. dB</th><th>worst channel</th>'
              "<th>mean ch. dB</th></tr>")
    return f"<div class=\"scroll\"><table>{header}{''.join(rows)}</table></div>"


def render_html(report: DebugReport, definitions: dict[str, str], *, top: int = 20, histograms: int = 6) -> str:
    """The whole page: summary, SQNR along the graph, worst tensors, their histograms, weights,
    and ``definitions`` (what each column means) at the end."""
    worst = report.worst(top)
    ringed = {t.tensor for t in worst[:5]}
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           f"<title>qcompile debug: {_e(report.quant_model)}</title><style>{_CSS}</style></head><body>",
           "<h1>qcompile per-layer error report</h1>",
           f'<p class="meta">float model <b>{_e(report.float_model)}</b> &middot; quantized model <b>{_e(report.quant_model)}</b></p>',
           (f'<p class="meta">data: {_e(report.data)} &middot; {report.batches} batches &middot; '
           f"{len(report.tensors)} quantized activations, {len(report.weights)} quantized constants &middot; "
           f"{report.run.get('seconds', 0):.1f} s; tensors analysed in groups of at most "
           f"{report.run.get('group_size', 0)} per session</p>")]
    if report.outputs:
        out.append('<table style="width:auto"><tr><th class="l">graph output</th><th>SQNR vs float (dB)</th>'
                   "<th>cosine</th><th>max abs error</th></tr>")
        for name, metrics in report.outputs.items():
            out.append(f'<tr><td class="name">{_e(name)}</td><td>{_db(metrics.get("sqnr_db"))}</td>'
                       f'<td>{metrics.get("cosine")}</td><td>{metrics.get("max_abs_error")}</td></tr>')
        out.append("</table>")
    check = report.reference.get("outputs_vs_float", {})
    if check:
        text = ", ".join(f"{_e(k)} {_db(v.get('sqnr_db'))} dB" for k, v in check.items())
        out.append(f'<p class="meta">Float reference (the quantized graph with its quantization undone) against the float '
                   f"model, first batch: {text}. Rescaled weights matched: {report.reference.get('weights_rescaled', 0)}.</p>")
    for note in report.reference.get("notes", []):
        out.append(f'<p class="note">{_e(note)}</p>')

    out.append("<h2>SQNR along the graph</h2>")
    out.append(_sqnr_plot(report, ringed))
    out.append(f"<h2>Worst {len(worst)} activations (by isolated SQNR)</h2>")
    out.append(_tensor_rows(worst, rank=True))

    shown = worst[:histograms]
    if shown:
        out.append(f"<h2>Float values of the worst {len(shown)} activations</h2><div class=\"grid\">")
        for t in shown:
            out.append(f'<div class="card"><h3 title="{_e(t.tensor)}">{_e(t.tensor)}</h3>'
                       f'<div class="meta">isolated {_db(t.isolated_sqnr_db)} dB, accumulated {_db(t.accumulated_sqnr_db)} dB, '
                       f"clipped {percent(t.clipped_fraction)}, scale {_num(t.scale)}</div>{_histogram_plot(t)}</div>")
        out.append("</div>")

    weights = report.worst_weights(top)
    if weights:
        out.append(f"<h2>Weights: worst {len(weights)} by worst output channel</h2>")
        out.append(_weight_rows(weights))

    out.append(f"<details><summary>All {len(report.tensors)} quantized activations in graph order</summary>")
    out.append(_tensor_rows(report.tensors, rank=False))
    out.append("</details>")
    out.append("<h2>Definitions</h2><dl>")
    for key, text in definitions.items():
        out.append(f"<dt>{_e(key)}</dt><dd>{_e(text)}</dd>")
    out.append(f"<dt>simulation</dt><dd>{_e(report.run.get('simulation', ''))}</dd></dl>")
    out.append("</body></html>\n")
    return "\n".join(out)
