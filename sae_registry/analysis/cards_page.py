"""A feature-card page: the cards as one self-contained HTML file (inline CSS, no script, all text
escaped), which the MLflow UI's artifact viewer shows."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cards import Cards, Context

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.4em} h2{font-size:1.15em;margin:0 0 .3em} h3{font-size:.95em;margin:.8em 0 .3em;color:#555}
.meta{color:#555} .meta td{padding:0 1em 0 0}
nav a{display:inline-block;margin:0 .4em .2em 0;padding:0 .4em;border:1px solid #ccd;border-radius:3px;text-decoration:none}
.card{border:1px solid #dde;border-radius:6px;padding:.8em 1em;margin:1em 0;background:#fcfcff}
.stats span{margin-right:1.5em}
ol.contexts{padding-left:1.5em;margin:0} ol.contexts li{margin:.15em 0}
.act{display:inline-block;min-width:4.5em;color:#666;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap}
.tok{border-radius:2px}
mark.top{background:#f59e0b;color:#000;font-weight:bold;border-radius:2px;outline:1px solid #b45309}
.promoted code{background:#eef;padding:0 .3em;margin-right:.3em;border-radius:2px}
.none{color:#888;font-style:italic}
"""


# Frequency bands, as feature dashboards sort latents (log10 of the firing frequency): the most
# frequent latents alone are mostly punctuation and "the"; a sample from each band shows more.
BANDS = (("dense", 1e-1, ">= 10%"), ("common", 1e-3, "0.1-10%"), ("rare", 0.0, "< 0.1%"))  # name, lower bound, in words


def band_of(frequency: float) -> str:
    """The name of the :data:`BANDS` band of a firing frequency (> 0)."""
    return next(name for name, lo, _ in BANDS if frequency >= lo)


def _context_html(ctx: Context, peak: float) -> str:
    parts = []
    for i, (token, act) in enumerate(zip(ctx.tokens, ctx.activations)):
        text, tip = html.escape(token), f"{act:.3f}"
        if i == ctx.center:
            parts.append(f'<mark class="top" title="{tip}">{text}</mark>')
        elif act > 0:
            alpha = min(1.0, act / peak) * 0.6 if peak > 0 else 0.0
            parts.append(f'<span class="tok" style="background:rgba(245,158,11,{alpha:.2f})" title="{tip}">{text}</span>')
        else:
            parts.append(text)
    return "".join(parts)


def render_html(cards: Cards) -> str:
    """The cards as one self-contained HTML page (inline CSS, no script, all text escaped)."""
    e = html.escape
    info_rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in cards.info.items())
    nav = "".join(f'<a href="#f{c.feature}">{c.feature}</a>' for c in cards.cards)
    body = []
    for c in cards.cards:
        if c.contexts:
            items = "".join(f'<li><span class="act">{x.activation:.3f}</span> '
                            f'<span class="ctx">{_context_html(x, c.max_activation)}</span></li>' for x in c.contexts)
            contexts = f'<ol class="contexts">{items}</ol>'
        else:
            contexts = '<p class="none">never fires in this split</p>'
        if c.promoted:
            promoted = "".join(f'<code title="{v:.3f}">{e(t)}</code>' for t, v in c.promoted)
        else:
            promoted = f'<span class="none">{e(cards.unembedding_note or "no unembedding")}</span>'
        rate = f" (1 in {1 / c.frequency:,.0f} tokens)" if c.frequency > 0 else ""
        band = f", {band_of(c.frequency)}" if c.frequency > 0 else ""
        body.append(
            f'<section class="card" id="f{c.feature}" data-feature="{c.feature}">'
            f"<h2>Feature {c.feature}</h2>"
            f'<p class="stats"><span>frequency <b>{c.frequency:.4g}</b>{rate}{band}</span>'
            f"<span>mean activation when active <b>{c.mean_activation:.3g}</b></span>"
            f"<span>max <b>{c.max_activation:.3g}</b></span></p>"
            f"<h3>Top activating contexts</h3>{contexts}"
            f'<h3>Promoted tokens</h3><p class="promoted">{promoted}</p></section>'
        )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(cards.title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{e(cards.title)}</h1>"
        f'<table class="meta">{info_rows}</table><nav>{nav}</nav>{"".join(body)}</body></html>\n'
    )
