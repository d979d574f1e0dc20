"""Sparsity rules: one small class per architecture, asked by the model, the trainer and interchange.

A rule owns how latents are selected at training and at inference, its extra loss terms, its own
tensors (JumpReLU's per-latent threshold, BatchTopK's inference threshold), its defaults and its
names in SAELens and dictionary_learning. Adding an architecture is one class here (plus its tests).

    top_k        codes = TopK_k(ReLU(pre)) per row                     (Gao et al. 2024)
    l1           codes = ReLU(pre), loss + l1_coeff * sum|codes|
    batch_top_k  training: the k * batch largest of ReLU(pre) over the batch; inference:
                 codes = pre * (pre > threshold), one threshold estimated in training
                 (an average of each batch's smallest selected value; Bussmann et al. 2024)
    jumprelu     codes = pre * (pre > threshold_i), per-latent thresholds trained through a
                 straight-through estimator with a rectangle-kernel pseudo-derivative of width
                 ``jumprelu_bandwidth``; loss + l0_coeff * L0 (Rajamanoharan et al. 2024), or with
                 ``target_l0`` T, l0_coeff * 2 / T * (L0 - T)^2 per token (Gemma Scope 2)
    matryoshka   batch_top_k's selection; the loss sums the reconstructions' MSE of each nested
                 prefix ``prefixes`` of the dictionary (Bussmann et al. 2025)

where ``pre = W_enc (x_n - b_dec) + b_enc`` on the scaled inputs (see ``sae.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import K_RULES, SPARSE_BELOW
from .errors import SAERegistryError
from .sparse_ops import Ragged, SelectedLatents, SparseDecode

if TYPE_CHECKING:
    from .config import SAEConfig, TrainConfig
    from .sae import Codes, SparseAutoencoder, SparseEncoder

UNSET = -1.0  # a BatchTopK threshold not estimated yet: inference falls back to the batch's own top k


def _linear_pre(sae: SparseAutoencoder, x_n: torch.Tensor) -> torch.Tensor:
    """``W (x - b_dec) + b_enc`` as ``W x + (b_enc - W b_dec)``: b_dec's gradient is then a
    vector-matrix product, not a [batch, dict_size] one."""
    linear = sae.encoder.encoder
    return F.linear(x_n, linear.weight, linear.bias - linear.weight @ sae.b_dec)


def _pre_no_grad(sae: SparseAutoencoder, centered: torch.Tensor) -> torch.Tensor:
    linear = sae.encoder.encoder
    with torch.no_grad():
        return torch.addmm(linear.bias, centered, linear.weight.t())


def _ragged_codes(sae: SparseAutoencoder, pre: torch.Tensor, centered: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, Ragged]:
    """The encoder outputs at entries ``(rows, cols)`` (row-major sorted), differentiable at those entries only."""
    linear = sae.encoder.encoder
    pattern = Ragged.of(rows, cols, len(pre), sae.cfg.dict_size)
    return SelectedLatents.apply(pre[rows, cols], centered, linear.weight, linear.bias, pattern), pattern


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


class Rule:
    """A sparsity rule. Subclasses set the class attributes and override what differs."""

    name = ""
    fixed_k = False  # every row has exactly top_k codes: encode_topk means something
    encoder_init_scale = 1.0  # decoder_transpose times this, by default
    lr_scale = 1.0  # the default learning rate is this times top_k's (TrainConfig.lr)
    decoder_lr_scale = 1.0  # the decoder's default learning rate is this times the rest's
    named_keys: frozenset[str] = frozenset()  # the grid keys run_name shows (besides sparsity and dict_size)
    saelens: str | None = None  # the architecture SAELens saves it as (None: not exportable)
    dictionary_learning: str | None = None  # the dictionary_learning class

    # -- configuration ---------------------------------------------------------------------------

    def tensors(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Extra tensors of the rule, saved beside the weights: name -> shape."""
        return {}

    def run_name(self, cfg: SAEConfig, train_cfg: TrainConfig | None = None) -> str:
        """A run's name: the rule, the size and what sets the sparsity (``topk-d4096-k32``), so that two
        dictionaries of one grid never share one (a sweep finds its members' runs by name).
        ``train_cfg`` is resolved (its coefficients filled in); without it the coefficient is left out."""
        return f"{self.name.replace('_', '')}-d{cfg.dict_size}" + (f"-k{cfg.top_k}" if self.name in K_RULES else "")

    def add_tensors(self, encoder: SparseEncoder) -> None:
        """Register the rule's tensors on ``encoder``."""

    def active_fraction(self, cfg: SAEConfig) -> float:
        """Expected fraction of latents active per token once trained (for cost estimates)."""
        return min(1.0, cfg.top_k / cfg.dict_size)

    def cost_per_token(self, cfg: SAEConfig) -> float:
        """Estimated multiply-adds of one training token: the dense encoder product (forward, and
        backward when the step is dense) plus the sparse work at the active latents."""
        active = self.active_fraction(cfg) * cfg.dict_size
        return cfg.input_size * (cfg.dict_size + 6 * active)

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
             dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total loss, auxiliary loss)`` of one step; ``ramp`` in (0, 1] warms up the sparsity penalty."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, out: Codes, cfg: TrainConfig, step: int) -> None:
        """Anything the rule updates after optimiser step ``step`` (0-based): an estimated threshold, a projection."""

    @torch.no_grad()
    def calibrate(self, sae: SparseAutoencoder, batches) -> None:
        """Set, once training is over, what inference estimates from data (raw training ``batches``)."""

    def stats(self, out: Codes, batch: int, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fired [dict_size] bool, mean L0)`` of a step's codes; nothing waits for the device."""
        active = out.hidden_acts > 0
        if out.indices is None:
            return active.any(0), active.sum(-1).float().mean()
        counts = torch.zeros(dict_size, device=active.device).index_add_(0, out.indices.flatten(),
                                                                          active.flatten().float())
        return counts > 0, active.sum().float() / batch


class TopK(Rule):
    name, fixed_k = "top_k", True
    named_keys = frozenset({"k"})
    saelens, dictionary_learning = "topk", "AutoEncoderTopK"

    def encode(self, encoder, x_n):
        # select among the encoder outputs, ReLU the k chosen only: ReLU-then-top-k without a dense ReLU
        values, indices = encoder.encoder(x_n - encoder.b_dec).topk(encoder.cfg.top_k, dim=-1, sorted=False)
        return values.clamp_min(0), indices

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        from .sae import Codes

        centered = x_n - sae.b_dec
        linear = sae.encoder.encoder
        if not sparse_backward:
            pre = _linear_pre(sae, x_n)
        else:
            with torch.no_grad():
                low = select_dtype is not None and select_dtype != linear.weight.dtype
                dtype = select_dtype if low else linear.weight.dtype
                pre = torch.addmm(linear.bias.to(dtype), centered.to(dtype), linear.weight.to(dtype).t())
        indices = pre.detach().topk(sae.cfg.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
        values, decoded = sae.decode_latents(pre, centered, indices)
        return Codes(decoded + sae.b_dec, values, indices, pre, centered)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        from .sae import SparseAutoencoder, auxk_loss

        loss = SparseAutoencoder.loss(x_n, out.reconstruction, out.hidden_acts, cfg.l1_coeff * ramp)
        aux = x_n.new_zeros(())
        if cfg.aux_coeff > 0:
            aux = auxk_loss(sae, x_n, out, dead, cfg.aux_k)
            loss = loss + cfg.aux_coeff * aux
        return loss, aux


class _SparseWhenSmall(Rule):
    """l1 and jumprelu: dense codes, whose step runs on the active entries once they are few."""

    def active_fraction(self, cfg):
        return min(1.0, 32 / cfg.dict_size)  # what the defaults reach on the demo store (about L0 30)

    def _cut(self, sae: SparseAutoencoder) -> torch.Tensor:
        """The value above which an encoder output is kept on the sparse step (per latent or scalar)."""
        return torch.zeros(())

    def margin(self, cfg: TrainConfig | None) -> float:
        """Entries within this below the cut are kept on the sparse step (the estimator's band)."""
        return 0.0

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        from .sae import Codes

        centered = x_n - sae.b_dec
        # the choice uses the last step's fraction: one host sync per step (the count), no second pass
        if not sparse_backward or sae.active_fraction >= SPARSE_BELOW:
            pre = _linear_pre(sae, x_n)
            with torch.no_grad():
                sae.active_fraction = float((pre > self._cut(sae)).float().mean())
            codes = self.activate(sae, pre, cfg)
            return Codes(codes @ sae.W_dec + sae.b_dec, codes, None, pre, centered)
        pre = _pre_no_grad(sae, centered)
        with torch.no_grad():
            rows, cols = (pre > self._cut(sae) - self.margin(cfg)).nonzero(as_tuple=True)
            sae.active_fraction = float((pre > self._cut(sae)).float().mean())
        values, pattern = _ragged_codes(sae, pre, centered, rows, cols)
        values = self.activate(sae, values, cfg, cols)
        decoded = SparseDecode.apply(values, sae.W_dec, pattern)
        return Codes(decoded + sae.b_dec, values, cols, pre, centered, rows)

    def activate(self, sae: SparseAutoencoder, pre: torch.Tensor, cfg: TrainConfig | None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of encoder outputs ``pre`` (dense, or at latents ``cols``), differentiable."""
        raise NotImplementedError

    def stats(self, out, batch, dict_size):
        if out.rows is None:
            return super().stats(out, batch, dict_size)
        active = (out.hidden_acts > 0).float()
        fired = torch.zeros(dict_size, device=active.device).index_add_(0, out.indices, active) > 0
        return fired, active.sum() / batch


class L1(_SparseWhenSmall):
    name = "l1"
    named_keys = frozenset({"l1_coeff"})
    encoder_init_scale = 0.1  # codes start dense: see train.py
    saelens, dictionary_learning = "standard", "AutoEncoder"

    def run_name(self, cfg, train_cfg=None):
        return super().run_name(cfg) + (f"-l1c{train_cfg.l1_coeff:g}" if train_cfg is not None else "")

    def activate(self, sae, pre, cfg, cols=None):
        return F.relu(pre)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        from .sae import SparseAutoencoder

        if out.rows is None:
            return SparseAutoencoder.loss(x_n, out.reconstruction, out.hidden_acts, cfg.l1_coeff * ramp), x_n.new_zeros(())
        mse = (out.reconstruction - x_n).pow(2).mean()
        return mse + cfg.l1_coeff * ramp * out.hidden_acts.abs().sum() / len(x_n), x_n.new_zeros(())


class JumpReLU(_SparseWhenSmall):
    name = "jumprelu"
    named_keys = frozenset({"l0_coeff", "target_l0"})
    encoder_init_scale = 0.1  # as SAELens's decoder_init_norm 0.1 with encoder = decoder transpose
    # SAELens's decoder rows start at norm 0.1 and are free, so a row turns about ten times faster than
    # ours (kept at unit norm); as for batch_top_k, the decoder at 3x: on rule_quality.py's case (target
    # L0 32, lr 3e-3, first threshold 0.3) FVU 0.0738 at L0 86.5 against 0.0790 at L0 94.1 at 1x, and
    # from 0.35, 0.0783 at L0 64.0 against 0.0845 at L0 70.6
    decoder_lr_scale = 3.0
    saelens, dictionary_learning = "jumprelu", "JumpReluAutoEncoder"

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
        return _bandwidth(cfg) / 2

    def activate(self, sae, pre, cfg, cols=None):
        t = sae.encoder.threshold if cols is None else sae.encoder.threshold[cols]
        return _Threshold.apply(pre, t, _bandwidth(cfg), False)

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
        return loss, aux

    @torch.no_grad()
    def after_step(self, sae, out, cfg, step):
        sae.encoder.threshold.clamp_(min=0.0)  # below zero the gate would pass negative outputs


class BatchTopK(Rule):
    name = "batch_top_k"
    named_keys = frozenset({"k"})
    # measured on MiniLM (d 384, k 32; benchmarks/rule_quality.py's case: dict_size 4096, batch 4096, 800 k
    # tokens). With one rate for all: FVU 0.155 at top_k's 1e-3, 0.104 at 3e-3, 0.091 at 6e-3, 0.102 at
    # 1.2e-2. With the decoder at 3x (SAELens's decoder is weight-normalised: a row's step is lr / its
    # norm, 0.1 at first): 0.092 at 3e-3, 0.087 at 6e-3, where SAELens's best was 0.087; matryoshka
    # (inheriting) 0.102 against 0.111 at 6e-3, SAELens's best 0.113. At dict_size 1024 (batch 2048, 300 k
    # tokens) 3x top_k's rate is 6e-3: FVU 0.125 with the decoder at 3x (0.128 at 1x), and 6x (1.2e-2)
    # left 10 % of the latents dead (0.142). So 3x, and the decoder at 3x that.
    lr_scale = 3.0
    decoder_lr_scale = 3.0
    saelens, dictionary_learning = "jumprelu", "BatchTopKSAE"

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
        pre = _pre_no_grad(sae, centered) if sparse_backward else _linear_pre(sae, x_n)
        with torch.no_grad():
            flat = pre.detach().flatten().topk(sae.cfg.top_k * len(x_n), sorted=False).indices.sort().values
            rows, cols = flat.div(sae.cfg.dict_size, rounding_mode="floor"), flat % sae.cfg.dict_size
        return centered, pre, rows, cols

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        from .sae import Codes

        centered, pre, rows, cols = self.select(sae, x_n, sparse_backward)
        if not sparse_backward:
            values = pre[rows, cols].clamp_min(0)
            codes = torch.zeros_like(pre).index_put((rows, cols), values)
            return Codes(codes @ sae.W_dec + sae.b_dec, values, cols, pre, centered, rows)
        values, pattern = _ragged_codes(sae, pre, centered, rows, cols)
        values = values.clamp_min(0)
        return Codes(SparseDecode.apply(values, sae.W_dec, pattern) + sae.b_dec, values, cols, pre, centered, rows)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        return _batch_loss(sae, x_n, out, cfg, ramp, dead, (out.reconstruction - x_n).pow(2).mean())

    def stats(self, out, batch, dict_size):
        return _SparseWhenSmall.stats(self, out, batch, dict_size)

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


class Matryoshka(BatchTopK):
    name = "matryoshka"
    named_keys = frozenset({"k", "prefixes"})
    saelens, dictionary_learning = "jumprelu", "MatryoshkaBatchTopKSAE"

    def run_name(self, cfg, train_cfg=None):
        return super().run_name(cfg) + "-p" + ".".join(map(str, cfg.prefix_ends))

    def forward_train(self, sae, x_n, cfg, sparse_backward, select_dtype):
        from .sae import Codes

        ends = torch.tensor(prefix_ends(sae.cfg), device=x_n.device)
        centered, pre, rows, cols = self.select(sae, x_n, sparse_backward)
        groups = len(ends)
        group = torch.searchsorted(ends, cols, right=True)  # cols sorted within a row: so are groups
        if not sparse_backward:
            values = pre[rows, cols].clamp_min(0)
            parts = [torch.zeros_like(pre).index_put((rows[group == g], cols[group == g]), values[group == g])
                     @ sae.W_dec for g in range(groups)]
            decoded = torch.stack(parts, 1)
        else:
            values, pattern = _ragged_codes(sae, pre, centered, rows, cols)
            values = values.clamp_min(0)
            by_group = pattern.regrouped(rows * groups + group, len(x_n) * groups)
            decoded = SparseDecode.apply(values, sae.W_dec, by_group).view(len(x_n), groups, -1)
        prefixes = decoded.cumsum(1) + sae.b_dec  # [batch, groups, d]: reconstruction of each prefix
        return Codes(prefixes[:, -1], values, cols, pre, centered, rows, prefixes)

    def loss(self, sae, x_n, out, cfg, ramp, dead):
        return _batch_loss(sae, x_n, out, cfg, ramp, dead, (out.prefixes - x_n[:, None]).pow(2).mean((0, 2)).sum())


def _batch_loss(sae, x_n, out, cfg, ramp, dead, mse) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rules' loss over entries ``out.rows``/``out.indices``: ``mse`` (+ an L1 term if asked) + the auxiliary loss."""
    from .sae import auxk_loss

    loss = mse
    if cfg.l1_coeff:
        loss = loss + cfg.l1_coeff * ramp * out.hidden_acts.abs().sum() / len(x_n)
    aux = x_n.new_zeros(())
    if cfg.aux_coeff > 0:
        aux = auxk_loss(sae, x_n, out, dead, cfg.aux_k)
        loss = loss + cfg.aux_coeff * aux
    return loss, aux


def _batch_top_k_dense(acts: torch.Tensor, k: int) -> torch.Tensor:
    top = acts.flatten().topk(min(k * len(acts), acts.numel()), sorted=False)
    return torch.zeros_like(acts).flatten().scatter_(0, top.indices, top.values).view_as(acts)


def prefix_ends(cfg: SAEConfig) -> tuple[int, ...]:
    """Matryoshka's prefix ends (increasing, the last is dict_size): ``cfg.prefix_ends``."""
    return cfg.prefix_ends


def _bandwidth(cfg: TrainConfig | None) -> float:
    from .config import TrainConfig

    return (cfg or TrainConfig()).jumprelu_bandwidth


RULES: dict[str, Rule] = {r.name: r for r in (TopK(), L1(), BatchTopK(), JumpReLU(), Matryoshka())}


def rule_of(name: str) -> Rule:
    """The rule called ``name``; an unknown one is an error naming the choices."""
    try:
        return RULES[name]
    except KeyError:
        raise SAERegistryError(f"sparsity must be one of {', '.join(RULES)}, got {name!r}") from None
