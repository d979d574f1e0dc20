"""l1: ReLU codes and an L1 penalty (the seed's rule; Anthropic's recipe with unit-norm decoder rows).

    codes = ReLU(pre); loss = MSE + l1_coeff * mean_rows(sum |codes|)

Codes start dense (the encoder at 0.1 x the decoder's transpose) and thin out; once fewer than
``SPARSE_BELOW`` are active, the step runs on the active entries only (``base.SparseWhenSmall``).
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import SparseWhenSmall, StepLoss, mse_plus_l1


class L1(SparseWhenSmall):

    def activate(self, sae, pre, cfg, cols=None):
        return F.relu(pre)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        if out.rows is None:
            return StepLoss(mse_plus_l1(x_n, out.reconstruction, out.hidden_acts, cfg.l1_coeff * ramp), {})
        mse = (out.reconstruction - x_n).pow(2).mean()
        return StepLoss(mse + cfg.l1_coeff * ramp * out.hidden_acts.abs().sum() / len(x_n), {})
