"""batch_top_k: the k x batch largest codes over a batch (Bussmann et al. 2024).

    training:  codes = the k * batch largest of ReLU(pre) over the whole batch
    inference: codes = pre * (pre > threshold), one threshold estimated in training (an average
               of each batch's smallest selected value), calibrated once training is over

Logs ``train/threshold`` (the running estimate) besides the loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .base import Codes, Rule, StepLoss, auxk_loss, linear_pre, pre_no_grad, ragged_codes
from .kernels import SparseDecode

if TYPE_CHECKING:
    from ..model.sae import SparseAutoencoder

UNSET = -1.0  # a threshold not estimated yet: inference falls back to the batch's own top k * batch


class BatchTopK(Rule):
    def tensors(self, cfg):
        return {"threshold": ()}

    def add_tensors(self, encoder):
        encoder.register_buffer("threshold", torch.tensor(UNSET))

    def encode(self, encoder, x_n):
        pre = encoder.encoder(x_n - encoder.b_dec)
        if float(encoder.threshold) < 0:  # not trained: the batch's own top k * batch
            return _batch_top_k_dense(F.relu(pre), encoder.cfg.top_k), None
        return F.relu(pre) * (pre > encoder.threshold), None

    def select(self, sae: SparseAutoencoder, x_n: torch.Tensor, sparse_backward: bool):
        """(centered, pre, rows, cols): the k * batch largest ReLU'd outputs, sorted row-major."""
        centered = x_n - sae.b_dec
        pre = pre_no_grad(sae, centered) if sparse_backward else linear_pre(sae, x_n)
        with torch.no_grad():
            flat = pre.detach().flatten().topk(sae.cfg.top_k * len(x_n), sorted=False).indices.sort().values
            rows, cols = flat.div(sae.cfg.dict_size, rounding_mode="floor"), flat % sae.cfg.dict_size
        return centered, pre, rows, cols

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered, pre, rows, cols = self.select(sae, x_n, sparse_backward)
        if not sparse_backward:
            values = pre[rows, cols].clamp_min(0)
            codes = torch.zeros_like(pre).index_put((rows, cols), values)
            return Codes(codes @ sae.W_dec + sae.b_dec, values, cols, pre, centered, rows)
        values, pattern = ragged_codes(sae, pre, centered, rows, cols)
        values = values.clamp_min(0)
        return Codes(SparseDecode.apply(values, sae.W_dec, pattern) + sae.b_dec, values, cols, pre, centered, rows)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        return batch_loss(sae, x_n, out, cfg, ramp, dead, (out.reconstruction - x_n).pow(2).mean())

    @torch.no_grad()
    def after_step(self, sae, out, cfg, step):
        # the smallest value kept in this batch, averaged over steps: SAELens's moving average, but
        # a plain mean over the first 1 / threshold_lr steps (SAELens starts at 0, which reads as
        # plain ReLU until hundreds of steps have passed)
        values = out.hidden_acts.detach()
        smallest = values.masked_fill(values <= 0, float("inf")).min()
        t = sae.encoder.threshold
        lr = max(cfg.threshold_lr, 1.0 / (step + 1))
        new = torch.where(t < 0, smallest, (1 - lr) * t + lr * smallest)
        t.copy_(torch.where(torch.isfinite(smallest), new, t))

    @torch.no_grad()
    def calibrate(self, sae, batches):
        # the moving average follows weights that kept moving: measured on MiniLM it lagged to an
        # inference L0 of 25 for k 32. Under the final weights, the mean of each batch's smallest
        # selected value makes the mean L0 at inference k again.
        smallest = []
        for batch in batches:
            pre = sae.encoder.encoder(batch.to(sae.b_dec) * sae.encoder.input_scale - sae.b_dec)
            kept = pre.flatten().topk(min(sae.cfg.top_k * len(pre), pre.numel()), sorted=False).values
            kept = kept[kept > 0]
            if len(kept):
                smallest.append(kept.min())
        if smallest:
            sae.encoder.threshold.copy_(torch.stack(smallest).mean())


def batch_loss(sae, x_n, out, cfg, ramp, dead, mse) -> StepLoss:
    """The k rules' loss over entries ``out.rows``/``out.indices``: ``mse`` (+ an L1 term if asked) + the auxiliary loss."""
    loss = mse
    if cfg.l1_coeff:
        loss = loss + cfg.l1_coeff * ramp * out.hidden_acts.abs().sum() / len(x_n)
    aux = x_n.new_zeros(())
    if cfg.aux_coeff > 0:
        aux = auxk_loss(sae, x_n, out, dead, cfg.aux_k)
        loss = loss + cfg.aux_coeff * aux
    # a copy: after_step moves the threshold in place before the trainer adds up the terms
    return StepLoss(loss, {"aux_loss": aux, "threshold": sae.encoder.threshold.detach().clone()})


def _batch_top_k_dense(acts: torch.Tensor, k: int) -> torch.Tensor:
    top = acts.flatten().topk(min(k * len(acts), acts.numel()), sorted=False)
    return torch.zeros_like(acts).flatten().scatter_(0, top.indices, top.values).view_as(acts)
