"""Every number about a dictionary: pure functions of tensors, the same in tests, training, sweeps and the CLI.

The scalar metrics take the original activations ``x [n, d]``, the reconstruction ``x_hat [n, d]``
and/or the per-latent firing frequency ``density [dict_size]`` (computed batch by batch, so that a
large dictionary never holds all its codes at once). :func:`evaluate` runs a dictionary over a split
and returns them all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import SAERegistryError

if TYPE_CHECKING:
    from ..model.sae import SparseAutoencoder


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


def l0(density: torch.Tensor) -> float:
    """Mean number of non-zero latents per row: the sum of the densities.

    Rounded to 1e-9 so that summation error never lifts a top-k dictionary's L0 above k.
    """
    return round(math.fsum(density.tolist()), 9)


def dead_fraction(density: torch.Tensor) -> float:
    """Fraction of latents that never fire on these rows."""
    return float((density == 0).double().mean())


def summary(x: torch.Tensor, x_hat: torch.Tensor, density: torch.Tensor) -> dict[str, float]:
    """Every scalar metric at once, named as they are logged everywhere (the dense definitions)."""
    return _scalars(mse(x, x_hat), fvu(x, x_hat), density)


def _scalars(mse_value: float, fvu_value: float, density: torch.Tensor) -> dict[str, float]:
    return {
        "mse": mse_value,
        "fvu": fvu_value,
        "explained_variance": 1.0 - fvu_value,
        "l0": l0(density),
        "dead_fraction": dead_fraction(density),
    }


class Evaluation(NamedTuple):
    """A dictionary's numbers on a split: the scalars, and the per-latent and per-token detail."""

    metrics: dict[str, float]  # see summary
    density: torch.Tensor  # [dict_size] firing frequency per latent
    l0_per_row: torch.Tensor  # [n] active latents per token


def fire_counts(indices: torch.Tensor, active: torch.Tensor, dict_size: int) -> torch.Tensor:
    """Per latent, how many rows fired it, from compact codes: ``indices``/``active`` ``[batch, k]``.

    A scatter-add, no dense ``[batch, dict_size]`` mask and nothing that waits for the device.
    """
    counts = torch.zeros(dict_size, device=indices.device)
    return counts.index_add_(0, indices.flatten(), active.flatten().float())


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4096) -> Evaluation:
    """Metrics of ``sae`` on raw activations: ``x [n, d]``, or batches of them (e.g. a split read from a
    store batch by batch with ``store.batches(..., shuffle=False)``), one batch in memory at a time.

    Only sums are kept across batches (in float64: the residual, the rows' sum and sum of squares,
    the firing counts), so that a split of any size is evaluated in the memory of one batch; the
    per-row L0 (4 bytes a row) is all that grows. top_k dictionaries are evaluated in their compact
    form (``encode_topk``/``decode_topk``): no dense ``[batch, dict_size]`` codes, no dense decoder product.
    """
    device = next(sae.parameters()).device
    dict_size = sae.cfg.dict_size
    fired = torch.zeros(dict_size, dtype=torch.float64)
    n, row_sum, square_sum, residual, l0s = 0, None, 0.0, 0.0, []
    for xb in x.split(batch_size) if isinstance(x, torch.Tensor) else x:
        xb = xb.to(device)
        if sae.rule.arch.fixed_k:
            values, indices = sae.encode_topk(xb)
            x_hat = sae.decode_topk(values, indices)
            active = values != 0  # abs_top_k's codes may be negative; top_k's are ReLU'd
            counts = fire_counts(indices, active, dict_size)
        else:
            h = sae.encode(xb)
            x_hat = sae.decode(h)
            active = h != 0
            counts = active.sum(0)
        fired += counts.cpu().double()
        l0s.append(active.sum(-1).to(torch.int32).cpu())
        x64 = xb.double()
        row_sum = x64.sum(0) if row_sum is None else row_sum + x64.sum(0)
        square_sum += float(x64.pow(2).sum())
        residual += float((x_hat.double() - x64).pow(2).sum())
        n += len(xb)
    if n == 0 or row_sum is None:
        raise SAERegistryError("nothing to evaluate: no rows (an empty split?)")
    density = fired / n
    total = square_sum - float(row_sum.pow(2).sum()) / n  # sum over rows of |x - mean|^2
    metrics = _scalars(residual / (n * row_sum.numel()), residual / max(total, 1e-30), density)
    return Evaluation(metrics, density, torch.cat(l0s))
