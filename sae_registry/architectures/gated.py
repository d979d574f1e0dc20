"""gated: a gate picks the latents that fire, a magnitude path sets how much (Rajamanoharan et al. 2024;
SAELens's ``gated``, dictionary_learning's ``GatedAutoEncoder``).

    pi_gate = W_enc (x_n - b_dec) + b_gate                  # b_gate is the encoder's bias (file: b_enc)
    pi_mag  = exp(r_mag) * W_enc (x_n - b_dec) + b_mag      # the same W_enc, rescaled per latent
    codes   = (pi_gate > 0) * ReLU(pi_mag)
    loss    = MSE + l1_coeff * mean_rows(sum_i ReLU(pi_gate_i) |W_dec_i|)
                  + mean((ReLU(pi_gate) W_dec' + b_dec' - x_n)^2)     # W_dec', b_dec': frozen copies

The step has no gradient through the gate: W_enc and b_gate learn from the L1 and auxiliary terms
(and W_enc from the magnitude path too). ``r_mag`` and ``b_mag`` are the rule's tensors (zero at
first, as in both libraries). The magnitude path is computed as ``exp(r_mag) * (pi_gate - b_gate) +
b_mag`` (dictionary_learning's form; SAELens multiplies ``W_enc`` by ``exp(r_mag)`` first: the same to
float32 rounding), so the encoder product runs once.

Units: the MSE and the auxiliary term are means over features, as in every rule here; SAELens and
dictionary_learning sum over features, so their l1 coefficient is ``input_size`` times ours. The
auxiliary decoder is frozen as in the paper and dictionary_learning's trainer; SAELens 6.54's
``GatedTrainingSAE`` lets it train the decoder too.

Everything in the step is zero where the gate is shut (codes, the L1 term and the auxiliary
reconstruction, so their gradients too): once few gates are open, the step runs on the open entries
only, as l1's does. Logs ``train/l1_penalty`` (unweighted) and ``train/aux_loss`` besides the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Codes, SparseWhenSmall, StepLoss, linear_pre, pre_no_grad, ragged_codes
from .catalogue import SPARSE_BELOW
from .kernels import SparseDecode


class GatedCodes(Codes):
    """:class:`Codes` plus the gate path the loss needs, differentiable: ``gate`` = ReLU(pi_gate) (dense
    ``[batch, dict_size]``, or at the entries ``[nnz]``) and ``via_gate``, its decoding by the frozen decoder."""

    gate: torch.Tensor
    via_gate: torch.Tensor


def _gated_codes(*fields, gate: torch.Tensor, via_gate: torch.Tensor) -> GatedCodes:
    # a subclass of the NamedTuple without __slots__ holds two more attributes; the trainer passes it on as Codes
    out = GatedCodes(*fields)
    out.gate, out.via_gate = gate, via_gate
    return out


class Gated(SparseWhenSmall):

    def tensors(self, cfg):
        return {"r_mag": (cfg.dict_size,), "b_mag": (cfg.dict_size,)}

    def add_tensors(self, encoder):
        encoder.r_mag = nn.Parameter(torch.zeros(encoder.cfg.dict_size))
        encoder.b_mag = nn.Parameter(torch.zeros(encoder.cfg.dict_size))

    def encode(self, encoder, x_n):
        return magnitudes(encoder, encoder.encoder(x_n - encoder.b_dec)), None

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered = x_n - sae.b_dec
        frozen = sae.W_dec.detach()
        if not sparse_backward or sae.active_fraction >= SPARSE_BELOW:
            pre = linear_pre(sae, x_n)
            with torch.no_grad():
                sae.active_fraction = float((pre > 0).float().mean())
            codes, gate = magnitudes(sae.encoder, pre), F.relu(pre)
            return _gated_codes(codes @ sae.W_dec + sae.b_dec, codes, None, pre, centered,
                                gate=gate, via_gate=gate @ frozen + sae.b_dec.detach())
        pre = pre_no_grad(sae, centered)
        with torch.no_grad():
            rows, cols = (pre > 0).nonzero(as_tuple=True)
            sae.active_fraction = len(rows) / pre.numel()
        gate, pattern = ragged_codes(sae, pre, centered, rows, cols)  # the open gates' pi_gate, all > 0
        codes = magnitudes(sae.encoder, gate, cols)
        return _gated_codes(SparseDecode.apply(codes, sae.W_dec, pattern) + sae.b_dec, codes, cols, pre, centered,
                            rows, gate=gate, via_gate=pattern.bag(frozen, gate) + sae.b_dec.detach())

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        mse = (out.reconstruction - x_n).pow(2).mean()
        norms = sae.W_dec.norm(dim=-1)
        weighted = out.gate * (norms if out.rows is None else norms[out.indices])
        penalty = weighted.sum() / len(x_n)
        aux = (out.via_gate - x_n).pow(2).mean()
        return StepLoss(mse + cfg.l1_coeff * ramp * penalty + aux,
                        {"l1_penalty": penalty.detach(), "aux_loss": aux.detach()})


def magnitudes(encoder, pre: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """The codes of gate pre-activations ``pre`` (dense, or at latents ``cols``): ``(pre > 0) * ReLU(pi_mag)``."""
    r_mag, b_mag, b_gate = encoder.r_mag, encoder.b_mag, encoder.encoder.bias
    if cols is not None:
        r_mag, b_mag, b_gate = r_mag[cols], b_mag[cols], b_gate[cols]
    return (pre > 0).to(pre.dtype) * F.relu(r_mag.exp() * (pre - b_gate) + b_mag)
