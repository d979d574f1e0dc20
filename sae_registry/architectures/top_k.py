"""top_k: the k largest codes of each token (Gao et al. 2024).

    codes = TopK_k(ReLU(pre)) per row; loss = MSE (+ l1_coeff * L1) + aux_coeff * AuxK

Only the k selected latents are differentiated on the sparse step (``kernels.SelectedLatents``).
"""

from __future__ import annotations

import torch

from .base import Codes, Rule, StepLoss, auxk_loss, linear_pre, mse_plus_l1


class TopK(Rule):
    signed = False  # abs_top_k: codes keep their sign (no ReLU), chosen by magnitude

    def encode(self, encoder, x_n):
        # select among the encoder outputs, ReLU the k chosen only: ReLU-then-top-k without a dense ReLU
        values, indices = encoder.encoder(x_n - encoder.b_dec).topk(encoder.cfg.top_k, dim=-1, sorted=False)
        return values.clamp_min(0), indices

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered = x_n - sae.b_dec
        linear = sae.encoder.encoder
        if not sparse_backward:
            pre = linear_pre(sae, x_n)
        else:
            with torch.no_grad():
                low = select_dtype is not None and select_dtype != linear.weight.dtype
                dtype = select_dtype if low else linear.weight.dtype
                pre = torch.addmm(linear.bias.to(dtype), centered.to(dtype), linear.weight.to(dtype).t())
        indices = pre.detach().topk(sae.cfg.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
        values, decoded = sae.decode_latents(pre, centered, indices)
        return Codes(decoded + sae.b_dec, values, indices, pre, centered)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        loss = mse_plus_l1(x_n, out.reconstruction, out.hidden_acts, cfg.l1_coeff * ramp)
        aux = x_n.new_zeros(())
        if cfg.aux_coeff > 0:
            aux = auxk_loss(sae, x_n, out, dead, cfg.aux_k, signed=self.signed)
            loss = loss + cfg.aux_coeff * aux
        return StepLoss(loss, {"aux_loss": aux})
