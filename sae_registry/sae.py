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
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import SPARSITY_MODES, SAEConfig  # noqa: F401  (declared torch-free, re-exported here)
from .errors import SAERegistryError, require_positive_int

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
DICTIONARY_FORMAT = "sae-registry/dictionary"

# The sparse backward uses CSR tensors, stable in use but still labelled beta by torch.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Codes(NamedTuple):
    """What one training forward pass produces, all in the scaled input space."""

    reconstruction: torch.Tensor  # [batch, input_size]
    hidden_acts: torch.Tensor  # top_k: the k values [batch, k]; l1: dense codes [batch, dict_size]
    indices: torch.Tensor | None  # top_k: latent ids [batch, k]; l1: None
    pre_acts: torch.Tensor  # encoder outputs before ReLU [batch, dict_size] (no autograd graph on
    #                         the sparse path: SparseAutoencoder.decode_latents differentiates them)
    centered: torch.Tensor  # x_n - b_dec, the encoder's input [batch, input_size]


class _Pattern(NamedTuple):
    """Where a batch's codes are non-zero, in the two layouts the sparse backward needs.

    ``indices [batch, m]`` (sorted within each row) is the row-major layout; the CSR arrays of its
    transpose ``[dict_size, batch]`` (``crow``, ``col``, and ``order``, which sends a row-major
    entry to its place in them) let one sparse product gather every latent's rows at once.
    Built once per batch with a sort and a binary search (no host sync), shared by the encoder's
    and the decoder's backward.
    """

    indices: torch.Tensor
    order: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor

    @classmethod
    def of(cls, indices: torch.Tensor, dict_size: int) -> _Pattern:
        flat = indices.flatten()
        sorted_ids, order = flat.sort()
        crow = torch.searchsorted(sorted_ids, torch.arange(dict_size + 1, device=flat.device))
        return cls(indices, order, crow, order.div(indices.shape[1], rounding_mode="floor"))

    def gather_rows(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``out[i] = sum of weights[b, j] * dense[b] over (b, j) with indices[b, j] == i``: [dict_size, d]."""
        sparse = torch.sparse_csr_tensor(self.crow, self.col, weights.flatten()[self.order],
                                         (len(self.crow) - 1, len(dense)), check_invariants=False)
        return sparse @ dense

    def dots(self, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[b, j] = dense[b] . table[indices[b, j]]``: [batch, m], computed at the pattern only."""
        batch, m = self.indices.shape
        mask = torch.sparse_csr_tensor(
            torch.arange(0, batch * m + 1, m, device=dense.device), self.indices.flatten(),
            dense.new_ones(batch * m), (batch, len(table)), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, dense, table.t(), beta=0.0).values().view(batch, m)


class _SelectedLatents(torch.autograd.Function):
    """``pre[b, indices[b, j]]`` for ``pre = centered @ weight.T + bias``, differentiated sparsely.

    The forward receives those values already computed (the dense encoder product is the one
    unavoidable cost of top-k; it runs without an autograd graph). The backward touches only the
    selected latents: with ``g = grad [batch, m]``,

        grad_centered  = sum_j g[b, j] * weight[indices[b, j]]      (an embedding-bag of weight)
        grad_weight[i] = sum over (b, j) with indices[b, j] == i of g[b, j] * centered[b]
        grad_bias[i]   = sum over the same (b, j) of g[b, j]

    which is O(batch * m * input_size) instead of two dense ``[batch, dict_size]`` products.
    """

    @staticmethod
    def forward(ctx, values, centered, weight, bias, *pattern):
        ctx.save_for_backward(centered, weight, *pattern)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight, *pattern = ctx.saved_tensors
        pattern = _Pattern(*pattern)
        grad = grad.contiguous()
        grad_centered = F.embedding_bag(pattern.indices, weight, per_sample_weights=grad, mode="sum")
        grad_weight = pattern.gather_rows(grad, centered)
        grad_bias = grad.new_zeros(len(weight)).index_add_(0, pattern.indices.flatten(), grad.flatten())
        return None, grad_centered, grad_weight, grad_bias, *([None] * len(pattern))


class _SparseDecode(torch.autograd.Function):
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` (no bias), differentiated sparsely.

    Forward is an embedding-bag; backward computes ``grad_values`` as dot products at the pattern
    only (a sampled matmul) and ``grad_W_dec`` as one sparse product, each O(batch * m * d).
    """

    @staticmethod
    def forward(ctx, values, W_dec, *pattern):
        ctx.save_for_backward(values, W_dec, *pattern)
        return F.embedding_bag(pattern[0], W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, W_dec, *pattern = ctx.saved_tensors
        pattern = _Pattern(*pattern)
        grad = grad.contiguous()
        return pattern.dots(grad, W_dec), pattern.gather_rows(values, grad), *([None] * len(pattern))


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

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.input_size, cfg.dict_size)
        self.b_dec = nn.Parameter(torch.zeros(cfg.input_size))
        self.register_buffer("input_scale", torch.ones(()))

    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Post-ReLU encoder activations of already-scaled inputs."""
        return F.relu(self.encoder(x_n - self.b_dec))

    def sparsify(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes of already-scaled inputs: top_k ``(values, indices)`` of the k largest
        activations per row; l1 ``(dense codes, None)``.

        top_k selects among the encoder outputs and applies the ReLU to the k chosen only: the
        same codes as ReLU-then-top-k, without a dense ReLU pass.
        """
        if self.cfg.sparsity == "l1":
            return self.pre_acts(x_n), None
        values, indices = self.encoder(x_n - self.b_dec).topk(self.cfg.top_k, dim=-1, sorted=False)
        return values.clamp_min(0), indices

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact codes of raw inputs: ``(values [batch, k], indices [batch, k])`` (top_k only)."""
        if self.cfg.sparsity != "top_k":
            raise SAERegistryError("encode_topk needs sparsity='top_k'; use encode() for l1")
        x = _check_input(x, self.cfg.input_size, "input")
        return self.sparsify(x * self.input_scale)

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
        self.reset_parameters()

    # -- the seed API ------------------------------------------------------------------------

    @classmethod
    def build(
        cls, input_size: int, dict_size: int = 4096, top_k: int = 32, sparsity: str = "top_k"
    ) -> SparseAutoencoder:
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
        return (self._decode_sparse(values, indices) + self.b_dec) / self.input_scale

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
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Rebuild a dictionary from ``sae.safetensors`` + ``config.json``; checks every shape."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise SAERegistryError(f"{directory} holds no {name}; it is not a saved dictionary")
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SAERegistryError(f"{directory / CONFIG_FILE} is not valid JSON: {e}") from e
        if not isinstance(config, dict) or not isinstance(config.get("sae"), dict):
            raise SAERegistryError(f"{directory / CONFIG_FILE} has no 'sae' section")
        # format and sae are read; every other top-level key (train, store, metrics, lineage, ...:
        # what save(extra=...) wrote) is description only and never interpreted.
        if (config.get("format"), config.get("format_version")) != (DICTIONARY_FORMAT, 1):
            raise SAERegistryError(
                f"{directory / CONFIG_FILE} says format {config.get('format')!r} version "
                f"{config.get('format_version')!r}; this sae-registry reads {DICTIONARY_FORMAT!r} version 1"
            )
        try:
            sae = cls(SAEConfig.from_dict(config["sae"]))
        except SAERegistryError as e:
            raise SAERegistryError(f"{directory / CONFIG_FILE}: {e}; refusing to load it") from None
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

    def forward_train(self, x_n: torch.Tensor, sparse_backward: bool = True,
                      select_dtype: torch.dtype | None = None) -> Codes:
        """One unchecked pass over already-scaled inputs, as the trainer needs it.

        top_k selects the k largest encoder outputs and applies the ReLU to those k only (the
        same codes as ReLU-then-top-k), decodes from ``(values, indices)`` with an embedding-bag,
        and, with ``sparse_backward``, differentiates only the selected latents (see
        :class:`_SelectedLatents`): the dense encoder product is then the only
        ``[batch, dict_size]`` work of a step. ``sparse_backward=False`` is plain autograd through
        the dense product (same numbers, about three times the work); l1 always is.

        ``select_dtype`` (sparse path only, e.g. ``torch.bfloat16``) runs the dense product that
        *selects* the k latents in that dtype; the selected values are then recomputed exactly in
        the weights' dtype (k dot products per row), so only near-ties can pick differently.
        """
        centered = x_n - self.b_dec
        linear = self.encoder.encoder
        if self.cfg.sparsity == "l1" or not sparse_backward:
            # W (x - b_dec) + b_enc written as W x + (b_enc - W b_dec): b_dec's gradient through
            # the encoder is then a vector-matrix product, not a [batch, dict_size] product.
            pre = F.linear(x_n, linear.weight, linear.bias - linear.weight @ self.b_dec)
            if self.cfg.sparsity == "l1":
                codes = F.relu(pre)
                return Codes(codes @ self.W_dec + self.b_dec, codes, None, pre, centered)
        else:
            with torch.no_grad():
                low = select_dtype is not None and select_dtype != linear.weight.dtype
                dtype = select_dtype if low else linear.weight.dtype
                pre = torch.addmm(linear.bias.to(dtype), centered.to(dtype), linear.weight.to(dtype).t())
        indices = pre.detach().topk(self.cfg.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
        out = Codes(None, None, indices, pre, centered)
        values, decoded = self.decode_latents(out, indices)
        return out._replace(reconstruction=decoded + self.b_dec, hidden_acts=values)

    def decode_latents(self, out: Codes, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ReLU'd encoder outputs of ``out``'s batch at ``indices [batch, m]`` (each row's ids
        distinct and sorted) and their decoding without bias, both differentiable.

        On the sparse path (``out.pre_acts`` without a graph) the backward of both touches only
        these ``m`` latents per row (:class:`_SelectedLatents`, :class:`_SparseDecode`).
        """
        if out.pre_acts.requires_grad:
            values = out.pre_acts.gather(1, indices).clamp_min(0)
            return values, self._decode_sparse(values, indices)
        linear = self.encoder.encoder
        pattern = _Pattern.of(indices, self.cfg.dict_size)
        with torch.no_grad():
            selected = out.pre_acts.gather(1, indices)
            if selected.dtype != linear.weight.dtype:  # chosen by a low-precision product: exact values
                selected = pattern.dots(out.centered, linear.weight) + linear.bias[indices]
        values = _SelectedLatents.apply(selected, out.centered, linear.weight, linear.bias, *pattern).clamp_min(0)
        return values, _SparseDecode.apply(values, self.W_dec, *pattern)

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
    dead: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """Gao et al.'s auxiliary loss that revives dead latents (top_k mode).

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
        _, position = out.pre_acts.detach().index_select(1, dead).topk(k, dim=-1, sorted=False)
        indices = dead[position.sort(dim=-1).values]  # dead is sorted, so these rows are too
    _, residual_hat = sae.decode_latents(out, indices)
    total_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / total_var * min(len(dead) / k_aux, 1.0)
