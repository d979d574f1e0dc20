"""abs_top_k: the k codes of largest magnitude per token, with their signs (AbsTopK, arXiv 2510.00404;
SAELens's ``abstopk``).

    codes = pre at the k largest |pre| per row, sign kept (no ReLU); loss = MSE (+ l1_coeff * L1) + aux_coeff * AuxK

A latent fires in either direction: its decoder row is added or subtracted. top_k's rule with signed
codes: its loss, and AuxK over the dead latents of largest |pre|, signed (SAELens's
``calculate_abstopk_aux_acts``; normalised as top_k's). The sparse step differentiates the k selected
latents only, as top_k's, without its ReLU; ``select_dtype`` is not used (the trainer allows bfloat16
selection for top_k only).
"""

from __future__ import annotations

from .base import Codes, linear_pre, pre_no_grad
from .top_k import TopK


class AbsTopK(TopK):
    signed = True

    def encode(self, encoder, x_n):
        pre = encoder.encoder(x_n - encoder.b_dec)
        indices = pre.abs().topk(encoder.cfg.top_k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices), indices

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered = x_n - sae.b_dec
        pre = pre_no_grad(sae, centered) if sparse_backward else linear_pre(sae, x_n)
        indices = pre.detach().abs().topk(sae.cfg.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
        values, decoded = sae.decode_latents(pre, centered, indices, relu=False)
        return Codes(decoded + sae.b_dec, values, indices, pre, centered)
