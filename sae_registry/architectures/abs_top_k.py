"""abs_top_k: the k codes of largest magnitude per token, with their signs (AbsTopK, arXiv 2510.00404;
SAELens's ``abstopk``).

    codes = pre at the k largest |pre| per row, sign kept (no ReLU); loss = MSE (+ l1_coeff * L1) + aux_coeff * AuxK

A latent fires in either direction: its decoder row is added or subtracted. The AuxK loss takes the
dead latents of largest |pre|, signed (SAELens's ``calculate_abstopk_aux_acts``; normalised as
top_k's). The sparse step differentiates the k selected latents only, as top_k's, without its ReLU;
``select_dtype`` is not used (the trainer allows bfloat16 selection for top_k only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Codes, Rule, StepLoss, linear_pre, mse_plus_l1, pre_no_grad
from .kernels import Pattern, SelectedLatents, SparseDecode

if TYPE_CHECKING:
    from ..model.sae import SparseAutoencoder


class AbsTopK(Rule):

    def encode(self, encoder, x_n):
        pre = encoder.encoder(x_n - encoder.b_dec)
        indices = pre.abs().topk(encoder.cfg.top_k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices), indices

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered = x_n - sae.b_dec
        pre = pre_no_grad(sae, centered) if sparse_backward else linear_pre(sae, x_n)
        indices = pre.detach().abs().topk(sae.cfg.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
        values, decoded = signed_latents(sae, pre, centered, indices)
        return Codes(decoded + sae.b_dec, values, indices, pre, centered)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        loss = mse_plus_l1(x_n, out.reconstruction, out.hidden_acts, cfg.l1_coeff * ramp)
        aux = x_n.new_zeros(())
        if cfg.aux_coeff > 0:
            aux = abs_auxk_loss(sae, x_n, out, dead, cfg.aux_k)
            loss = loss + cfg.aux_coeff * aux
        return StepLoss(loss, {"aux_loss": aux})

    def stats(self, out, batch, dict_size):
        active = out.hidden_acts != 0  # a negative code fires too
        counts = torch.zeros(dict_size, device=active.device).index_add_(0, out.indices.flatten(),
                                                                          active.flatten().float())
        return counts > 0, active.sum().float() / batch


def signed_latents(sae: SparseAutoencoder, pre: torch.Tensor, centered: torch.Tensor,
                   indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``SparseAutoencoder.decode_latents`` without its ReLU: the encoder outputs at ``indices [batch, m]``
    (sorted per row) and their decoding without bias, both differentiable; sparsely when ``pre`` has no graph."""
    if pre.requires_grad:
        values = pre.gather(1, indices)
        return values, sae._decode_sparse(values, indices)
    linear = sae.encoder.encoder
    pattern = Pattern.of(indices, sae.cfg.dict_size)
    values = SelectedLatents.apply(pre.gather(1, indices), centered, linear.weight, linear.bias, *pattern)
    return values, SparseDecode.apply(values, sae.W_dec, *pattern)


def abs_auxk_loss(sae: SparseAutoencoder, x_n: torch.Tensor, out: Codes, dead: torch.Tensor,
                  k_aux: int) -> torch.Tensor:
    """``base.auxk_loss`` with the dead latents of largest |pre| and their signed values."""
    if dead.dtype == torch.bool:
        dead = dead.nonzero().flatten()
    if len(dead) == 0:
        return x_n.new_zeros(())
    k = min(k_aux, len(dead))
    residual = (x_n - out.reconstruction).detach()
    with torch.no_grad():
        _, position = out.pre_acts.detach().index_select(1, dead).abs().topk(k, dim=-1, sorted=False)
        indices = dead[position.sort(dim=-1).values]
    _, residual_hat = signed_latents(sae, out.pre_acts, out.centered, indices)
    total_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / total_var * min(len(dead) / k_aux, 1.0)
