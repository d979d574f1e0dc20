"""Downstream fidelity: splice a dictionary's reconstruction into the source model and measure the loss.

The activation at the store's hook point (``source.hook``; or residual stream ``layer``) is replaced
by the dictionary's reconstruction, only at the token positions the store harvested (special tokens
and a causal LM's sink keep their clean activations; padding is never touched). The floors set
those positions to zero, and to the mean activation there (mean-ablation); the unmodified model is
the ceiling. Every number is defined in docs/evaluation.md:

- **causal language model**: next-token cross-entropy (``ce_clean``, ``ce_spliced``, ``ce_zero``,
  ``ce_mean_ablation``), ``loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (as
  SAELens and dictionary_learning define it; ``loss_recovered_mean`` against the mean floor), and
  the mean per-token ``KL(clean || spliced)`` of the next-token distribution (``kl_spliced``,
  ``kl_zero``, ``kl_mean_ablation``).
- **encoder**: cosine similarity of the sentence embedding (mean of the last hidden state, L2
  normalised) to the clean one, and ``fidelity = (cosine_spliced - cosine_zero) / (1 - cosine_zero)``.

``downstream/fidelity`` is the one number for both kinds: 1 for a perfect reconstruction, 0 for one
no better than zeros. The text is the store's held-out windows, rebuilt from its token provenance,
or any ``texts`` cut into windows the way harvest cuts them. At a residual hook the blocks before the
splice point are skipped (their output is cached after one clean pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .._util.device import resolve_device
from ..errors import SAERegistryError, require_choice, require_positive_int
from ..harvest.hooks import (
    architecture,
    capture_hooks,
    capture_stream,
    edit_hook,
    find_blocks,
    layer_hook,
    parse_hook,
    replace_stream,
)
from ..harvest.models import (
    ModelRef,
    check_layer,
    find_model,
    load_model,
    load_tokenizer,
    model_kind,
    resolve,
    sink_token_id,
)
from ..store.reader import ActivationStore
from .windows import Window, windows_from_store, windows_from_texts

KINDS = ("encoder", "causal_lm")


# -- the model ------------------------------------------------------------------------------------


def _model_path(path: str | Path | None, source: dict | None = None) -> ModelRef:
    """The model to splice into; the demo model's own folder when a store names it but moved machines."""
    if path is None and source is not None:
        path = find_model(source)  # the recorded folder, else the same model found here by its id
    if path is None:
        raise SAERegistryError("no model to evaluate in: pass a store (which names its model) or model= (a model directory)")
    return resolve(path)


def _as_module(dictionary) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``Dictionary``, a ``SparseAutoencoder`` or any ``[n, d] -> [n, d]`` callable."""
    sae = getattr(dictionary, "sae", dictionary)
    if not callable(sae):
        raise SAERegistryError(f"cannot splice {type(dictionary).__name__}: give a Dictionary, a "
                               "SparseAutoencoder or a callable from [n, d] activations to [n, d]")
    return sae


def _input_size(dictionary) -> int | None:
    cfg = getattr(getattr(dictionary, "sae", dictionary), "cfg", None)
    return getattr(cfg, "input_size", None)


class Downstream:
    """A model, windows of text and their clean and ablated results, ready to score dictionaries.

    Build it once (:func:`prepare`) and call :meth:`run` for each dictionary: the clean pass and the
    ablations are shared. ``hook`` names the hook point spliced (``blocks.L.hook_mlp_out``, ...);
    without it, residual stream ``layer``.
    """

    def __init__(self, model_path: str | Path | ModelRef, tokenizer, windows: list[Window], *,
                 layer: int | None = None, hook: str | None = None, kind: str = "auto", batch_size: int = 16,
                 device: str = "auto") -> None:
        if not windows:
            raise SAERegistryError("no text to evaluate on: the windows are empty (give more texts or tokens)")
        require_positive_int("batch_size", batch_size)
        require_choice("kind", kind, ("auto", *KINDS))
        ref = resolve(model_path)
        self.kind = model_kind(ref) if kind == "auto" else kind
        self.device = torch.device(resolve_device(device))
        self.model = load_model(ref, causal_lm=self.kind == "causal_lm", device=str(self.device))
        self.model_path, self.windows = ref.directory / (ref.gguf_file or ""), windows
        self.d = self.model.config.hidden_size
        self.blocks = find_blocks(self.model)
        if self.blocks is None:
            raise SAERegistryError(f"cannot find the transformer blocks of {type(self.model).__name__} to splice into")
        n_layers = self.model.config.num_hidden_layers
        if hook is None:
            if layer is None:
                raise SAERegistryError("give layer= or hook=: where the dictionary's activations come from")
            hook = layer_hook(check_layer(layer, n_layers, ref.ref), n_layers)
        self.hook = parse_hook(hook, n_layers, architecture(self.blocks), ref.name)
        # a residual point splices through the block cache (the blocks before it are skipped); any
        # other point runs the whole model with a hook that edits that module's output
        self.layer = self.hook.layer
        self.token_types = "token_type_ids" in tokenizer.model_input_names
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.batches = []
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            width = max(len(w.input_ids) for w in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            splice = torch.zeros((len(group), width), dtype=torch.bool)
            for j, w in enumerate(group):
                ids[j, :len(w.input_ids)] = torch.tensor(w.input_ids)
                mask[j, :len(w.input_ids)] = 1
                splice[j, :len(w.splice)] = torch.tensor(w.splice)
            self.batches.append((ids.to(self.device), mask.to(self.device), splice.to(self.device)))
        self.tokens = int(sum(s.sum() for _, _, s in self.batches))
        started = time.perf_counter()
        with torch.inference_mode():
            self.cached, self.clean = [], []
            for ids, mask, _ in self.batches:
                stream, out = self._clean_pass(ids, mask)
                self.cached.append(stream)
                self.clean.append(out if self.kind == "encoder" else _ce(out, ids, mask))
            # the mean-ablation floor: every spliced position gets the mean activation there
            self.mean = (sum(h[s].double().sum(0) for (h, _), (_, _, s) in zip(self.cached, self.batches))
                         / max(self.tokens, 1)).to(self.cached[0][0].dtype)
            self.floors = {name: self._outputs(edit) for name, edit in (
                ("zero", lambda h, m: h.masked_fill(m[..., None], 0.0)),
                ("mean", lambda h, m: torch.where(m[..., None], self.mean, h)))}
        self.setup_seconds = time.perf_counter() - started

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, d] (encoder) or next-token logits [B, T, V] (causal LM)."""
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:  # as harvest passes them: one segment
            inputs["token_type_ids"] = torch.zeros_like(ids)
        if self.kind == "causal_lm":
            return self.model(**inputs, use_cache=False).logits.float()
        hidden = self.model(**inputs).last_hidden_state.float()
        m = mask[..., None].float()
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def _clean_pass(self, ids, mask):
        if self.layer is not None:
            with capture_stream(self.blocks, self.layer) as captured:
                out = self._forward(ids, mask)
            return (captured.stream.clone(), captured.rest), out
        with capture_hooks(self.model, [self.hook]) as seen:
            out = self._forward(ids, mask)
        return (seen[self.hook.name].clone(), None), out

    def _edited(self, i: int, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Batch ``i``'s output with the activation at the hook replaced by ``edit(activation, splice_mask)``."""
        (ids, mask, splice), (stream, rest) = self.batches[i], self.cached[i]
        if self.layer is not None:
            with replace_stream(self.blocks, self.layer, edit(stream, splice), rest):
                return self._forward(ids, mask)
        with edit_hook(self.model, self.hook, lambda h: edit(h, splice)):
            return self._forward(ids, mask)

    def _outputs(self, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list:
        """Per batch: the sentence embeddings (encoder), or (CE sum, predicted tokens, KL sum to the clean
        next-token distribution) per window (causal LM), with the activation edited by ``edit``."""
        outs = []
        for i, (ids, mask, _) in enumerate(self.batches):
            out = self._edited(i, edit)
            if self.kind == "encoder":
                outs.append(out)
                continue
            # the clean logits again, from the cache: [B, T, V] for every batch would not fit in memory
            clean = self._edited(i, lambda h, _m: h) if self.layer is not None else self._forward(ids, mask)
            outs.append((*_ce(out, ids, mask), _kl(clean, out, mask)))
        return outs

    def spliced_inputs(self) -> torch.Tensor:
        """The clean activations the dictionary is given, ``[tokens, d]``, in window order."""
        return torch.cat([h[s] for (h, _), (_, _, s) in zip(self.cached, self.batches)]).float().cpu()

    @torch.inference_mode()
    def run(self, dictionary) -> dict[str, float]:
        """``downstream/*`` metrics of one dictionary (see the module's docstring)."""
        width = _input_size(dictionary)
        if width is not None and width != self.d:
            raise SAERegistryError(
                f"the dictionary takes {width}-wide activations but {self.model_path.name} has hidden size "
                f"{self.d}: evaluate it on the model (and layer) its store was harvested from"
            )
        sae = _as_module(dictionary)
        sae_device = next(iter(getattr(sae, "parameters", lambda: iter([]))()), None)
        sae_device = sae_device.device if sae_device is not None else self.device

        def splice(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            x = h[m].float()
            x_hat = sae(x.to(sae_device)).to(h.device, h.dtype)
            if x_hat.shape != x.shape:
                raise SAERegistryError(f"the dictionary returned {tuple(x_hat.shape)} for input {tuple(x.shape)}")
            out = h.clone()
            out[m] = x_hat
            return out

        started = time.perf_counter()
        spliced = self._outputs(splice)
        metrics = self._score(spliced)
        metrics.update({"downstream/tokens": float(self.tokens), "downstream/windows": float(len(self.windows)),
                        "downstream/seconds": time.perf_counter() - started})
        return metrics

    def _score(self, spliced: list) -> dict[str, float]:
        if self.kind == "causal_lm":
            def mean(outs, j):  # per predicted token, over every window
                return float(sum(o[j].sum() for o in outs) / sum(o[1].sum() for o in outs))

            clean = float(sum(s.sum() for s, _ in self.clean) / sum(c.sum() for _, c in self.clean))
            cut, zero, avg = mean(spliced, 0), mean(self.floors["zero"], 0), mean(self.floors["mean"], 0)

            def recovered(floor: float) -> float:
                return (floor - cut) / (floor - clean) if floor != clean else float("nan")

            return {"downstream/ce_clean": clean, "downstream/ce_spliced": cut, "downstream/ce_zero": zero,
                    "downstream/ce_mean_ablation": avg, "downstream/ce_increase": cut - clean,
                    "downstream/loss_recovered": recovered(zero), "downstream/loss_recovered_mean": recovered(avg),
                    "downstream/kl_spliced": mean(spliced, 2), "downstream/kl_zero": mean(self.floors["zero"], 2),
                    "downstream/kl_mean_ablation": mean(self.floors["mean"], 2),
                    "downstream/fidelity": recovered(zero)}

        def cosine(outs):
            return float(torch.cat([(o * c).sum(-1) for o, c in zip(outs, self.clean)]).mean())

        cut, zero = cosine(spliced), cosine(self.floors["zero"])
        fidelity = (cut - zero) / (1.0 - zero) if zero < 1.0 else float("nan")
        return {"downstream/cosine_spliced": cut, "downstream/cosine_zero": zero,
                "downstream/cosine_mean_ablation": cosine(self.floors["mean"]), "downstream/fidelity": fidelity}


def _counted(mask: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions count: both the position and the one it predicts are real tokens."""
    return (mask[:, 1:] * mask[:, :-1]).float()


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: the next-token cross-entropy summed over counted predictions, and their number."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    counted = _counted(mask)
    return (ce.view_as(counted) * counted).sum(1), counted.sum(1)


def _kl(clean: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per window: KL(clean || other) of the next-token distributions, summed over counted predictions."""
    p = F.log_softmax(clean[:, :-1], dim=-1)
    q = F.log_softmax(other[:, :-1], dim=-1)
    kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    return (kl * _counted(mask)).sum(1)


# -- the entry points ------------------------------------------------------------------------------


def prepare(
    store_or_model: ActivationStore | str | Path | None = None,
    *,
    texts: Iterable[str] | None = None,
    model: str | Path | None = None,
    layer: int | None = None,
    hook: str | None = None,
    max_tokens: int = 4096,
    max_length: int | None = None,
    exclude_special: bool | None = None,
    kind: str = "auto",
    batch_size: int = 16,
    device: str = "auto",
) -> Downstream:
    """The model and text to score dictionaries on (see :func:`evaluate` for the arguments)."""
    require_positive_int("max_tokens", max_tokens)
    store = _open_store(store_or_model)
    source = store.source if store is not None else {}
    if store is None and store_or_model is not None:
        model = store_or_model
    path = _model_path(model, source if model is None else None)
    if hook is None and layer is None:
        if str(source.get("hook", "")).startswith("blocks."):
            hook = source["hook"]
        elif "layer" in source:
            layer = int(source["layer"])
        else:
            raise SAERegistryError("give layer= or hook=: which activations the dictionary reconstructs")
    max_length = max_length or int(source.get("max_length", 128))
    exclude_special = bool(source.get("exclude_special", True)) if exclude_special is None else exclude_special
    tokenizer = load_tokenizer(path)
    if texts is not None:
        # the windows the dictionary's store saw: sink first when it was packed (the default for a causal LM)
        pack = source.get("pack")
        if pack is None:
            pack = kind == "causal_lm" or (kind == "auto" and model_kind(path) == "causal_lm")
        sink = (source.get("sink_token_id") or sink_token_id(tokenizer)) if pack and max_length > 1 else None
        windows = windows_from_texts(tokenizer, texts, max_length=max_length, exclude_special=exclude_special,
                                     max_tokens=max_tokens, sink=sink)
    elif store is not None and store.has_provenance:
        windows = windows_from_store(store, tokenizer, max_tokens=max_tokens)
    elif store is not None:
        raise SAERegistryError(
            f"{store.path} keeps no token provenance, so its held-out text cannot be rebuilt: pass texts= "
            "(--text PATH), or re-harvest the store with this version of sae-registry"
        )
    else:
        raise SAERegistryError("evaluating on a model directory needs texts= (--text PATH) to run it on")
    return Downstream(path, tokenizer, windows, layer=layer, hook=hook, kind=kind, batch_size=batch_size,
                      device=device)


def check_store(store: ActivationStore) -> Path:
    """The model directory that dictionaries of ``store`` are evaluated in; refuses a store that
    :func:`prepare` could not use without ``texts`` (no model, no layer, no token provenance)."""
    path = _model_path(None, store.source)
    if "layer" not in store.source and not str(store.source.get("hook", "")).startswith("blocks."):
        raise SAERegistryError(f"{store.path} does not say which layer (hook) it was harvested from")
    if not store.has_provenance:
        raise SAERegistryError(
            f"{store.path} keeps no token provenance, so its held-out text cannot be rebuilt for downstream "
            "evaluation: re-harvest it with this version of sae-registry (or set evaluate: none)"
        )
    return path


def _open_store(store_or_model) -> ActivationStore | None:
    if isinstance(store_or_model, ActivationStore):
        return store_or_model
    if store_or_model is None:
        return None
    text = str(store_or_model)
    if "://" in text or (Path(text) / "zarr.json").is_file():
        return ActivationStore.open(text)
    if not Path(text).exists():
        raise SAERegistryError(f"nothing at {text}: give an activation store or a transformers model directory")
    return None


def evaluate(
    dictionary,
    store_or_model: ActivationStore | str | Path | None = None,
    *,
    texts: Iterable[str] | None = None,
    model: str | Path | None = None,
    layer: int | None = None,
    hook: str | None = None,
    max_tokens: int = 4096,
    max_length: int | None = None,
    exclude_special: bool | None = None,
    kind: str = "auto",
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, float]:
    """Downstream fidelity of ``dictionary`` spliced into its source model: ``downstream/*`` metrics.

    ``dictionary`` is a :class:`~sae_registry.Dictionary`, a ``SparseAutoencoder`` or any callable
    ``[n, d] -> [n, d]``. ``store_or_model`` is the store it was trained on (an ``ActivationStore``,
    a path or URL; ``None`` means the store its lineage names) or a model directory. From a store come
    the model, layer, window length and ``exclude_special``, and the text: its held-out windows
    (about ``max_tokens`` spliced tokens), rebuilt from its token provenance. ``texts`` replaces that
    text (cut into windows as harvest does); with a model directory, ``texts`` and ``layer`` are
    needed. ``model`` overrides the store's model directory. ``kind`` is ``auto`` (from the model's
    architecture), ``encoder`` or ``causal_lm``.
    """
    if store_or_model is None and model is None:
        store_or_model = (getattr(dictionary, "lineage", None) or {}).get("store.path") or None
        if store_or_model is None:
            raise SAERegistryError(
                "the dictionary records no store it was trained on (an imported one): pass store_or_model= (its "
                "ActivationStore or store path), or model= (a model directory) with texts= and layer="
            )
    return prepare(store_or_model, texts=texts, model=model, layer=layer, hook=hook, max_tokens=max_tokens,
                   max_length=max_length, exclude_special=exclude_special, kind=kind, batch_size=batch_size,
                   device=device).run(dictionary)
