"""The sparse step of a top-k dictionary: custom autograd functions whose backward touches only the
selected latents.

A top-k forward pass picks ``m`` latents per row; plain autograd would still differentiate the
dense ``[batch, dict_size]`` encoder product and decode. These functions take the selected
``(values, indices)`` and compute every gradient at the pattern only, O(batch * m * d) each. The
model (:mod:`sae_registry.sae`) decides what is selected; this module only differentiates it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor, without torch's "beta state" notice (stable in use; silenced here only, not globally)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class Pattern(NamedTuple):
    """Where a batch's codes are non-zero, in the two layouts the sparse backward needs.

    ``indices [batch, m]`` (sorted within each row) is the row-major layout; the CSR arrays of its
    transpose ``[dict_size, batch]`` (``crow``, ``col``, and ``order``, which sends a row-major
    entry to its place in them) let one sparse product gather every latent's rows at once.
    Built once per batch with a sort and a binary search (no host sync), shared by the encoder's
    and the decoder's backward.
    """

    indices: torch.Tensor
    order: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor

    @classmethod
    def of(cls, indices: torch.Tensor, dict_size: int) -> Pattern:
        flat = indices.flatten()
        sorted_ids, order = flat.sort()
        crow = torch.searchsorted(sorted_ids, torch.arange(dict_size + 1, device=flat.device))
        return cls(indices, order, crow, order.div(indices.shape[1], rounding_mode="floor"))

    def gather_rows(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``out[i] = sum of weights[b, j] * dense[b] over (b, j) with indices[b, j] == i``: [dict_size, d]."""
        sparse = _csr(self.crow, self.col, weights.flatten()[self.order], (len(self.crow) - 1, len(dense)))
        return sparse @ dense

    def dots(self, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[b, j] = dense[b] . table[indices[b, j]]``: [batch, m], computed at the pattern only."""
        batch, m = self.indices.shape
        mask = _csr(torch.arange(0, batch * m + 1, m, device=dense.device), self.indices.flatten(),
                    dense.new_ones(batch * m), (batch, len(table)))
        return torch.sparse.sampled_addmm(mask, dense, table.t(), beta=0.0).values().view(batch, m)


class SelectedLatents(torch.autograd.Function):
    """``pre[b, indices[b, j]]`` for ``pre = centered @ weight.T + bias``, differentiated sparsely.

    The forward receives those values already computed (the dense encoder product is the one
    unavoidable cost of top-k; it runs without an autograd graph). The backward touches only the
    selected latents: with ``g = grad [batch, m]``,

        grad_centered  = sum_j g[b, j] * weight[indices[b, j]]      (an embedding-bag of weight)
        grad_weight[i] = sum over (b, j) with indices[b, j] == i of g[b, j] * centered[b]
        grad_bias[i]   = sum over the same (b, j) of g[b, j]

    which is O(batch * m * input_size) instead of two dense ``[batch, dict_size]`` products.
    """

    @staticmethod
    def forward(ctx, values, centered, weight, bias, *pattern):
        ctx.save_for_backward(centered, weight, *pattern)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight, *pattern = ctx.saved_tensors
        pattern = Pattern(*pattern)
        grad = grad.contiguous()
        grad_centered = F.embedding_bag(pattern.indices, weight, per_sample_weights=grad, mode="sum")
        grad_weight = pattern.gather_rows(grad, centered)
        grad_bias = grad.new_zeros(len(weight)).index_add_(0, pattern.indices.flatten(), grad.flatten())
        return None, grad_centered, grad_weight, grad_bias, *([None] * len(pattern))


class SparseDecode(torch.autograd.Function):
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` (no bias), differentiated sparsely.

    Forward is an embedding-bag; backward computes ``grad_values`` as dot products at the pattern
    only (a sampled matmul) and ``grad_W_dec`` as one sparse product, each O(batch * m * d).
    """

    @staticmethod
    def forward(ctx, values, W_dec, *pattern):
        ctx.save_for_backward(values, W_dec, *pattern)
        return F.embedding_bag(pattern[0], W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, W_dec, *pattern = ctx.saved_tensors
        pattern = Pattern(*pattern)
        grad = grad.contiguous()
        return pattern.dots(grad, W_dec), pattern.gather_rows(values, grad), *([None] * len(pattern))
