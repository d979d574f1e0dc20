"""jumprelu: per-latent thresholds (Rajamanoharan et al. 2024; Gemma Scope 2's target L0).

    codes = pre * (pre > threshold_i); loss = MSE + l0_coeff * L0, or with ``target_l0`` T,
            MSE + l0_coeff * 2 / T * (L0 - T)^2 per token

The thresholds train through a straight-through estimator with a rectangle-kernel pseudo-derivative
of width ``jumprelu_bandwidth``; dead latents get Anthropic's pre-act loss (``pre_act_coeff``).
Logs ``train/l0_penalty`` and ``train/threshold`` (the mean threshold) besides the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SparseWhenSmall, StepLoss


class _Threshold(torch.autograd.Function):
    """JumpReLU (``gate=False``: ``x * (x > t)``) or Heaviside step (``gate=True``: ``x > t``),
    elementwise, with the pseudo-derivatives of Rajamanoharan et al. (rectangle kernel of width
    ``eps``): d/dt = -(t / eps) K((x - t) / eps) for JumpReLU, -(1 / eps) K(...) for the step;
    d/dx = (x > t) for JumpReLU, 0 for the step (DeepMind's estimator)."""

    @staticmethod
    def forward(ctx, x, t, eps, step):
        ctx.save_for_backward(x, t)
        ctx.eps, ctx.step = eps, step
        above = (x > t).to(x.dtype)
        return above if step else x * above

    @staticmethod
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        kernel = ((x - t).abs() < ctx.eps / 2).to(x.dtype) / ctx.eps
        grad_t = -(kernel if ctx.step else t * kernel) * grad
        grad_x = None if ctx.step else (x > t).to(x.dtype) * grad
        if grad_t.shape != t.shape:  # t broadcast over the batch
            grad_t = grad_t.sum(0)
        return grad_x, grad_t, None, None


class JumpReLU(SparseWhenSmall):
    def run_name(self, cfg, train_cfg=None):
        if train_cfg is None:
            return super().run_name(cfg)
        target = f"-l0t{train_cfg.target_l0:g}" if train_cfg.target_l0 is not None else ""
        return super().run_name(cfg) + f"-l0c{train_cfg.l0_coeff:g}" + target

    def tensors(self, cfg):
        return {"threshold": (cfg.dict_size,)}

    def add_tensors(self, encoder):
        encoder.threshold = nn.Parameter(torch.full((encoder.cfg.dict_size,), 0.01))

    def encode(self, encoder, x_n):
        pre = encoder.encoder(x_n - encoder.b_dec)
        return F.relu(pre) * (pre > encoder.threshold), None  # SAELens's form: the same for a threshold < 0

    def _cut(self, sae):
        return sae.encoder.threshold.detach()

    @torch.no_grad()
    def init(self, sae, cfg):
        sae.encoder.threshold.fill_(cfg.jumprelu_init_threshold)

    def margin(self, cfg):
        return cfg.jumprelu_bandwidth / 2

    def activate(self, sae, pre, cfg, cols=None):
        t = sae.encoder.threshold if cols is None else sae.encoder.threshold[cols]
        return _Threshold.apply(pre, t, cfg.jumprelu_bandwidth, False)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        mse = (out.reconstruction - x_n).pow(2).mean()
        t = sae.encoder.threshold
        if out.rows is None:
            steps = _Threshold.apply(out.pre_acts, t, cfg.jumprelu_bandwidth, True)
        else:  # the step's estimator is non-zero only within the band, all of it among the entries
            steps = _Threshold.apply(out.pre_acts[out.rows, out.indices], t[out.indices], cfg.jumprelu_bandwidth, True)
        if cfg.target_l0 is None:
            penalty = steps.sum() / len(x_n)
        else:  # Gemma Scope 2's quadratic penalty around the target, token by token (as SAELens's)
            per_token = steps.sum(-1) if out.rows is None else x_n.new_zeros(len(x_n)).index_add(0, out.rows, steps)
            penalty = (2 / cfg.target_l0 * (per_token - cfg.target_l0).pow(2)).mean()
        loss = mse + cfg.l0_coeff * ramp * penalty
        aux = x_n.new_zeros(())
        if cfg.pre_act_coeff > 0 and len(dead):
            # Anthropic's pre-act loss on dead latents only (as SAELens): pulls their encoder outputs up
            linear = sae.encoder.encoder
            dead_pre = out.centered @ linear.weight[dead].t() + linear.bias[dead]
            aux = ((t[dead] - dead_pre).relu() * sae.W_dec[dead].norm(dim=-1)).sum(-1).mean()
            loss = loss + cfg.pre_act_coeff * aux
        return StepLoss(loss, {"aux_loss": aux, "l0_penalty": penalty.detach(), "threshold": t.detach().mean()})

    @torch.no_grad()
    def after_step(self, sae, out, cfg, step):
        sae.encoder.threshold.clamp_(min=0.0)  # below zero the gate would pass negative outputs
