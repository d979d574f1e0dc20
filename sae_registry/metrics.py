"""Evaluation metrics: pure functions of tensors, the same in tests, training, sweeps and the CLI.

All take the original activations ``x [n, d]``, the reconstruction ``x_hat [n, d]`` and/or the
codes ``h [n, dict_size]`` (dense; zeros where a latent is off).
"""

from __future__ import annotations

import math

import torch


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error over every element."""
    return float((x_hat - x).pow(2).mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``sum((x - x_hat)^2) / sum((x - mean(x))^2)``.

    0 is perfect, 1 is no better than predicting the mean activation.
    """
    residual = (x_hat - x).double().pow(2).sum()
    total = (x - x.mean(0)).double().pow(2).sum()
    return float(residual / total.clamp_min(1e-30))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - FVU``."""
    return 1.0 - fvu(x, x_hat)


def feature_density(h: torch.Tensor) -> torch.Tensor:
    """Per latent, the fraction of rows on which it fires: ``[dict_size]``."""
    return (h != 0).double().mean(0)


def l0(h: torch.Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float(feature_density(h).sum())


def dead_fraction(h: torch.Tensor) -> float:
    """Fraction of latents that never fire on these rows."""
    return float((feature_density(h) == 0).double().mean())


def summary(x: torch.Tensor, x_hat: torch.Tensor, density: torch.Tensor) -> dict[str, float]:
    """Every scalar metric at once, named as they are logged everywhere.

    Takes the feature density (``feature_density(h)``, or the same computed batch by batch)
    rather than the codes, so that evaluating a large dictionary never holds all codes at once.
    The mean number of non-zeros per row (L0) is the sum of the densities, rounded to 1e-9 so
    that summation error never lifts a top-k dictionary's L0 above k.
    """
    unexplained = fvu(x, x_hat)
    return {
        "mse": mse(x, x_hat),
        "fvu": unexplained,
        "explained_variance": 1.0 - unexplained,
        "l0": round(math.fsum(density.tolist()), 9),
        "dead_fraction": float((density == 0).double().mean()),
    }
