"""Interchange with SAELens and dictionary_learning: their saved formats in and out, weights mapped exactly.

Every SAE this module maps, ours and theirs, computes on raw activations ``x [..., d_in]``

    codes = TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))     # top_k;  ReLU only for ReLU/L1 SAEs
    codes = ReLU(pre) * (pre > threshold)                  # jumprelu, batch_top_k, matryoshka
    codes = pre at the k largest |pre|, signed              # abs_top_k (SAELens abstopk)
    codes = (pre > 0) * ReLU(exp(r_mag) * (pre - b_enc) + b_mag)   # gated: b_enc is the gate's bias
    x_hat = codes @ W_dec + b_dec

(``pre = (x - b_dec) @ W_enc + b_enc``; the threshold is per latent for jumprelu, one number,
estimated in training, for batch_top_k and matryoshka; the codes are in the same units as ``pre``,
so folding ``input_scale`` leaves the threshold as it is, and gated's ``r_mag`` and ``b_mag`` too.)

with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``. Ours first scales inputs by ``input_scale`` s
(``model/sae.py``); folding s into the weights gives that same form with the same codes and reconstructions:

    W_enc = s * encoder.weight.T     b_enc = encoder.bias     W_dec = W_dec / s     b_dec = b_dec / s

which is what SAELens's own ``fold_activation_norm_scaling_factor`` does. These *folded* weights are
what :func:`folded_weights` returns, what ``Dictionary.W_enc`` etc. expose and what the exports hold;
an import is a dictionary with ``input_scale`` 1 holding them. With s = 1 (and for anything imported)
the mapping is bit for bit; otherwise ``s * W`` rounds, so codes agree to float32 rounding (same
top-k support on anything but near-ties). Note the decoder rows of a folded dictionary have norm
``1/s`` when ours are unit-norm: codes keep their meaning, the directions are the rows' directions.

Formats:

- **SAELens** (``sae-lens`` 6.x, ``SAE.load_from_disk(DIR)``): ``cfg.json`` + ``sae_weights.safetensors``
  (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``; ``threshold`` for jumprelu; gated: ``b_gate``, ``r_mag``,
  ``b_mag`` and no ``b_enc``). Architectures ``topk``, ``abstopk``, ``standard`` (ReLU), ``gated`` and
  ``jumprelu``, which is also how SAELens saves a trained BatchTopK or Matryoshka SAE for inference:
  ours are exported so, and a SAELens jumprelu imports as jumprelu. On import,
  ``apply_b_dec_to_input: false`` is folded into ``b_enc`` (``b_enc + b_dec @ W_enc``; gated: into
  ``b_gate`` so, and ``b_mag + exp(r_mag) * (b_dec @ W_enc)``) and topk's and abstopk's
  ``rescale_acts_by_decoder_norm`` into ``W_enc``/``b_enc``/``W_dec``; all exact reparametrisations.
  ``normalize_activations`` other than ``none``, ``reshape_activations: hook_z``, a ``scaling_factor``
  and the other architectures (a training-time batchtopk, temporal, ...) are refused.
- **dictionary_learning** (``dictionary-learning`` 0.1.0, ``AutoEncoderTopK.from_pretrained(DIR/ae.pt)``,
  ``AutoEncoder.from_pretrained(DIR/ae.pt, normalize_decoder=False)``): ``ae.pt`` (a torch state dict)
  + ``config.json`` (``{"trainer": {"dict_class": ...}}``, as its trainer writes). ``AutoEncoderTopK``
  (per-row top-k; its ``threshold`` buffer is only used with ``use_threshold=True`` and is ignored)
  , ``AutoEncoder`` (ReLU), ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE`` (inference with their
  ``threshold``, as their ``encode`` does by default: one whose threshold was never set, -1, would
  encode as plain ReLU there, and is refused both ways), ``JumpReluAutoEncoder`` (its ``b_dec`` is
  not subtracted from the input: folded into ``b_enc`` both ways, exact to float32 rounding),
  ``GatedAutoEncoder`` (``gate_bias`` is our ``b_enc``, ``mag_bias`` our ``b_mag``). A rule the catalogue
  gives no name in a format (abs_top_k in dictionary_learning) is refused on export, naming both.
  ``ae.pt`` is read with ``torch.load(weights_only=True)``: tensors only, no code runs.
  ``AutoEncoder.from_pretrained`` renormalises decoder columns by default, which rescales codes;
  ``normalize_decoder=False`` loads the weights as written (a no-op anyway when s = 1 and ours are
  unit-norm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._util.version import __version__
from ..architectures.catalogue import architecture
from ..config.options import SAEConfig
from ..errors import SAERegistryError, require_positive_int
from ..model.files import save_weights
from ..model.folded import Weights, folded_weights, from_weights, hook_layer
from ..model.sae import SparseAutoencoder

FORMATS = ("saelens", "dictionary_learning")
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# The lineage an export carries and an import restores (the model, hook and layer have fields of
# their own in both formats; the store has none in dictionary_learning's).
CARRIED_LINEAGE = ("store.path", "store.fingerprint", "source.model", "source.layer", "source.hook")
DL_WEIGHTS = "ae.pt"
DL_CONFIG = "config.json"
# The config format written: SAELens reads a config as pre-6.0 (and rewrites it) unless it says >= 6.
SAELENS_CONFIG_VERSION = "6.0.0"
SAELENS_ARCHITECTURES = ("topk", "standard", "jumprelu", "abstopk", "gated")
SAELENS_GATED = ("b_gate", "r_mag", "b_mag")  # SAELens's gated has these instead of b_enc
DL_CLASSES = ("AutoEncoderTopK", "AutoEncoder", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder",
              "GatedAutoEncoder")
DL_RULES = {"AutoEncoderTopK": "top_k", "AutoEncoder": "l1", "BatchTopKSAE": "batch_top_k",
            "MatryoshkaBatchTopKSAE": "matryoshka", "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}


# -- export -------------------------------------------------------------------------------------------


def _source_of(dictionary) -> tuple[SparseAutoencoder, dict[str, str], dict[str, str]]:
    """(sae, lineage, provenance) of a registry ``Dictionary`` or a bare ``SparseAutoencoder``."""
    if isinstance(dictionary, SparseAutoencoder):
        return dictionary, {}, {}
    sae = getattr(dictionary, "sae", None)
    if not isinstance(sae, SparseAutoencoder):
        raise SAERegistryError(f"can export a Dictionary or a SparseAutoencoder, got {type(dictionary).__name__}")
    provenance = {"family": dictionary.family, "version": dictionary.version}
    return sae, dict(dictionary.lineage), provenance


def export(dictionary, fmt: str, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``dictionary`` (a loaded ``Dictionary`` or a ``SparseAutoencoder``) in ``fmt`` to ``directory``.

    ``fmt`` is ``saelens`` (``cfg.json`` + ``sae_weights.safetensors``) or ``dictionary_learning``
    (``ae.pt`` + ``config.json``). The weights are the folded ones (module docstring): the other
    library's ``encode`` on raw activations gives our codes. Refuses to overwrite those files unless
    ``overwrite``.
    """
    if fmt not in FORMATS:
        raise SAERegistryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    sae, lineage, provenance = _source_of(dictionary)
    entry = architecture(sae.cfg.sparsity)
    if (entry.saelens if fmt == "saelens" else entry.dictionary_learning) is None:
        other = " or ".join(f for f in FORMATS if f != fmt)
        raise SAERegistryError(f"sparsity {sae.cfg.sparsity} has no {fmt} form (no {fmt} architecture computes its "
                               f"codes); export it as {other}, or use it here")
    threshold = getattr(sae.encoder, "threshold", None)
    if sae.cfg.sparsity in ("batch_top_k", "matryoshka") and float(threshold) < 0:
        raise SAERegistryError(
            f"threshold: this {sae.cfg.sparsity} dictionary has no inference threshold yet (it is estimated in "
            "training); train it before exporting, or the other library would encode with plain ReLU")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SAERegistryError(f"{directory} is a file; export into a directory (new, or one to overwrite)")
    files = (SAELENS_CONFIG, SAELENS_WEIGHTS) if fmt == "saelens" else (DL_WEIGHTS, DL_CONFIG)
    existing = [name for name in files if (directory / name).exists()]
    if existing and not overwrite:
        raise SAERegistryError(f"{directory} already holds {', '.join(existing)}; choose another directory or overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    weights = Weights(*(w.detach().float().cpu().contiguous() for w in folded_weights(sae)))
    provenance = {**provenance, "exported_by": f"sae-registry {__version__}", "input_scale": float(sae.input_scale)}
    # Where it came from, so that an import of these files finds its store again (cards, evaluate).
    carried = {k: v for k, v in lineage.items() if k in CARRIED_LINEAGE and v}
    if carried:
        provenance["lineage"] = carried
    if threshold is not None:
        threshold = threshold.detach().float().cpu().expand(sae.cfg.dict_size).contiguous()
    # the rule's other tensors (gated's r_mag, b_mag): the same folded or not
    extra = {name: getattr(sae.encoder, name).detach().float().cpu().contiguous()
             for name in sae.rule.tensors(sae.cfg) if name != "threshold"}
    if fmt == "saelens":
        _write_saelens(sae.cfg, weights, lineage, provenance, directory, threshold, extra)
    else:
        _write_dictionary_learning(sae.cfg, weights, lineage, provenance, directory, threshold, extra)
    return directory


def _write_saelens(cfg: SAEConfig, w: Weights, lineage: dict, provenance: dict, directory: Path,
                   threshold: torch.Tensor | None, extra: dict[str, torch.Tensor]) -> None:

    theirs = architecture(cfg.sparsity).saelens
    config = {
        "architecture": theirs,
        "d_in": cfg.input_size,
        "d_sae": cfg.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_CONFIG_VERSION,
            "model_name": lineage.get("source.model") or None,
            "hook_name": lineage.get("source.hook") or None,
            "hook_layer": hook_layer(lineage),
            "dataset_path": lineage.get("store.path") or None,
            "hook_head_index": None,
            "sae_registry": provenance,
        },
    }
    if theirs in ("topk", "abstopk"):
        config.update(k=cfg.top_k, rescale_acts_by_decoder_norm=False)
    tensors = {**w._asdict(), **({"threshold": threshold} if threshold is not None else {}), **extra}
    if theirs == "gated":  # our encoder's bias is the gate's
        tensors["b_gate"] = tensors.pop("b_enc")
    save_weights(tensors, directory / SAELENS_WEIGHTS)
    (directory / SAELENS_CONFIG).write_text(json.dumps(config, indent=2))


def _write_dictionary_learning(cfg: SAEConfig, w: Weights, lineage: dict, provenance: dict, directory: Path,
                               threshold: torch.Tensor | None, extra: dict[str, torch.Tensor]) -> None:

    top_k = cfg.sparsity in ("top_k", "batch_top_k", "matryoshka")
    dict_class = architecture(cfg.sparsity).dictionary_learning
    k = torch.tensor(cfg.top_k, dtype=torch.int)
    if dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):  # parameters in x @ W layouts
        state = {"W_enc": w.W_enc, "b_enc": w.b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
        if dict_class == "JumpReluAutoEncoder":  # it does not subtract b_dec from its input
            state.update(b_enc=w.b_enc - w.b_dec @ w.W_enc, threshold=threshold)
        else:
            ends = torch.tensor((0, *cfg.prefix_ends))
            state.update(k=k, threshold=threshold[0].clone(), group_sizes=ends.diff())
    else:
        # the others keep nn.Linear layouts: encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae].
        state = {"encoder.weight": w.W_enc.T.contiguous(), "encoder.bias": w.b_enc,
                 "decoder.weight": w.W_dec.T.contiguous()}
        if dict_class == "AutoEncoder":
            state["bias"] = w.b_dec
        elif dict_class == "GatedAutoEncoder":  # no encoder bias: ours is the gate's
            state.update(decoder_bias=w.b_dec, gate_bias=state.pop("encoder.bias"), r_mag=extra["r_mag"],
                         mag_bias=extra["b_mag"])
        else:  # -1: AutoEncoderTopK's "no inference threshold"; BatchTopKSAE's own, estimated in training
            state.update(b_dec=w.b_dec, k=k, threshold=torch.tensor(-1.0) if threshold is None else threshold[0].clone())
    trainer = {
        "dict_class": dict_class,
        "trainer_class": "sae_registry",  # not one of theirs: these weights were trained here
        "activation_dim": cfg.input_size,
        "dict_size": cfg.dict_size,
        "lm_name": lineage.get("source.model") or None,
        "layer": hook_layer(lineage),
        "submodule_name": lineage.get("source.hook") or None,
    }
    if top_k:
        trainer["k"] = cfg.top_k
    if cfg.sparsity == "matryoshka":
        trainer["group_sizes"] = state["group_sizes"].tolist()
    torch.save(state, directory / DL_WEIGHTS)
    (directory / DL_CONFIG).write_text(json.dumps({"trainer": trainer, "sae_registry": provenance}, indent=4))


# -- import -------------------------------------------------------------------------------------------


@dataclass
class Foreign:
    """A dictionary read from another library's files, mapped into ours."""

    sae: SparseAutoencoder
    format: str  # saelens | dictionary_learning
    architecture: str  # theirs: topk, standard, jumprelu, AutoEncoderTopK, BatchTopKSAE, ...
    origin: Path  # the directory read
    config: dict  # their config, as read
    config_file: Path | None
    weights_file: Path
    source: dict[str, str]  # source.model / .layer / .hook, store.path / .fingerprint: where their files say
    conversions: list[str] = field(default_factory=list)  # exact reparametrisations applied on the way in


def detect_format(directory: str | Path) -> str:
    """``saelens`` or ``dictionary_learning``, from the files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SAERegistryError(f"{directory} is not a directory")
    if (directory / SAELENS_CONFIG).is_file() and (directory / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (directory / DL_WEIGHTS).is_file():
        return "dictionary_learning"
    raise SAERegistryError(
        f"{directory} holds neither a SAELens SAE ({SAELENS_CONFIG} + {SAELENS_WEIGHTS}) nor a "
        f"dictionary_learning one ({DL_WEIGHTS} + {DL_CONFIG})"
    )


def read(directory: str | Path, fmt: str | None = None) -> Foreign:
    """Read a SAELens or dictionary_learning dictionary from ``directory`` (``fmt`` None: detect it)."""
    directory = Path(directory)
    fmt = detect_format(directory) if fmt is None else fmt
    if fmt == "saelens":
        return _read_saelens(directory)
    if fmt == "dictionary_learning":
        return _read_dictionary_learning(directory)
    raise SAERegistryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAERegistryError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise SAERegistryError(f"{path} must hold a JSON object")
    return data


def _positive_int(path: Path, name: str, value) -> int:
    """``value`` checked as a positive integer, the error naming the file it came from."""
    try:
        return require_positive_int(name, value)
    except SAERegistryError as e:
        raise SAERegistryError(f"{path}: {e}") from None


def _read_saelens(directory: Path) -> Foreign:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, weights_path = directory / SAELENS_CONFIG, directory / SAELENS_WEIGHTS
    cfg = _json(cfg_path)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    # Configs older than SAELens 6 name the activation instead of the architecture (as SAELens reads them).
    architecture = cfg.get("architecture")
    if architecture is None:
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if fn == "topk" and k is not None:
            architecture, cfg = "topk", {**cfg, "k": k}
        elif fn == "relu":
            architecture = "standard"
        else:
            raise SAERegistryError(f"{cfg_path}: activation_fn {fn!r} cannot be mapped exactly; supported: relu, topk")
    if architecture not in SAELENS_ARCHITECTURES:
        raise SAERegistryError(
            f"{cfg_path}: architecture {architecture!r} cannot be mapped exactly onto a sae-registry dictionary "
            f"(per-row top-k, ReLU, JumpReLU or gated); supported: {', '.join(SAELENS_ARCHITECTURES)}"
            + (" (save it for inference first: SAELens saves a trained BatchTopK or Matryoshka SAE as jumprelu)"
               if architecture in ("batchtopk", "matryoshka_batchtopk") else "")
        )
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize != "none":
        hint = (" (the scaling factor is not in these files: fold it first with SAELens's "
                "sae.fold_activation_norm_scaling_factor(factor) and save again)"
                if normalize == "expected_average_only_in" else "")
        raise SAERegistryError(
            f"{cfg_path}: normalize_activations {normalize!r} cannot be mapped exactly; only 'none' can{hint}"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise SAERegistryError(
            f"{cfg_path}: reshape_activations {cfg['reshape_activations']!r} is not supported: sae-registry "
            "dictionaries take flat [..., d_in] activations"
        )
    if cfg.get("finetuning_scaling_factor"):
        raise SAERegistryError(f"{cfg_path}: finetuning_scaling_factor is not supported")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise SAERegistryError(f"{weights_path} is not a readable safetensors file: {e}") from e
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling.float(), torch.ones_like(scaling, dtype=torch.float32)):
        raise SAERegistryError(f"{weights_path}: scaling_factor (a finetuning scale) is not supported")
    expected = {"W_enc", "W_dec", "b_dec", *(SAELENS_GATED if architecture == "gated" else ("b_enc",)),
                *(("threshold",) if architecture == "jumprelu" else ())}
    if set(tensors) != expected:
        raise SAERegistryError(
            f"{weights_path} holds {sorted(tensors)}; a {architecture} SAE has exactly {sorted(expected)}"
        )
    t = {name: v.to(torch.float32) for name, v in tensors.items()}
    if architecture == "gated":  # the gate's bias is our encoder's
        t["b_enc"] = t.pop("b_gate")
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    d_in = _positive_int(cfg_path, "d_in", cfg.get("d_in"))
    d_sae = _positive_int(cfg_path, "d_sae", cfg.get("d_sae"))
    if tuple(W_enc.shape) != (d_in, d_sae):
        raise SAERegistryError(f"{weights_path}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says [{d_in}, {d_sae}]")
    conversions = []
    with torch.no_grad():
        if not cfg.get("apply_b_dec_to_input", True):
            # relu(x @ W + b) == relu((x - b_dec) @ W + (b + b_dec @ W))
            b_enc = b_enc + b_dec @ W_enc
            if architecture == "gated":  # x @ (W * exp(r_mag)) + b_mag: its shift is scaled by exp(r_mag)
                t["b_mag"] = t["b_mag"] + t["r_mag"].exp() * (b_dec @ W_enc)
            conversions.append("apply_b_dec_to_input=false folded into b_enc")
        top_k, extra = None, {}
        if architecture == "jumprelu":
            extra = {"sparsity": "jumprelu", "threshold": t["threshold"]}
        if architecture == "abstopk":
            extra = {"sparsity": "abs_top_k"}
        if architecture == "gated":
            extra = {"sparsity": "gated", "tensors": {"r_mag": t["r_mag"], "b_mag": t["b_mag"]}}
        if architecture in ("topk", "abstopk"):
            top_k = _positive_int(cfg_path, "k", cfg.get("k"))
            if top_k > d_sae:
                raise SAERegistryError(f"{cfg_path}: k ({top_k}) exceeds d_sae ({d_sae})")
            if cfg.get("rescale_acts_by_decoder_norm"):
                # SAELens: codes = topk(pre * |W_dec rows|), decoded as (codes / |rows|) @ W_dec (abstopk alike).
                norms = W_dec.norm(dim=-1)
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
                conversions.append("rescale_acts_by_decoder_norm folded into W_enc, b_enc, W_dec")
    sae = from_weights(Weights(W_enc, b_enc, W_dec, b_dec), top_k, **extra)
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    source = {"source.model": metadata.get("model_name", cfg.get("model_name")), "source.hook": hook,
              "source.layer": metadata.get("hook_layer", cfg.get("hook_layer")),
              **_carried(metadata.get("sae_registry"), metadata.get("dataset_path", cfg.get("dataset_path")))}
    return Foreign(sae, "saelens", architecture, directory, cfg, cfg_path, weights_path,
                   {k: str(v) for k, v in source.items() if v is not None}, conversions)


def _carried(ours: object, dataset_path: object = None) -> dict[str, str]:
    """The lineage an export of ours carried (``sae_registry.lineage``), or a SAELens ``dataset_path``
    that is an activation store on this machine: ``store.path`` (+ ``store.fingerprint``)."""
    lineage = ours.get("lineage") if isinstance(ours, dict) else None
    found = {k: str(v) for k, v in (lineage if isinstance(lineage, dict) else {}).items()
             if k in CARRIED_LINEAGE and isinstance(v, (str, int, float)) and v != ""}
    if "store.path" not in found and isinstance(dataset_path, str) and (Path(dataset_path) / "zarr.json").is_file():
        found["store.path"] = dataset_path  # a SAELens dataset_path is usually a Hub name: kept only if a store
    return found


def _read_dictionary_learning(directory: Path) -> Foreign:
    weights_path, cfg_path = directory / DL_WEIGHTS, directory / DL_CONFIG
    if not cfg_path.is_file():
        raise SAERegistryError(
            f"{directory} has {DL_WEIGHTS} but no {DL_CONFIG}: its trainer.dict_class is needed (an "
            "AutoEncoderTopK and a BatchTopKSAE have the same weights but encode differently)"
        )
    cfg = _json(cfg_path)
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class")
    if dict_class not in DL_CLASSES:
        raise SAERegistryError(
            f"{cfg_path}: trainer.dict_class {dict_class!r} cannot be mapped exactly onto a sae-registry "
            f"dictionary; supported: {', '.join(DL_CLASSES)}"
        )
    try:
        # weights_only: tensors and plain containers only; nothing in the file is executed.
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for foreign or damaged files
        raise SAERegistryError(f"{weights_path} is not a plain torch state dict of tensors: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAERegistryError(f"{weights_path} must hold a state dict of tensors")
    linear = {"encoder.weight", "encoder.bias", "decoder.weight"}
    expected, optional = {
        "AutoEncoderTopK": ({*linear, "b_dec", "k"}, {"threshold"}),
        "AutoEncoder": ({*linear, "bias"}, set()),
        "BatchTopKSAE": ({*linear, "b_dec", "k", "threshold"}, set()),
        "MatryoshkaBatchTopKSAE": ({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}, set()),
        "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, set()),
        "GatedAutoEncoder": ({"encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "r_mag", "mag_bias"},
                             set()),
    }[dict_class]
    if not expected <= set(state) <= expected | optional:
        raise SAERegistryError(f"{weights_path} holds {sorted(state)}; a {dict_class} has {sorted(expected)}")
    top_k = None
    if "k" in state:
        k = state["k"]
        if k.numel() != 1 or k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise SAERegistryError(
                f"{weights_path}: k must be one integer (the number of latents kept per row), got a "
                f"{k.dtype} tensor of shape {tuple(k.shape)}; this is not a dictionary_learning {dict_class}"
            )
        top_k = _positive_int(weights_path, "k", int(k))
        if "k" in trainer and trainer["k"] != top_k:
            raise SAERegistryError(f"{cfg_path}: trainer.k is {trainer['k']} but {weights_path} says k = {top_k}")
    f = {name: v.to(torch.float32) for name, v in state.items() if name not in ("k", "group_sizes")}
    sparsity, extra, conversions = DL_RULES[dict_class], {}, []
    if "W_enc" in f:
        weights = Weights(f["W_enc"], f["b_enc"], f["W_dec"], f["b_dec"])
    elif sparsity == "gated":  # no encoder bias: the gate's is ours
        weights = Weights(f["encoder.weight"].T, f["gate_bias"], f["decoder.weight"].T, f["decoder_bias"])
        extra = {"tensors": {"r_mag": f["r_mag"], "b_mag": f["mag_bias"]}}
    else:
        weights = Weights(f["encoder.weight"].T, f["encoder.bias"], f["decoder.weight"].T, f.get("b_dec", f.get("bias")))
    if sparsity in ("batch_top_k", "matryoshka"):
        if f["threshold"].numel() != 1 or float(f["threshold"]) < 0:
            raise SAERegistryError(
                f"{weights_path}: threshold is {f['threshold'].tolist()}: this {dict_class} has no inference "
                "threshold (never set: its own encode would be plain ReLU); set it from training first")
        extra = {"threshold": f["threshold"].reshape(())}
        if sparsity == "matryoshka":
            sizes = state["group_sizes"].flatten().tolist()
            extra["prefixes"] = ",".join(str(sum(sizes[: i + 1])) for i in range(len(sizes)))
    elif sparsity == "jumprelu":
        # relu(pre * (pre > t)) with pre = x @ W_enc + b_enc: the same as ours once b_dec's term is in b_enc
        weights = weights._replace(b_enc=weights.b_enc + weights.b_dec @ weights.W_enc)
        extra = {"threshold": f["threshold"]}
        conversions.append("b_dec (not subtracted from the input) folded into b_enc")
    try:
        sae = from_weights(weights, top_k, sparsity, **extra)
    except SAERegistryError as e:
        raise SAERegistryError(f"{weights_path}: {e}") from None
    source = {"source.model": trainer.get("lm_name"), "source.layer": trainer.get("layer"),
              "source.hook": trainer.get("submodule_name"), **_carried(cfg.get("sae_registry"))}
    return Foreign(sae, "dictionary_learning", dict_class, directory, cfg, cfg_path, weights_path,
                   {k: str(v) for k, v in source.items() if v is not None}, conversions)

