"""The sparse step of a dictionary: custom autograd functions whose backward touches only the
selected latents.

A top-k forward pass picks ``m`` latents per row (:class:`Pattern`); BatchTopK, Matryoshka and the
sparse steps of l1 and JumpReLU pick a varying number per row (:class:`Ragged`). plain autograd would still differentiate the
dense ``[batch, dict_size]`` encoder product and decode. These functions take the selected
``(values, indices)`` and compute every gradient at the pattern only, O(batch * m * d) each. The
model (:mod:`sae_registry.model.sae`) decides what is selected; this module only differentiates it.
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

    def bag(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``out[b] = sum_j weights[b, j] * table[indices[b, j]]``: an embedding-bag, [batch, d]."""
        return F.embedding_bag(self.indices, table, per_sample_weights=weights, mode="sum")

    def dots(self, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[b, j] = dense[b] . table[indices[b, j]]``: [batch, m], computed at the pattern only."""
        batch, m = self.indices.shape
        mask = _csr(torch.arange(0, batch * m + 1, m, device=dense.device), self.indices.flatten(),
                    dense.new_ones(batch * m), (batch, len(table)))
        return torch.sparse.sampled_addmm(mask, dense, table.t(), beta=0.0).values().view(batch, m)


class Ragged(NamedTuple):
    """A varying number of entries per bag: entry ``e`` is latent ``cols[e]`` of bag ``bags[e]``.

    Entries are sorted by bag (``offsets [n_bags + 1]`` marks where each bag starts); a bag is a
    row of the batch, or for Matryoshka one (row, prefix group) pair. ``order``/``crow``/``col`` are
    the CSR arrays of the transpose ``[dict_size, n_bags]``, as in :class:`Pattern`, so the same
    autograd functions differentiate both at the selected entries only.
    """

    indices: torch.Tensor  # cols [nnz]
    order: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    offsets: torch.Tensor  # [n_bags + 1]

    @classmethod
    def of(cls, bags: torch.Tensor, cols: torch.Tensor, n_bags: int, dict_size: int) -> Ragged:
        """The pattern of entries ``(bags, cols)``, ``bags`` sorted ascending."""
        sorted_ids, order = cols.sort(stable=True)
        crow = torch.searchsorted(sorted_ids, torch.arange(dict_size + 1, device=cols.device))
        offsets = torch.searchsorted(bags, torch.arange(n_bags + 1, device=cols.device))
        return cls(cols, order, crow, bags[order], offsets)

    def regrouped(self, bags: torch.Tensor, n_bags: int) -> Ragged:
        """The same entries (same order) in other bags, ``bags`` sorted ascending."""
        offsets = torch.searchsorted(bags, torch.arange(n_bags + 1, device=bags.device))
        return Ragged(self.indices, self.order, self.crow, bags[self.order], offsets)

    def bag(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``out[n] = sum of weights[e] * table[cols[e]]`` over the entries of bag ``n``: [n_bags, d]."""
        return F.embedding_bag(self.indices, table, self.offsets, per_sample_weights=weights, mode="sum",
                               include_last_offset=True)

    def gather_rows(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``out[i] = sum of weights[e] * dense[bags[e]]`` over the entries with ``cols[e] == i``."""
        sparse = _csr(self.crow, self.col, weights[self.order], (len(self.crow) - 1, len(dense)))
        return sparse @ dense

    def dots(self, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[e] = dense[bags[e]] . table[cols[e]]``: [nnz], at the entries only."""
        ones = dense.new_ones(len(self.indices))
        mask = _csr(self.offsets, self.indices, ones, (len(self.offsets) - 1, len(table)))
        return torch.sparse.sampled_addmm(mask, dense, table.t(), beta=0.0).values()


def _kind(args: tuple) -> type:
    """The functions below take a pattern as its tensors (``*pattern``, the top-k form) or as one
    :class:`Ragged` value."""
    return type(args[0]) if len(args) == 1 and isinstance(args[0], Ragged) else Pattern


def _tensors(args: tuple) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], Ragged) else args


def _pattern(kind: type, tensors) -> Pattern | Ragged:
    return kind(*tensors)


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
        ctx.kind, ctx.n_args = _kind(pattern), len(pattern)
        ctx.save_for_backward(centered, weight, *_tensors(pattern))
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight, *pattern = ctx.saved_tensors
        pattern = _pattern(ctx.kind, pattern)
        grad = grad.contiguous()
        grad_centered = pattern.bag(weight, grad)
        grad_weight = pattern.gather_rows(grad, centered)
        grad_bias = grad.new_zeros(len(weight)).index_add_(0, pattern.indices.flatten(), grad.flatten())
        return None, grad_centered, grad_weight, grad_bias, *([None] * ctx.n_args)


class SparseDecode(torch.autograd.Function):
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` (no bias), differentiated sparsely.

    Forward is an embedding-bag; backward computes ``grad_values`` as dot products at the pattern
    only (a sampled matmul) and ``grad_W_dec`` as one sparse product, each O(batch * m * d).
    """

    @staticmethod
    def forward(ctx, values, W_dec, *pattern):
        ctx.kind, ctx.n_args = _kind(pattern), len(pattern)
        ctx.save_for_backward(values, W_dec, *_tensors(pattern))
        return _pattern(ctx.kind, _tensors(pattern)).bag(W_dec, values)

    @staticmethod
    def backward(ctx, grad):
        values, W_dec, *pattern = ctx.saved_tensors
        pattern = _pattern(ctx.kind, pattern)
        grad = grad.contiguous()
        return pattern.dots(grad, W_dec), pattern.gather_rows(values, grad), *([None] * ctx.n_args)
