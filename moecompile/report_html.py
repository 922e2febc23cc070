"""The pass log as one self-contained HTML page: `moecompile inspect report.json --html report.html`.

Place in the pipeline: a reader of the Report (passes/log.py), beside Report.table(). The page holds every block
with its decision, reason or description, errors and export form; for routing rewrites, the measured effect per
layer; and, where the report carries routing statistics (`moecompile stats --report`), the figures ReMoE users read:
active experts per token by layer (mean, 5th-95th percentile), the ReLU threshold by layer, and expert load (share
of (token, expert) pairs against uniform). Plots are inline SVG drawn here; no script, font or style from elsewhere.
A small inline script checks the layout as the browser lays it out (no element wider than the page) and records the
result on the body (`data-layout`), which tests/test_report_html.py reads from headless Chromium.
"""

from __future__ import annotations

import html
from pathlib import Path

from .passes.log import Report

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; padding: 0 16px; color: #1d1d1f; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 7px; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: #f4f4f6; }
.fused { color: #0a7d32; font-weight: 600; } .left { color: #b3261e; font-weight: 600; }
.num { font-variant-numeric: tabular-nums; } .note { color: #555; } svg { max-width: 100%; height: auto; }
.figure { margin: 12px 0 20px; }
"""

LAYOUT_CHECK = """
window.addEventListener("load", () => {
  const page = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > page + 1);
  document.body.dataset.layout = wide.length ? "overflow:" + wide.slice(0, 3).map(e => e.tagName).join(",") : "ok";
});
"""


def _e(text) -> str:
    return html.escape(str(text))


def _num(value, fmt=".2e") -> str:
    return "-" if value is None else format(value, fmt)


def _blocks(rep: Report) -> str:
    rows = []
    for b in rep.blocks:
        what = b.summary
        rows.append(f"<tr><td>{_e(b.path or '<root>')}</td><td>{_e(b.module_type)}</td>"
                    f"<td class='{_e(b.decision)}'>{_e(b.decision)}</td><td>{_e(what)}</td>"
                    f"<td class='num'>{_num(b.max_abs_error)} / {_num(b.rel_error)}</td>"
                    f"<td class='num'>{_num(b.native_mean_rel_error)}</td><td>{_e(b.export or '-')}</td></tr>")
    return ("<table><colgroup><col style='width:14%'><col style='width:10%'><col style='width:7%'>"
            "<col style='width:39%'><col style='width:11%'><col style='width:7%'><col style='width:12%'></colgroup>"
            "<tr><th>block</th><th>type</th><th>decision</th><th>description, or why it was left</th>"
            "<th>max abs / rel error (fp32)</th><th>mean rel error (own dtype)</th><th>ONNX form</th></tr>"
            + "".join(rows) + "</table>")


def _rewrites(rep: Report) -> str:
    changed = [b for b in rep.blocks if b.routing_change]
    if not changed:
        return ""
    rows = "".join(f"<tr><td>{_e(b.path or '<root>')}</td><td>{_e(b.routing_summary)}</td></tr>" for b in changed)
    layers = [(b.path or "<root>", b.routing_change) for b in changed]
    active = [(p, c.get("mean_active"), c.get("active_p5"), c.get("active_p95"), c.get("k_before"))
              for p, c in layers if c.get("mean_active") is not None]
    thresholds = [(p, c.get("threshold")) for p, c in layers if c.get("threshold") is not None]
    figures = ""
    if active:
        figures += _figure("Active experts per token by layer (mean, 5th-95th percentile; dashed: k before)",
                           _ranges(active))
    if thresholds:
        figures += _figure("ReLU threshold by layer (folded into the router bias)", _bars(thresholds))
    return (f"<h2>Routing rewrites (measured on the calibration tokens)</h2><table><tr><th style='width:25%'>block"
            f"</th><th>effect</th></tr>{rows}</table>{figures}")


def _stats(rep: Report) -> str:
    if not rep.layer_stats:
        return ""
    active = [(s["path"], s["mean_active"], s["active_p5"], s["active_p95"], None) for s in rep.layer_stats]
    rows = "".join(f"<tr><td>{_e(s['path'])}</td><td>{_e(s['routing'])}</td><td class='num'>{s['tokens']}</td>"
                   f"<td class='num'>{s['mean_active']:.2f}</td>"
                   f"<td class='num'>{_load_range(s['expert_load'])}</td></tr>" for s in rep.layer_stats)
    return ("<h2>Routing statistics</h2><table><tr><th style='width:25%'>layer</th><th>routing</th><th>tokens</th>"
            "<th>active experts / token</th><th>load min / max (x uniform)</th></tr>" + rows + "</table>"
            + _figure("Active experts per token by layer (mean, 5th-95th percentile)", _ranges(active))
            + _figure("Expert load by layer (share of (token, expert) pairs over uniform; white 0, black 2x or more)",
                      _heatmap([(s["path"], s["expert_load"]) for s in rep.layer_stats])))


def _load_range(load: list[float]) -> str:
    return f"{min(load) * len(load):.2f} / {max(load) * len(load):.2f}" if load else "-"


def _figure(title: str, svg: str) -> str:
    return f"<div class='figure'><div class='note'>{_e(title)}</div>{svg}</div>"


def _label_width(labels) -> int:
    return min(320, 10 + 7 * max(len(str(x)) for x in labels))


def _ranges(rows) -> str:
    """One row per layer: a bar from p5 to p95, a dot at the mean, a dashed tick at the target."""
    top = max(max(r[3] or 0, r[1] or 0, r[4] or 0) for r in rows) or 1.0
    lw, width, row_h = _label_width(r[0] for r in rows), 760, 22
    scale = (width - lw - 60) / top
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{row_h * len(rows) + 30}' "
             f"role='img' class='ranges'>"]
    for i, (label, mean, p5, p95, target) in enumerate(rows):
        y = 10 + i * row_h
        parts.append(f"<text x='0' y='{y + 12}' font-size='11'>{_e(label)[-45:]}</text>")
        low, high = (p5 or 0) * scale, (p95 or 0) * scale
        parts.append(f"<rect x='{lw + low:.1f}' y='{y + 4}' width='{max(1.0, high - low):.1f}' height='10' "
                     "fill='#9ec5fe'/>")
        parts.append(f"<circle cx='{lw + mean * scale:.1f}' cy='{y + 9}' r='4' fill='#0b57d0'/>")
        if target is not None:
            parts.append(f"<line x1='{lw + target * scale:.1f}' x2='{lw + target * scale:.1f}' y1='{y + 1}' "
                         f"y2='{y + 17}' stroke='#b3261e' stroke-dasharray='3,2'/>")
        parts.append(f"<text x='{lw + top * scale + 8:.1f}' y='{y + 12}' font-size='11'>{mean:.2f}</text>")
    y = 10 + len(rows) * row_h
    parts.append(f"<line x1='{lw}' x2='{lw + top * scale:.1f}' y1='{y}' y2='{y}' stroke='#888'/>"
                 f"<text x='{lw}' y='{y + 14}' font-size='10'>0</text>"
                 f"<text x='{lw + top * scale - 20:.1f}' y='{y + 14}' font-size='10'>{top:.1f}</text></svg>")
    return "".join(parts)


def _bars(rows) -> str:
    low, high = min(0.0, *(v for _, v in rows)), max(0.0, *(v for _, v in rows))
    span = (high - low) or 1.0
    lw, width, row_h = _label_width(r[0] for r in rows), 760, 20
    scale = (width - lw - 70) / span
    zero = lw + (0 - low) * scale
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{row_h * len(rows) + 12}' "
             "role='img' class='bars'>"]
    for i, (label, value) in enumerate(rows):
        y = 6 + i * row_h
        x0, x1 = sorted((zero, zero + value * scale))
        parts.append(f"<text x='0' y='{y + 11}' font-size='11'>{_e(label)[-45:]}</text>"
                     f"<rect x='{x0:.1f}' y='{y + 3}' width='{max(1.0, x1 - x0):.1f}' height='10' fill='#7fb77e'/>"
                     f"<text x='{width - 62}' y='{y + 11}' font-size='11'>{value:+.3g}</text>")
    parts.append(f"<line x1='{zero:.1f}' x2='{zero:.1f}' y1='0' y2='{row_h * len(rows) + 6}' stroke='#888'/></svg>")
    return "".join(parts)


def _heatmap(rows) -> str:
    lw = _label_width(r[0] for r in rows)
    experts = max(len(load) for _, load in rows)
    cell = max(3, min(18, (760 - lw) // max(experts, 1)))
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{lw + cell * experts + 4}' "
             f"height='{(cell + 2) * len(rows) + 4}' role='img' class='heatmap'>"]
    for i, (label, load) in enumerate(rows):
        y = 2 + i * (cell + 2)
        parts.append(f"<text x='0' y='{y + cell - 2}' font-size='11'>{_e(label)[-45:]}</text>")
        for e, share in enumerate(load):
            shade = 255 - int(255 * min(1.0, share * len(load) / 2))
            parts.append(f"<rect x='{lw + e * cell}' y='{y}' width='{cell - 1}' height='{cell}' "
                         f"fill='rgb({shade},{shade},{shade})'><title>expert {e}: {share * len(load):.2f}x uniform"
                         "</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def render(rep: Report) -> str:
    """The page for `rep`, as one string."""
    passes = "".join(f"<tr><td>{_e(p.name)}</td><td class='num'>{p.seconds:.2f}</td><td>{_e(p.note)}</td></tr>"
                     for p in rep.passes)
    options = ", ".join(f"{k}={v}" for k, v in rep.options.items()) or "defaults"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>moecompile pass log: {_e(rep.model_type)}</title><style>{STYLE}</style></head><body>"
            f"<h1>moecompile: {_e(rep.model_type)}</h1>"
            f"<p><b>{len(rep.fused)} of {len(rep.blocks)}</b> MoE blocks fused. Options: {_e(options)}.</p>"
            + (f"<p class='note'>{_e(rep.message)}</p>" if rep.message else "")
            + "<h2>Blocks</h2>" + _blocks(rep) + _rewrites(rep) + _stats(rep)
            + ("<h2>Passes</h2><table><tr><th style='width:25%'>pass</th><th style='width:10%'>seconds</th>"
               f"<th>note</th></tr>{passes}</table>" if passes else "")
            + f"<script>{LAYOUT_CHECK}</script></body></html>")


def write(rep: Report, path: str | Path) -> Path:
    """Write the page to `path` (through a temporary file beside it: never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(rep), encoding="utf-8")
    tmp.replace(path)
    return path
