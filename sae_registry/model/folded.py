"""A dictionary in the form the field shares: folded weights and SAEBench's view of it.

Every SAE that SAELens, dictionary_learning and SAEBench handle computes on raw activations
``codes = sparsify(ReLU((x - b_dec) @ W_enc + b_enc))``, ``x_hat = codes @ W_dec + b_dec``. Ours
first scales inputs by ``input_scale``; :func:`folded_weights` folds that scale into the weights
(see :mod:`sae_registry.interchange` for the algebra) and :func:`from_weights` builds a dictionary
back from such weights. :class:`SAEBenchConfig` is the ``cfg`` SAEBench's custom-SAE interface
reads. ``Dictionary`` exposes both without importing the exporters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..config.options import SAEConfig
from ..errors import SAERegistryError
from .sae import SparseAutoencoder

__all__ = ["SAEBenchConfig", "Weights", "folded_weights", "from_weights", "hook_layer", "saebench_config"]


class Weights(NamedTuple):
    """Folded weights: ``codes = sparsify(ReLU((x - b_dec) @ W_enc + b_enc))``, ``x_hat = codes @ W_dec + b_dec``."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]


@torch.no_grad()
def folded_weights(sae: SparseAutoencoder) -> Weights:
    """The weights of ``sae`` with its ``input_scale`` folded in (see the module docstring)."""
    s = sae.input_scale
    W = sae.encoder.encoder.weight
    if float(s) == 1.0:  # bit for bit: no rounding from a multiply by one, no copy
        return Weights(W.detach().T, sae.encoder.encoder.bias.detach(), sae.W_dec.detach(), sae.b_dec.detach())
    return Weights((W.T * s).contiguous(), sae.encoder.encoder.bias.detach().clone(), sae.W_dec / s, sae.b_dec / s)


@torch.no_grad()
def from_weights(weights: Weights, top_k: int | None, sparsity: str | None = None,
                 threshold: torch.Tensor | None = None, prefixes: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> SparseAutoencoder:
    """A dictionary (``input_scale`` 1) computing exactly ``weights``; ``top_k`` None means ReLU (sparsity l1)
    unless ``sparsity`` says otherwise (jumprelu, batch_top_k, matryoshka: with their ``threshold``; gated:
    its other ``tensors`` by name, ``r_mag`` and ``b_mag``)."""
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    W_enc, b_enc, W_dec, b_dec = (torch.as_tensor(w).detach().to("cpu", torch.float32) for w in weights)
    if W_enc.ndim != 2:
        raise SAERegistryError(f"W_enc must be a matrix [d_in, d_sae], got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    for name, w, shape in zip(names, (W_enc, b_enc, W_dec, b_dec), ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))):
        if tuple(w.shape) != shape:
            raise SAERegistryError(f"{name} has shape {tuple(w.shape)}; W_enc [{d_in}, {d_sae}] implies {shape}")
        if not torch.isfinite(w).all():
            raise SAERegistryError(f"{name} holds NaN or Inf")
    sparsity = sparsity or ("l1" if top_k is None else "top_k")
    cfg = SAEConfig(input_size=d_in, dict_size=d_sae, top_k=top_k or min(32, d_sae), sparsity=sparsity,
                    prefixes=prefixes)
    sae = SparseAutoencoder(cfg)
    if threshold is not None:
        threshold = torch.as_tensor(threshold).to(torch.float32)
        ours = sae.encoder.rule_tensor("threshold")
        if threshold.shape != ours.shape or not torch.isfinite(threshold).all():
            raise SAERegistryError(f"threshold has shape {tuple(threshold.shape)}; a {sparsity} dictionary of "
                                   f"{d_sae} latents needs {tuple(ours.shape)}, finite")
        ours.copy_(threshold)
    for name, shape in sae.rule.tensors(cfg).items():
        if name == "threshold":
            continue
        value = torch.as_tensor((tensors or {}).get(name, torch.empty(0))).to(torch.float32)
        if tuple(value.shape) != shape or not torch.isfinite(value).all():
            raise SAERegistryError(f"{name} has shape {tuple(value.shape)}; a {sparsity} dictionary of {d_sae} "
                                   f"latents needs {shape}, finite")
        sae.encoder.rule_tensor(name).copy_(value)
    sae.encoder.encoder.weight.copy_(W_enc.T)
    sae.encoder.encoder.bias.copy_(b_enc)
    sae.W_dec.copy_(W_dec)
    sae.b_dec.copy_(b_dec)
    sae.encoder.input_scale.fill_(1.0)
    return sae.eval()


@dataclass
class SAEBenchConfig:
    """The ``cfg`` SAEBench's custom-SAE interface reads (its ``CustomSAEConfig`` fields)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = ""
    activation_fn_kwargs: dict = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None


def saebench_config(cfg: SAEConfig, lineage: dict[str, str], device: torch.device, dtype: torch.dtype) -> SAEBenchConfig:
    """SAEBench's view of a dictionary: shape, architecture, and where its activations came from."""
    layer = hook_layer(lineage)
    layer = -1 if layer is None else layer
    top_k = cfg.sparsity == "top_k"
    return SAEBenchConfig(
        model_name=lineage.get("source.model", ""), d_in=cfg.input_size, d_sae=cfg.dict_size, hook_layer=layer,
        hook_name=lineage.get("source.hook", ""), architecture="topk" if top_k else "standard",
        activation_fn_str="topk" if top_k else "relu", activation_fn_kwargs={"k": cfg.top_k} if top_k else {},
        dtype=str(dtype).removeprefix("torch."), device=str(device), dataset_path=lineage.get("store.path", ""),
    )


def hook_layer(lineage: dict[str, str]) -> int | None:
    """The hook's block (SAELens's ``hook_layer``: L of ``blocks.L.*``), else the store's layer."""
    hook = re.match(r"blocks\.(\d+)\.", lineage.get("source.hook") or "")
    try:
        return int(hook.group(1)) if hook else int(lineage.get("source.layer", ""))
    except ValueError:
        return None
