"""Inline SVG charts for the report: no scripts, no fonts or files to fetch.

Both charts share the unit square's x axis (ITM probability or threshold from 0 to 1) and mark the
threshold the run used.
"""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

WIDTH, HEIGHT = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 28, 36
COLORS = {"web": "#2f6fbf", "synthetic": "#e07b28", "all": "#444444"}


def _x(value: float) -> float:
    return LEFT + value * (WIDTH - LEFT - RIGHT)


def _y(value: float, top: float) -> float:
    return HEIGHT - BOTTOM - (value / top if top else 0.0) * (HEIGHT - TOP - BOTTOM)


def _frame(label_x: str, top: float, y_format: str, threshold: float | None, series: Sequence[str]) -> list[str]:
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" class="plot"/>']
    for i in range(11):
        x = _x(i / 10)
        parts.append(f'<line x1="{x:.1f}" y1="{HEIGHT - BOTTOM}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM + 4}" class="axis"/>')
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" class="tick" text-anchor="middle">{i / 10:.1f}</text>')
    for i in range(5):
        value = top * i / 4
        y = _y(value, top)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{y_format.format(value)}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" class="label" text-anchor="middle">'
                 f'{escape(label_x)}</text>')
    if threshold is not None:
        x = _x(threshold)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" class="threshold"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="{TOP + 12}" class="tick">threshold {threshold:g}</text>')
    x = LEFT
    for name in series:
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{COLORS.get(name, "#888")}"/>')
        parts.append(f'<text x="{x + 14}" y="17" class="tick">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return parts


def _svg(parts: list[str], title: str, css_class: str) -> str:
    return (f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
            + "".join(parts) + "</svg>")


def histogram_svg(scores: dict[str, np.ndarray], bins: int, threshold: float | None) -> str:
    """Side-by-side bars per bin: each source's share of its own texts, so sizes compare fairly."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    shares, counts = {}, {}
    for name, values in scores.items():
        counts[name] = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)[0]
        shares[name] = counts[name] / max(values.size, 1)
    top = max([float(s.max()) for s in shares.values() if s.size] + [0.0])
    top = max(np.ceil(top * 10) / 10, 0.1)
    parts = _frame("ITM match probability", top, "{:.0%}", threshold, list(scores))
    slot = (WIDTH - LEFT - RIGHT) / bins
    bar = slot * 0.8 / max(len(scores), 1)
    for b in range(bins):
        for s, name in enumerate(scores):
            share = float(shares[name][b])
            if share == 0:
                continue
            x, y = _x(edges[b]) + slot * 0.1 + s * bar, _y(share, top)
            parts.append(f'<rect class="bar {escape(name)}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                         f'height="{HEIGHT - BOTTOM - y:.1f}" fill="{COLORS.get(name, "#888")}">'
                         f'<title>{escape(name)} {edges[b]:.2f}-{edges[b + 1]:.2f}: {int(counts[name][b]):,} texts '
                         f'({share:.1%})</title></rect>')
    if not any(v.size for v in scores.values()):
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="label" text-anchor="middle">no scored texts</text>')
    return _svg(parts, "ITM probability histogram, web versus synthetic texts", "histogram")


def kept_fraction_svg(thresholds: np.ndarray, fractions: dict[str, list[float | None]], threshold: float | None) -> str:
    """Fraction of scored texts kept (score >= t) as the threshold t varies, one line per source."""
    parts = _frame("threshold", 1.0, "{:.0%}", threshold, list(fractions))
    for name, values in fractions.items():
        points = [f"{_x(t):.1f},{_y(v, 1.0):.1f}" for t, v in zip(thresholds, values) if v is not None]
        if points:
            parts.append(f'<polyline class="line {escape(name)}" fill="none" stroke="{COLORS.get(name, "#888")}" '
                         f'stroke-width="2" points="{" ".join(points)}"/>')
    return _svg(parts, "kept fraction versus threshold", "kept-fraction")
