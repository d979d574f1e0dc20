"""The sparse autoencoder: encoder dense(dict_size) + ReLU, sparsify (top-k or L1), decoder dense(input_size).

Follows the seed spec (``shared/seed/SparseAutoencoder.md``) and the training recipe of Gao et al.
2024 ("Scaling and evaluating sparse autoencoders"):

    x_n    = x * input_scale                       # inputs scaled to a fixed mean norm (sqrt(d))
    pre    = ReLU(W_enc (x_n - b_dec) + b_enc)      # [batch, dict_size]
    h      = TopK(pre)  or  pre                    # sparse codes ("hidden_acts")
    x_hat  = (h W_dec + b_dec) / input_scale       # reconstruction, in the input's own units

``input_scale`` is a buffer stored with the weights, so a loaded dictionary takes raw activations.
Codes ``h`` live in the scaled space. Rows of ``W_dec`` are the dictionary directions (kept at unit
norm by the trainer), which is also the layout a sparse ``(values, indices)`` decode wants.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SAERegistryError, require_positive_int

SPARSITY_MODES = ("top_k", "l1")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
DICTIONARY_FORMAT = "sae-registry/dictionary"


@dataclass(frozen=True)
class SAEConfig:
    """The shape of a dictionary. Validated on construction; errors name the field."""

    input_size: int
    dict_size: int = 4096
    top_k: int = 32
    sparsity: str = "top_k"

    def __post_init__(self) -> None:
        require_positive_int("input_size", self.input_size)
        require_positive_int("dict_size", self.dict_size)
        require_positive_int("top_k", self.top_k)
        if self.sparsity not in SPARSITY_MODES:
            raise SAERegistryError(
                f"sparsity must be one of {', '.join(SPARSITY_MODES)}, got {self.sparsity!r}"
            )
        if self.sparsity == "top_k" and self.top_k > self.dict_size:
            raise SAERegistryError(
                f"top_k ({self.top_k}) cannot exceed dict_size ({self.dict_size})"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        missing = set(cls.__dataclass_fields__) - set(known) - {"dict_size", "top_k", "sparsity"}
        if missing:
            raise SAERegistryError(f"SAE config is missing {sorted(missing)}")
        return cls(**known)


class Codes(NamedTuple):
    """What one training forward pass produces, all in the scaled input space."""

    reconstruction: torch.Tensor  # [batch, input_size]
    hidden_acts: torch.Tensor  # top_k: the k values [batch, k]; l1: dense codes [batch, dict_size]
    indices: torch.Tensor | None  # top_k: latent ids [batch, k]; l1: None
    pre_acts: torch.Tensor  # post-ReLU activations before sparsification [batch, dict_size]


def _check_input(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise SAERegistryError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != width:
        raise SAERegistryError(
            f"{what} must have last dimension {width}, got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise SAERegistryError(f"{what} contains NaN or Inf values")
    return x.reshape(-1, width)


class SparseEncoder(nn.Module):
    """The encoder portion: raw activations -> sparse codes ``[batch, dict_size]``.

    It owns what encoding needs: ``encoder`` (dense(dict_size)), the pre-encoder bias ``b_dec``
    (tied to the decoder bias, as in Gao et al.) and ``input_scale``.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.input_size, cfg.dict_size)
        self.b_dec = nn.Parameter(torch.zeros(cfg.input_size))
        self.register_buffer("input_scale", torch.ones(()))

    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Post-ReLU encoder activations of already-scaled inputs."""
        return F.relu(self.encoder(x_n - self.b_dec))

    def sparsify(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """top_k: the k largest activations per row as ``(values, indices)``; l1: ``(pre, None)``."""
        if self.cfg.sparsity == "l1":
            return pre, None
        return pre.topk(self.cfg.top_k, dim=-1, sorted=False)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact codes of raw inputs: ``(values [batch, k], indices [batch, k])`` (top_k only)."""
        if self.cfg.sparsity != "top_k":
            raise SAERegistryError("encode_topk needs sparsity='top_k'; use encode() for l1")
        x = _check_input(x, self.cfg.input_size, "input")
        values, indices = self.sparsify(self.pre_acts(x * self.input_scale))
        return values, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense sparse codes ``[batch, dict_size]`` of raw inputs (zeros outside the top k)."""
        shape = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        x = _check_input(x, self.cfg.input_size, "input")
        pre = self.pre_acts(x * self.input_scale)
        values, indices = self.sparsify(pre)
        codes = values if indices is None else torch.zeros_like(pre).scatter_(-1, indices, values)
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
        self.reset_parameters()

    # -- the seed API ------------------------------------------------------------------------

    @classmethod
    def build(
        cls, input_size: int, dict_size: int = 4096, top_k: int = 32, sparsity: str = "top_k"
    ) -> "SparseAutoencoder":
        """Build a sparse autoencoder; raises :class:`SAERegistryError` on bad options."""
        return cls(SAEConfig(input_size, dict_size, top_k, sparsity))

    @staticmethod
    def build_encoder(
        input_size: int, dict_size: int = 4096, top_k: int = 32, sparsity: str = "top_k"
    ) -> SparseEncoder:
        """Build the encoder portion only: a module returning sparse codes ``[batch, dict_size]``.

        A trained autoencoder's own encoder is ``sae.encoder``.
        """
        encoder = SparseEncoder(SAEConfig(input_size, dict_size, top_k, sparsity))
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
        mse = (reconstruction - input).pow(2).mean()
        if l1_coeff == 0:
            return mse
        return mse + l1_coeff * hidden_acts.abs().sum(-1).mean()

    @staticmethod
    def output_size(input_size: int, **_options: object) -> int:
        """The output width of the autoencoder: its input width."""
        return require_positive_int("input_size", input_size)

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
        return self._decode_sparse(values, indices) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of raw activations ``x``."""
        shape = x.shape if isinstance(x, torch.Tensor) else ()
        x = _check_input(x, self.cfg.input_size, "input")
        out = self.forward_train(x * self.input_scale).reconstruction / self.input_scale
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
        }

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``sae.safetensors`` + ``config.json`` (plus ``extra`` metadata) to ``directory``.

        No pickle: the weights are safetensors, everything else JSON.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_tensors().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": DICTIONARY_FORMAT})
        config = {"format": DICTIONARY_FORMAT, "format_version": 1, "sae": self.cfg.to_dict()}
        config.update(extra or {})
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Rebuild a dictionary from ``sae.safetensors`` + ``config.json``; checks every shape."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise SAERegistryError(f"{directory} holds no {name}; it is not a saved dictionary")
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise SAERegistryError(f"{directory / CONFIG_FILE} is not valid JSON: {e}") from e
        if not isinstance(config, dict) or not isinstance(config.get("sae"), dict):
            raise SAERegistryError(f"{directory / CONFIG_FILE} has no 'sae' section")
        sae = cls(SAEConfig.from_dict(config["sae"]))
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise SAERegistryError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
        expected = sae.state_tensors()
        if set(tensors) != set(expected):
            raise SAERegistryError(
                f"{directory / WEIGHTS_FILE} holds {sorted(tensors)}, expected {sorted(expected)}"
            )
        with torch.no_grad():
            for name, target in expected.items():
                if tensors[name].shape != target.shape:
                    raise SAERegistryError(
                        f"{name} in {directory / WEIGHTS_FILE} has shape {tuple(tensors[name].shape)}, "
                        f"config.json implies {tuple(target.shape)}"
                    )
                if not torch.isfinite(tensors[name]).all():
                    raise SAERegistryError(f"{name} in {directory / WEIGHTS_FILE} holds NaN or Inf")
                target.copy_(tensors[name])
        return sae.to(device).eval()

    # -- training ------------------------------------------------------------------------------

    def forward_train(self, x_n: torch.Tensor) -> Codes:
        """One unchecked pass over already-scaled inputs, as the trainer needs it.

        top_k decodes from ``(values, indices)`` with an embedding-bag, so the decoder touches
        only the k selected rows of ``W_dec`` per token.
        """
        pre = self.encoder.pre_acts(x_n)
        values, indices = self.encoder.sparsify(pre)
        if indices is None:
            recon = values @ self.W_dec + self.b_dec
        else:
            recon = self._decode_sparse(values, indices)
        return Codes(recon, values, indices, pre)

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

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
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the part of each decoder row's gradient that would change its norm.

        With the rows renormalised after every step, that part is wasted (and fights Adam).
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec


def auxk_loss(
    sae: SparseAutoencoder,
    x_n: torch.Tensor,
    out: Codes,
    dead_mask: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """Gao et al.'s auxiliary loss that revives dead latents (top_k mode).

    The ``k_aux`` largest pre-activations among *dead* latents try to reconstruct the main
    model's residual; gradients flow only into those latents. Normalised by the residual's
    variance around its mean so that its scale does not depend on the data.
    """
    num_dead = int(dead_mask.sum())
    if num_dead == 0:
        return x_n.new_zeros(())
    k = min(k_aux, num_dead)
    residual = (x_n - out.reconstruction).detach()
    dead_pre = out.pre_acts.masked_fill(~dead_mask, -math.inf)
    values, indices = dead_pre.topk(k, dim=-1, sorted=False)
    values = values.clamp_min(0)
    residual_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    total_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / total_var * min(num_dead / k_aux, 1.0)
