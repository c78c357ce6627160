"""The dashboard's plots as inline SVG, made on the server: numbers in, escaped markup out (pure).

No charting library and no script: an ``<svg>`` in the page, so it renders with scripts off,
under the page's Content-Security-Policy, and on a closed network. Every label is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

COLORS = ("#2b6cb0", "#38a169", "#d69e2e", "#805ad5", "#dd6b20", "#319795", "#718096")
W, H, PAD = 560, 200, 36


def _time_label(t: float) -> str:
    return time.strftime("%m-%d %H:%M", time.gmtime(t))


def versions_over_time(history: Sequence[tuple[float, dict[str, int]]], top: int = 6) -> str:
    """One line per version (the ``top`` most common at the end; the others summed as "other")."""
    if not history:
        return '<p class="muted">No deployment has succeeded yet: nothing to plot.</p>'
    last = history[-1][1]
    names = sorted(last, key=lambda v: (-last[v], v))[:top]
    for _, counts in history:  # versions that were common earlier but are gone now
        for v in sorted(counts, key=lambda v: -counts[v]):
            if len(names) < top and v not in names:
                names.append(v)
    series = {v: [c.get(v, 0) for _, c in history] for v in names}
    rest = [sum(n for v, n in c.items() if v not in names) for _, c in history]
    if any(rest):
        series["other"] = rest
    peak = max(max(s) for s in series.values()) or 1
    t0, t1 = history[0][0], history[-1][0]
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return PAD + (W - 2 * PAD) * (t - t0) / span

    def y(n: int) -> float:
        return H - PAD - (H - 2 * PAD) * n / peak

    parts = [f'<svg class="plot" viewBox="0 0 {W} {H + 20 * ((len(series) + 2) // 3)}" role="img" '
             'aria-label="devices by version over time" xmlns="http://www.w3.org/2000/svg">',
             _axes(peak, _time_label(t0), _time_label(t1))]
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{x(t):.1f},{y(n):.1f}" for (t, _), n in zip(history, values, strict=True))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}">'
                     f"<title>{escape(name)}: {values[-1]} now</title></polyline>")
        lx, ly = PAD + (i % 3) * 170, H + 4 + 20 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="{ly + 11}">{escape(name[:24])} ({values[-1]})</text>')
    parts.append("</svg>")
    return "".join(parts)


def success_by_wave(waves: Sequence[tuple[int, int, int, int]]) -> str:
    """One bar per wave, ``(wave, size, succeeded, failed)``: the share that succeeded (green)
    and failed (red) of the wave's devices; the label is the success rate of those finished."""
    if not waves:
        return '<p class="muted">This rollout has no waves.</p>'
    n = len(waves)
    slot = (W - 2 * PAD) / n
    bar = min(48.0, slot * 0.7)
    parts = [f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-label="success rate by wave" '
             'xmlns="http://www.w3.org/2000/svg">', _axes(100, "", "", unit="%")]
    for i, (wave, size, ok, failed) in enumerate(waves):
        x = PAD + slot * i + (slot - bar) / 2
        full = H - 2 * PAD
        ok_h = full * ok / size if size else 0.0
        bad_h = full * failed / size if size else 0.0
        finished = ok + failed
        rate = f"{100 * ok / finished:.0f}%" if finished else "-"
        parts.append(f'<rect class="ok" x="{x:.1f}" y="{H - PAD - ok_h:.1f}" width="{bar:.1f}" '
                     f'height="{ok_h:.1f}" fill="#38a169"><title>wave {wave}: {ok} of {size} '
                     "succeeded</title></rect>")
        parts.append(f'<rect class="bad" x="{x:.1f}" y="{H - PAD - ok_h - bad_h:.1f}" width="{bar:.1f}" '
                     f'height="{bad_h:.1f}" fill="#e53e3e"><title>wave {wave}: {failed} of {size} '
                     "failed</title></rect>")
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{H - PAD + 14}" text-anchor="middle">w{wave}</text>'
                     f'<text x="{x + bar / 2:.1f}" y="{H - PAD - ok_h - bad_h - 4:.1f}" '
                     f'text-anchor="middle">{rate}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axes(peak: int, left: str, right: str, unit: str = "") -> str:
    return (f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#999"/>'
            f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{peak}{unit}</text>'
            f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end">0</text>'
            f'<text x="{PAD}" y="{H - PAD + 14}">{escape(left)}</text>'
            f'<text x="{W - PAD}" y="{H - PAD + 14}" text-anchor="end">{escape(right)}</text>')
