"""matryoshka: batch_top_k whose nested prefixes each reconstruct (Bussmann et al. 2025).

The selection is batch_top_k's; the loss sums the MSE of the reconstruction of each nested prefix
``prefixes`` of the dictionary (the first latents alone, then more), so that early latents learn
general features.
"""

from __future__ import annotations

import torch

from .base import Codes, ragged_codes
from .batch_top_k import BatchTopK, batch_loss
from .kernels import SparseDecode


class Matryoshka(BatchTopK):
    def run_name(self, cfg, train_cfg=None):
        return super().run_name(cfg) + "-p" + ".".join(map(str, cfg.prefix_ends))

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        ends = torch.tensor(sae.cfg.prefix_ends, device=x_n.device)
        centered, pre, rows, cols = self.select(sae, x_n, sparse_backward)
        groups = len(ends)
        group = torch.searchsorted(ends, cols, right=True)  # cols sorted within a row: so are groups
        if not sparse_backward:
            values = pre[rows, cols].clamp_min(0)
            parts = [torch.zeros_like(pre).index_put((rows[group == g], cols[group == g]), values[group == g])
                     @ sae.W_dec for g in range(groups)]
            decoded = torch.stack(parts, 1)
        else:
            values, pattern = ragged_codes(sae, pre, centered, rows, cols)
            values = values.clamp_min(0)
            by_group = pattern.regrouped(rows * groups + group, len(x_n) * groups)
            decoded = SparseDecode.apply(values, sae.W_dec, by_group).view(len(x_n), groups, -1)
        prefixes = decoded.cumsum(1) + sae.b_dec  # [batch, groups, d]: reconstruction of each prefix
        return Codes(prefixes[:, -1], values, cols, pre, centered, rows, prefixes)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        return batch_loss(sae, x_n, out, cfg, ramp, dead, (out.prefixes - x_n[:, None]).pow(2).mean((0, 2)).sum())
