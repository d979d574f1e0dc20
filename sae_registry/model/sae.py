"""The sparse autoencoder: encoder dense(dict_size), a sparsity rule, decoder dense(input_size).

Follows the seed spec (``shared/seed/SparseAutoencoder.md``) and the training recipe of Gao et al.
2024 ("Scaling and evaluating sparse autoencoders"):

    x_n    = x * input_scale                       # inputs scaled to a fixed mean norm (sqrt(d))
    pre    = ReLU(W_enc (x_n - b_dec) + b_enc)      # [batch, dict_size]
    h      = TopK(pre)  or  pre                    # sparse codes ("hidden_acts"); the rule decides
    #                                                (architectures/: one file per rule)
    x_hat  = (h W_dec + b_dec) / input_scale       # reconstruction, in the input's own units

``input_scale`` is a buffer stored with the weights, so a loaded dictionary takes raw activations.
Codes ``h`` live in the scaled space. Rows of ``W_dec`` are the dictionary directions (kept at unit
norm by the trainer), which is also the layout a sparse ``(values, indices)`` decode wants.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures.base import Codes, Rule, mse_plus_l1
from ..architectures.catalogue import names, rule_of
from ..architectures.kernels import Pattern, SelectedLatents, SparseDecode
from ..config.options import MAX_DICT_SIZE, MAX_INPUT_SIZE, SAEConfig, TrainConfig
from ..errors import SAERegistryError, require_choice, require_float, require_int, require_positive_int
from . import files


def _checked_config(input_size: object, dict_size: object, top_k: object, sparsity: object) -> SAEConfig:
    """The seed API's arguments checked one by one (errors name the argument), then as a config."""
    return SAEConfig(require_int("input_size", require_positive_int("input_size", input_size), max=MAX_INPUT_SIZE),
                     require_int("dict_size", require_positive_int("dict_size", dict_size), max=MAX_DICT_SIZE),
                     require_positive_int("top_k", top_k), require_choice("sparsity", sparsity, names()))


def _check_input(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise SAERegistryError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != width:
        raise SAERegistryError(
            f"{what} must have last dimension {width}, got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise SAERegistryError(f"{what} contains NaN or Inf values; drop or fix those rows first")
    return x.reshape(-1, width)


class SparseEncoder(nn.Module):
    """The encoder portion: raw activations -> sparse codes ``[batch, dict_size]``.

    It owns what encoding needs: ``encoder`` (dense(dict_size)), the pre-encoder bias ``b_dec``
    (tied to the decoder bias, as in Gao et al.) and ``input_scale``.
    """

    input_scale: torch.Tensor  # a buffer

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.input_size, cfg.dict_size)
        self.b_dec = nn.Parameter(torch.zeros(cfg.input_size))
        self.register_buffer("input_scale", torch.ones(()))
        self.rule.add_tensors(self)  # e.g. a threshold

    @property
    def rule(self) -> Rule:
        """The sparsity rule (:mod:`sae_registry.architectures`) of this dictionary."""
        return rule_of(self.cfg.sparsity)

    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Post-ReLU encoder activations of already-scaled inputs."""
        return F.relu(self.encoder(x_n - self.b_dec))

    def rule_tensor(self, name: str) -> torch.Tensor:
        """One of the rule's own tensors (a threshold, gated's ``r_mag``), by its name in the weights file."""
        tensor = getattr(self, name)
        assert isinstance(tensor, torch.Tensor), name
        return tensor

    def sparsify(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference codes of already-scaled inputs, as the rule makes them: top_k ``(values,
        indices)`` of the k largest activations per row; the others ``(dense codes, None)``."""
        return self.rule.encode(self, x_n)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact codes of raw inputs: ``(values [batch, k], indices [batch, k])`` (top_k only).

        The other rules have no fixed number of codes per token (batch_top_k's mean is k, not
        each row's): an error, not a padded form that would look like a top-k result.
        """
        if not self.rule.arch.fixed_k:
            raise SAERegistryError(
                f"encode_topk needs sparsity top_k (a fixed k per token); this dictionary is "
                f"{self.cfg.sparsity}: use encode() for its codes")
        x = _check_input(x, self.cfg.input_size, "input")
        values, indices = self.sparsify(x * self.input_scale)
        assert indices is not None  # a fixed-k rule's codes come with their ids
        return values, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense sparse codes ``[batch, dict_size]`` of raw inputs (zeros outside the top k)."""
        shape = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        x = _check_input(x, self.cfg.input_size, "input")
        values, indices = self.sparsify(x * self.input_scale)
        if indices is not None:
            values = values.new_zeros(len(values), self.cfg.dict_size).scatter_(-1, indices, values)
        codes = values
        return codes.reshape(*shape, self.cfg.dict_size)


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder mapping ``[batch, input_size]`` to its reconstruction ``[batch, input_size]``.

    Build with :meth:`build`; ``encode``/``decode`` give codes and reconstructions, ``forward``
    the reconstruction. See the module docstring for the maths.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SparseEncoder(cfg)
        self.W_dec = nn.Parameter(torch.empty(cfg.dict_size, cfg.input_size))
        # l1 and jumprelu: the fraction of codes active at the last training step (their step
        # turns sparse once it is small; see architectures/base.py)
        self.active_fraction = 1.0
        self.reset_parameters()

    @property
    def rule(self) -> Rule:
        """The sparsity rule (:mod:`sae_registry.architectures`) of this dictionary."""
        return self.encoder.rule

    # -- the seed API ------------------------------------------------------------------------

    @classmethod
    def build(
        cls, input_size: int, dict_size: int = 4096, top_k: int = 32, sparsity: str = "top_k"
    ) -> SparseAutoencoder:
        """Build a sparse autoencoder; raises :class:`SAERegistryError` on bad options."""
        return cls(_checked_config(input_size, dict_size, top_k, sparsity))

    @staticmethod
    def build_encoder(
        input_size: int, dict_size: int = 4096, top_k: int = 32, sparsity: str = "top_k"
    ) -> SparseEncoder:
        """Build the encoder portion only: a module returning sparse codes ``[batch, dict_size]``.

        A trained autoencoder's own encoder is ``sae.encoder``.
        """
        encoder = SparseEncoder(_checked_config(input_size, dict_size, top_k, sparsity))
        SparseAutoencoder._init_weights(encoder, None)
        return encoder

    @staticmethod
    def loss(
        input: torch.Tensor,
        reconstruction: torch.Tensor,
        hidden_acts: torch.Tensor,
        l1_coeff: float = 1e-3,
    ) -> torch.Tensor:
        """Training loss: reconstruction MSE + ``l1_coeff`` * L1 penalty, a scalar.

        Normalisation: ``MSE = mean((reconstruction - input)**2)`` over batch *and* features;
        ``L1 = mean_over_batch(sum_over_latents(|hidden_acts|))``. ``hidden_acts`` may be the dense
        codes ``[batch, dict_size]`` or, for top_k, the k selected values ``[batch, k]``: zeros add
        nothing to the L1 sum, so both give the same number. With unit-norm decoder rows this is
        the decoder-norm-weighted L1 of Anthropic's recipe.
        """
        for name, value in (("input", input), ("reconstruction", reconstruction), ("hidden_acts", hidden_acts)):
            if not isinstance(value, torch.Tensor):
                raise SAERegistryError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        l1_coeff = require_float("l1_coeff", l1_coeff, min=0)
        if input.shape != reconstruction.shape:
            raise SAERegistryError(
                f"input {tuple(input.shape)} and reconstruction {tuple(reconstruction.shape)} "
                "must have the same shape"
            )
        if hidden_acts.shape[:-1] != input.shape[:-1]:
            raise SAERegistryError(
                f"hidden_acts {tuple(hidden_acts.shape)} must have the batch shape of input "
                f"{tuple(input.shape)}"
            )
        return mse_plus_l1(input, reconstruction, hidden_acts, l1_coeff)

    @staticmethod
    def output_size(input_size: int, **_options: object) -> int:
        """The output width of the autoencoder: its input width."""
        return require_int("input_size", require_positive_int("input_size", input_size), max=MAX_INPUT_SIZE)

    # -- use -----------------------------------------------------------------------------------

    @property
    def b_dec(self) -> nn.Parameter:
        return self.encoder.b_dec

    @property
    def input_scale(self) -> torch.Tensor:
        return self.encoder.input_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes ``[..., dict_size]`` of raw activations ``[..., input_size]``."""
        return self.encoder(x)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact top_k codes ``(values, indices)``, each ``[batch, k]``."""
        return self.encoder.encode_topk(x)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., input_size]`` (raw units) from dense codes ``[..., dict_size]``."""
        shape = h.shape[:-1] if isinstance(h, torch.Tensor) else ()
        h = _check_input(h, self.cfg.dict_size, "codes")
        out = (h @ self.W_dec + self.b_dec) / self.input_scale
        return out.reshape(*shape, self.cfg.input_size)

    def decode_topk(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction (raw units) from compact codes ``(values, indices)``."""
        if values.shape != indices.shape or values.ndim != 2:
            raise SAERegistryError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be "
                "[batch, k]"
            )
        return (self._decode_sparse(values, indices) + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of raw activations ``x``."""
        shape = x.shape if isinstance(x, torch.Tensor) else ()
        x = _check_input(x, self.cfg.input_size, "input")
        if self.rule.arch.fixed_k:
            out = self.forward_train(x * self.input_scale).reconstruction / self.input_scale
        else:  # the inference codes (batch_top_k: its threshold, not this batch's top k * batch)
            codes, _ = self.encoder.sparsify(x * self.input_scale)
            out = (codes @ self.W_dec + self.b_dec) / self.input_scale
        return out.reshape(shape)

    # -- files ---------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their file names (stable, independent of module layout)."""
        return {
            "W_enc": self.encoder.encoder.weight,
            "b_enc": self.encoder.encoder.bias,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "input_scale": self.input_scale,
            **{name: self.encoder.rule_tensor(name) for name in self.rule.tensors(self.cfg)},
        }

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``sae.safetensors`` + ``config.json`` (plus ``extra`` metadata) to ``directory``.

        No pickle: the weights are safetensors, everything else JSON (see :mod:`sae_registry.model.files`).
        """
        return files.write(self, directory, extra)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Rebuild a dictionary from ``sae.safetensors`` + ``config.json``; checks every shape before
        allocating anything (see :func:`sae_registry.model.files.read`). ``device`` may be ``auto``."""
        return files.read(cls, directory, device)

    # -- training ------------------------------------------------------------------------------

    def forward_train(self, x_n: torch.Tensor, sparse_backward: bool = True,
                      select_dtype: torch.dtype | None = None, cfg=None) -> Codes:
        """One unchecked pass over already-scaled inputs, as the trainer needs it; the rule makes it
        (``cfg``: the run's TrainConfig, for rule options such as JumpReLU's bandwidth).

        top_k selects the k largest encoder outputs and applies the ReLU to those k only (the
        same codes as ReLU-then-top-k), decodes from ``(values, indices)`` with an embedding-bag,
        and, with ``sparse_backward``, differentiates only the selected latents (see
        :class:`~sae_registry.architectures.kernels.SelectedLatents`): the dense encoder product is then the only
        ``[batch, dict_size]`` work of a step. ``sparse_backward=False`` is plain autograd through
        the dense product (same numbers, about three times the work). batch_top_k and matryoshka
        select k * batch over the batch and differentiate the same way; l1 and jumprelu run the
        dense product and, once few codes are active, the rest at the active entries only.

        ``select_dtype`` (sparse path only, e.g. ``torch.bfloat16``) runs the dense product that
        *selects* the k latents in that dtype; the selected values are then recomputed exactly in
        the weights' dtype (k dot products per row), so only near-ties can pick differently.
        """
        return self.rule.forward_train(self, x_n, cfg or TrainConfig(), sparse_backward, select_dtype)

    def decode_latents(self, pre_acts: torch.Tensor, centered: torch.Tensor, indices: torch.Tensor,
                       relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The ReLU'd encoder outputs ``pre_acts`` at ``indices [batch, m]`` (signed ones with ``relu``
        False: abs_top_k's; each row's ids distinct and sorted; ``centered`` is the encoder's input) and
        their decoding without bias, both differentiable.

        On the sparse path (``pre_acts`` without a graph) the backward of both touches only these
        ``m`` latents per row (:mod:`sae_registry.architectures.kernels`).
        """
        if pre_acts.requires_grad:
            values = pre_acts.gather(1, indices)
            values = values.clamp_min(0) if relu else values
            return values, self._decode_sparse(values, indices)
        linear = self.encoder.encoder
        pattern = Pattern.of(indices, self.cfg.dict_size)
        with torch.no_grad():
            selected = pre_acts.gather(1, indices)
            if selected.dtype != linear.weight.dtype:  # chosen by a low-precision product: exact values
                selected = pattern.dots(centered, linear.weight) + linear.bias[indices]
        values = SelectedLatents.apply(selected, centered, linear.weight, linear.bias, *pattern)
        values = values.clamp_min(0) if relu else values
        return values, SparseDecode.apply(values, self.W_dec, *pattern)

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j values[b, j] * W_dec[indices[b, j]]``, without the bias: an embedding-bag."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gao et al. init: random unit-norm decoder rows; encoder = decoder transpose; zero biases."""
        self._init_weights(self.encoder, self.W_dec)

    @staticmethod
    @torch.no_grad()
    def _init_weights(encoder: SparseEncoder, W_dec: torch.Tensor | None) -> None:
        cfg = encoder.cfg
        directions = torch.randn(cfg.dict_size, cfg.input_size)
        directions /= directions.norm(dim=-1, keepdim=True)
        if W_dec is not None:
            W_dec.copy_(directions)
        encoder.encoder.weight.copy_(directions)
        encoder.encoder.bias.zero_()
        encoder.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale each decoder row (dictionary direction) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the part of each decoder row's gradient that would change its norm.

        With the rows renormalised after every step, that part is wasted (and fights Adam).
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec
