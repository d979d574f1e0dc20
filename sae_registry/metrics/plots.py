"""Figures a person would rather look at than read: training curves, feature density, L0.

Pure functions from numbers to matplotlib figures. They use the object-oriented ``Figure`` API,
which needs no backend and no pyplot state: nothing to switch, nothing to close. matplotlib (0.8 s
to import) is imported inside the functions, when a plot is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _subplots(ncols: int = 1, figsize: tuple[float, float] = (6, 3.8)):
    from matplotlib.figure import Figure  # heavy (0.8 s): imported where a plot is made

    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _margins(fig: Figure) -> None:
    """Fixed margins that fit these figures' labels: ``tight_layout`` measured every label first, which
    took as long as drawing the figure (a sweep draws three per dictionary)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.35 / height,
                        wspace=1.0 / (width / len(fig.axes)))


def training_curves(history: list[dict]) -> Figure:
    """Training loss and held-out FVU against tokens seen."""
    from matplotlib import ticker

    tokens = [h["tokens"] for h in history]
    fig, (ax_loss, ax_fvu) = _subplots(2, figsize=(10, 3.8))
    ax_loss.plot(tokens, [h["train/loss"] for h in history], label="loss")
    ax_loss.plot(tokens, [h["train/mse"] for h in history], label="MSE (scaled inputs)")
    ax_loss.set(xlabel="tokens", ylabel="training loss", yscale="log", title="Training loss")
    ax_loss.legend()
    ax_fvu.plot(tokens, [h["eval/fvu"] for h in history], color="C2")
    ax_fvu.set(xlabel="tokens", ylabel="FVU", title="Held-out fraction of variance unexplained")
    for ax in (ax_loss, ax_fvu):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 40k, not 40000: labels stay apart
    _margins(fig)
    return fig


def density_histogram(density: torch.Tensor) -> Figure:
    """Histogram of log10 firing frequency per latent; dead latents counted in the title."""
    frequency = np.asarray(density, dtype=np.float64)
    alive = frequency[frequency > 0]
    fig, ax = _subplots(figsize=(6, 3.8))
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="C0")
    ax.set(
        xlabel="log10(activation frequency)",
        ylabel="latents",
        title=f"Feature density ({len(density) - len(alive)} of {len(density)} latents dead)",
    )
    ax.grid(alpha=0.3)
    _margins(fig)
    return fig


def l0_histogram(l0_per_row: torch.Tensor) -> Figure:
    """Distribution of the number of active latents per token."""
    l0 = np.asarray(l0_per_row, dtype=np.int64)
    fig, ax = _subplots(figsize=(6, 3.8))
    ax.hist(l0, bins=np.arange(l0.min(), l0.max() + 2) - 0.5 if l0.max() - l0.min() < 100 else 50, color="C1")
    ax.set(xlabel="active latents per token (L0)", ylabel="tokens", title=f"L0 distribution (mean {l0.mean():.1f})")
    ax.grid(alpha=0.3)
    _margins(fig)
    return fig


def frontier(rows: list[dict]) -> Figure:
    """A sweep: FVU against L0, one series per dict_size (per rule and dict_size when the sweep has
    several rules), frontier points joined by a line; with downstream fidelities (loss recovered for
    a causal LM), a second panel of fidelity against L0."""
    from matplotlib import ticker

    def measured(r: dict) -> bool:
        return r.get("fidelity") is not None and bool(np.isfinite(r["fidelity"]))

    fidelity = any(measured(r) for r in rows)
    fig, axes = _subplots(2 if fidelity else 1, figsize=(12 if fidelity else 7, 4.5))
    axes = list(np.atleast_1d(axes))
    rules = sorted({r.get("sparsity", "") for r in rows})
    series = sorted({(r.get("sparsity", ""), r["dict_size"]) for r in rows}, key=lambda s: (s[1], s[0]))
    for i, (rule, size) in enumerate(series):
        mine = [r for r in rows if (r.get("sparsity", ""), r["dict_size"]) == (rule, size)]
        color, label = f"C{i % 10}", (f"{rule} " if len(rules) > 1 else "") + f"dict_size {size}"
        axes[0].scatter([r["l0"] for r in mine], [r["fvu"] for r in mine], color=color, alpha=0.5)
        front = sorted((r for r in mine if r.get("frontier")), key=lambda r: r["l0"])
        axes[0].plot([r["l0"] for r in front], [r["fvu"] for r in front], "o-", color=color, label=label)
        if fidelity:
            mine = sorted(filter(measured, mine), key=lambda r: r["l0"])
            axes[1].plot([r["l0"] for r in mine], [r["fidelity"] for r in mine], "o-", color=color, label=label)
    axes[0].set(ylabel="FVU", title="Sweep: FVU vs L0 frontier")
    if fidelity:
        axes[1].set(ylabel="downstream fidelity (loss recovered for a causal LM)", title="Downstream fidelity vs L0")
    for ax in axes:
        ax.set_xscale("log", base=2)  # L0 budgets (k) are usually powers of two
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.set(xlabel="L0 (active latents per token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return fig
