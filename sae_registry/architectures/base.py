"""What every architecture shares: the :class:`Rule` interface, a training pass's :class:`Codes`, the
loss a step returns (:class:`StepLoss`) and the encoder products the rules build on.

A rule is one file of this package (``top_k.py``, ``jumprelu.py``, ...) and one line of
``catalogue.py``. It owns how latents are selected at training and at inference, its loss terms,
its own tensors (JumpReLU's per-latent threshold, BatchTopK's inference threshold) and its run
names; its defaults, cost and foreign names are its catalogue line. ``pre = W_enc (x_n - b_dec) +
b_enc`` on the scaled inputs (see ``model/sae.py``). Rules take the model as an argument and never
import it: the model imports the rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from .catalogue import SPARSE_BELOW, Architecture
from .kernels import Ragged, SelectedLatents, SparseDecode

if TYPE_CHECKING:
    from ..config.options import SAEConfig, TrainConfig
    from ..model.sae import SparseAutoencoder, SparseEncoder


class Codes(NamedTuple):
    """What one training forward pass produces, all in the scaled input space."""

    reconstruction: torch.Tensor  # [batch, input_size]
    hidden_acts: torch.Tensor  # top_k: the k values [batch, k]; dense rules: codes [batch, dict_size];
    #                            a varying number per row: the entries' values [nnz]
    indices: torch.Tensor | None  # top_k: latent ids [batch, k]; per entry [nnz]; dense: None
    pre_acts: torch.Tensor  # encoder outputs before ReLU [batch, dict_size] (no autograd graph on
    #                         the sparse path: SparseAutoencoder.decode_latents differentiates them)
    centered: torch.Tensor  # x_n - b_dec, the encoder's input [batch, input_size]
    rows: torch.Tensor | None = None  # the row of each entry [nnz] when rows hold varying numbers
    prefixes: torch.Tensor | None = None  # matryoshka: each prefix's reconstruction [batch, groups, d]


class StepLoss(NamedTuple):
    """What a rule's loss measured in one step: the scalar to differentiate and its named terms.

    ``terms`` (e.g. ``aux_loss``, ``l0_penalty``, ``threshold``) are logged by the trainer as
    ``train/<name>``, averaged between evaluations, whatever the rule: a new architecture logs its own
    numbers without the trainer knowing them. Every step of a run returns the same names, each
    a scalar as it was in this step (a copy where the rule later changes it in place).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


def mse_plus_l1(x_n: torch.Tensor, reconstruction: torch.Tensor, hidden_acts: torch.Tensor,
                l1_coeff: float) -> torch.Tensor:
    """The seed loss, unchecked: mean squared error + ``l1_coeff`` x the mean over rows of sum |codes|."""
    mse = (reconstruction - x_n).pow(2).mean()
    if l1_coeff == 0:
        return mse
    return mse + l1_coeff * hidden_acts.abs().sum(-1).mean()


def auxk_loss(
    sae: SparseAutoencoder,
    x_n: torch.Tensor,
    out: Codes,
    dead: torch.Tensor,
    k_aux: int,
    signed: bool = False,
) -> torch.Tensor:
    """Gao et al.'s auxiliary loss that revives dead latents (the k rules; ``signed``: abs_top_k's, the
    dead latents of largest |pre| with their signs, as SAELens's ``calculate_abstopk_aux_acts``).

    ``dead`` holds the ids of the dead latents (a 1-d index tensor; its length is known on the
    host, so nothing here waits for the device). The ``k_aux`` largest encoder outputs among them
    try to reconstruct the main model's residual; gradients flow only into those latents.
    Normalised by the residual's variance around its mean so that its scale does not depend on
    the data.
    """
    if dead.dtype == torch.bool:
        dead = dead.nonzero().flatten()
    if len(dead) == 0:
        return x_n.new_zeros(())
    k = min(k_aux, len(dead))
    residual = (x_n - out.reconstruction).detach()
    with torch.no_grad():
        candidates = out.pre_acts.detach().index_select(1, dead)
        _, position = (candidates.abs() if signed else candidates).topk(k, dim=-1, sorted=False)
        indices = dead[position.sort(dim=-1).values]  # dead is sorted, so these rows are too
    _, residual_hat = sae.decode_latents(out.pre_acts, out.centered, indices, relu=not signed)
    total_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / total_var * min(len(dead) / k_aux, 1.0)


def linear_pre(sae: SparseAutoencoder, x_n: torch.Tensor) -> torch.Tensor:
    """``W (x - b_dec) + b_enc`` as ``W x + (b_enc - W b_dec)``: b_dec's gradient is then a
    vector-matrix product, not a [batch, dict_size] one."""
    linear = sae.encoder.encoder
    return F.linear(x_n, linear.weight, linear.bias - linear.weight @ sae.b_dec)


def pre_no_grad(sae: SparseAutoencoder, centered: torch.Tensor) -> torch.Tensor:
    linear = sae.encoder.encoder
    with torch.no_grad():
        return torch.addmm(linear.bias, centered, linear.weight.t())


def ragged_codes(sae: SparseAutoencoder, pre: torch.Tensor, centered: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> tuple[torch.Tensor, Ragged]:
    """The encoder outputs at entries ``(rows, cols)`` (row-major sorted), differentiable at those entries only."""
    linear = sae.encoder.encoder
    pattern = Ragged.of(rows, cols, len(pre), sae.cfg.dict_size)
    return SelectedLatents.apply(pre[rows, cols], centered, linear.weight, linear.bias, pattern), pattern


class Rule:
    """A sparsity rule's torch code. Subclasses override what differs; ``arch`` is its catalogue entry."""

    def __init__(self, arch: Architecture) -> None:
        self.arch = arch

    @property
    def name(self) -> str:
        return self.arch.name

    # -- configuration ---------------------------------------------------------------------------

    def tensors(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Extra tensors of the rule, saved beside the weights: name -> shape."""
        return {}

    def run_name(self, cfg: SAEConfig, train_cfg: TrainConfig | None = None) -> str:
        """A run's name: the rule, the size and what sets the sparsity (``topk-d4096-k32``), so that two
        dictionaries of one grid never share one (a sweep finds its members' runs by name).
        ``train_cfg`` is resolved (its coefficients filled in); without it the coefficient is left out."""
        name = f"{self.name.replace('_', '')}-d{cfg.dict_size}" + (f"-k{cfg.top_k}" if self.arch.uses_k else "")
        if train_cfg is not None and "l1_coeff" in self.arch.named_keys:
            name += f"-l1c{train_cfg.l1_coeff:g}"
        return name

    def add_tensors(self, encoder: SparseEncoder) -> None:
        """Register the rule's tensors on ``encoder``."""

    # -- inference -------------------------------------------------------------------------------

    def encode(self, encoder: SparseEncoder, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes of scaled inputs: ``(values [batch, k], indices [batch, k])`` or ``(dense, None)``."""
        return encoder.pre_acts(x_n), None

    # -- training --------------------------------------------------------------------------------

    @torch.no_grad()
    def init(self, sae: SparseAutoencoder, cfg: TrainConfig) -> None:
        """Set the rule's tensors for the start of training."""

    def forward_train(self, sae: SparseAutoencoder, x_n: torch.Tensor, cfg: TrainConfig | None,
                      sparse_backward: bool, select_dtype: torch.dtype | None) -> Codes:
        """One training forward pass over scaled inputs (``cfg`` None: the training defaults)."""
        raise NotImplementedError

    def loss(self, sae: SparseAutoencoder, x_n: torch.Tensor, out: Codes, cfg: TrainConfig, ramp: float,
             dead: torch.Tensor) -> StepLoss:
        """The loss of one step and its named terms; ``ramp`` in (0, 1] warms up the sparsity penalty."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, out: Codes, cfg: TrainConfig, step: int) -> None:
        """Anything the rule updates after optimiser step ``step`` (0-based): an estimated threshold, a projection."""

    @torch.no_grad()
    def calibrate(self, sae: SparseAutoencoder, batches) -> None:
        """Set, once training is over, what inference estimates from data (raw training ``batches``)."""

    def stats(self, out: Codes, batch: int, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fired [dict_size] bool, mean L0)`` of a step's codes (dense, ``[batch, k]`` with their ids, or
        one per entry); nothing waits for the device. A code fires when it is non-zero, of either sign."""
        active = out.hidden_acts != 0
        if out.indices is None:
            return active.any(0), active.sum(-1).float().mean()
        counts = torch.zeros(dict_size, device=active.device).index_add_(0, out.indices.flatten(),
                                                                          active.flatten().float())
        return counts > 0, active.sum().float() / batch


class SparseWhenSmall(Rule):
    """Dense codes (l1, jumprelu), whose step runs on the active entries once they are few."""

    def _cut(self, sae: SparseAutoencoder) -> torch.Tensor:
        """The value above which an encoder output is kept on the sparse step (per latent or scalar)."""
        return torch.zeros(())

    def margin(self, cfg: TrainConfig | None) -> float:
        """Entries within this below the cut are kept on the sparse step (the estimator's band)."""
        return 0.0

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        centered = x_n - sae.b_dec
        # the choice uses the last step's fraction: one host sync per step (the count), no second pass
        if not sparse_backward or sae.active_fraction >= SPARSE_BELOW:
            pre = linear_pre(sae, x_n)
            with torch.no_grad():
                sae.active_fraction = float((pre > self._cut(sae)).float().mean())
            codes = self.activate(sae, pre, cfg)
            return Codes(codes @ sae.W_dec + sae.b_dec, codes, None, pre, centered)
        pre = pre_no_grad(sae, centered)
        with torch.no_grad():
            rows, cols = (pre > self._cut(sae) - self.margin(cfg)).nonzero(as_tuple=True)
            sae.active_fraction = float((pre > self._cut(sae)).float().mean())
        values, pattern = ragged_codes(sae, pre, centered, rows, cols)
        values = self.activate(sae, values, cfg, cols)
        decoded = SparseDecode.apply(values, sae.W_dec, pattern)
        return Codes(decoded + sae.b_dec, values, cols, pre, centered, rows)

    def activate(self, sae: SparseAutoencoder, pre: torch.Tensor, cfg: TrainConfig | None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of encoder outputs ``pre`` (dense, or at latents ``cols``), differentiable."""
        raise NotImplementedError
