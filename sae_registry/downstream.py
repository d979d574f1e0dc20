"""Downstream fidelity: splice a dictionary's reconstruction into the source model and measure the loss.

The residual stream at the store's layer is replaced by the dictionary's reconstruction, only at
the token positions the store harvested (with ``exclude_special``, the [CLS]/[SEP]-style tokens keep
their clean activations: the dictionary never saw them, so splicing them would measure something
it was not trained for). Padding is never touched. The same run with those positions set to zero is
the floor ("zero-ablation"), the unmodified model the ceiling:

- **causal language model**: next-token cross-entropy (mean over every predicted, non-padding
  token) clean, spliced and zero-ablated; ``ce_increase = ce_spliced - ce_clean`` and
  ``loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (as SAELens and
  dictionary_learning define it).
- **encoder** (e.g. the demo's all-MiniLM-L6-v2, a sentence-transformers model): the sentence
  embedding (mean of the last hidden state over attention-masked tokens, L2-normalised); each model
  input window is one sentence. ``cosine_spliced`` / ``cosine_zero`` are the mean cosine similarity
  to the clean embedding, and ``fidelity = (cosine_spliced - cosine_zero) / (1 - cosine_zero)``,
  the fraction recovered, analogous to loss recovered.

``downstream/fidelity`` is the one number for both kinds (the cosine fraction for encoders,
``loss_recovered`` for causal LMs): 1 for a perfect reconstruction, 0 for one no better than zeros.

The text is the store's held-out windows, rebuilt from its token provenance (the token ids and
positions harvest keeps), or any ``texts`` cut into windows the way harvest cuts them. The model runs
once clean; the blocks before the splice point are then skipped (their output is cached), so each
dictionary costs one pass through the blocks after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from .errors import SAERegistryError, require_choice, require_positive_int
from .models import (
    capture_stream,
    check_layer,
    check_model_dir,
    find_blocks,
    find_model,
    load_model,
    load_tokenizer,
    model_kind,
    replace_stream,
)
from .sae import resolve_device
from .store import ActivationStore

KINDS = ("encoder", "causal_lm")


@dataclass
class Window:
    """One model input: token ids, and which positions the dictionary replaces."""

    input_ids: list[int]
    splice: list[bool]
    rows: list[int] | None = None  # the store rows of the spliced positions, when rebuilt from a store


# -- the text: windows ----------------------------------------------------------------------------


def windows_from_texts(tokenizer, texts: Iterable[str], *, max_length: int, exclude_special: bool,
                       max_tokens: int) -> list[Window]:
    """``texts`` cut into windows as harvest cuts them, until ``max_tokens`` positions to splice."""
    texts = list(texts)
    out, n = [], 0
    for start in range(0, len(texts), 32):  # tokenise only as much as the budget needs
        enc = tokenizer(texts[start:start + 32], truncation=True, max_length=max_length,
                        return_overflowing_tokens=True, return_special_tokens_mask=True)
        for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
            splice = [not s for s in special] if exclude_special else [True] * len(ids)
            if any(splice):
                out.append(Window(list(ids), splice))
                n += sum(splice)
            if n >= max_tokens:
                return out
    return out


def windows_from_store(store: ActivationStore, tokenizer, *, max_tokens: int) -> list[Window]:
    """The store's held-out windows, rebuilt from its token provenance (whole windows only).

    Rows of one window share ``seq``; ``pos`` is each token's place in the model input. With
    ``exclude_special`` the tokenizer adds the special tokens back, and a window is kept only when
    the harvested tokens land exactly where ``pos`` says (the first held-out window may have begun in
    the training split, the last one read may go on further or have been cut by harvest's
    ``max_tokens``: those are left out).
    """
    exclude_special = bool(store.source.get("exclude_special", True))
    max_length = int(store.source.get("max_length", 512))
    lo, hi = store.split_range("eval")
    prov = store.provenance(lo, min(hi, lo + max_tokens + 2 * max_length))
    seq, pos, tok = (np.asarray(prov[k]) for k in ("seq", "pos", "token_id"))
    prefix, suffix = _special_affixes(tokenizer)
    bounds = np.flatnonzero(np.diff(seq)) + 1
    out, n = [], 0
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(seq)]):
        order = np.argsort(pos[s:e], kind="stable")
        p, ids = pos[s:e][order].tolist(), tok[s:e][order].tolist()
        if exclude_special:
            full = prefix + ids + suffix
            splice = [False] * len(prefix) + [True] * len(ids) + [False] * len(suffix)
            if list(range(len(prefix), len(prefix) + len(ids))) != p:
                continue
        else:
            if p != list(range(len(p))):
                continue
            full, splice = ids, [True] * len(ids)
        if e == len(seq):  # it may go on past what was read, or have been cut by harvest's max_tokens
            break
        out.append(Window(full, splice, (lo + s + order).tolist()))
        n += len(p)
        if n >= max_tokens:
            break
    return out


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise SAERegistryError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")


# -- the model ------------------------------------------------------------------------------------


def _model_path(path: str | Path | None, source: dict | None = None) -> Path:
    """The model directory; the demo model's own folder when a store names it but moved machines."""
    if path is None and source is not None:
        path = find_model(source)  # the recorded folder, else the same model found here by its id
    if path is None:
        raise SAERegistryError("no model to evaluate in: pass a store (which names its model) or model= (a model directory)")
    return check_model_dir(path)


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
    """A model, windows of text and their clean and zero-ablated results, ready to score dictionaries.

    Build it once (:func:`prepare`) and call :meth:`run` for each dictionary: the clean pass and the
    zero-ablation are shared.
    """

    def __init__(self, model_path: Path, tokenizer, windows: list[Window], *, layer: int, kind: str = "auto",
                 batch_size: int = 16, device: str = "auto") -> None:
        if not windows:
            raise SAERegistryError("no text to evaluate on: the windows are empty (give more texts or tokens)")
        require_positive_int("batch_size", batch_size)
        require_choice("kind", kind, ("auto", *KINDS))
        self.kind = model_kind(model_path) if kind == "auto" else kind
        self.device = torch.device(resolve_device(device))
        self.model = load_model(model_path, causal_lm=self.kind == "causal_lm", device=str(self.device))
        self.model_path, self.windows, self.layer = model_path, windows, layer
        self.d = self.model.config.hidden_size
        self.blocks = find_blocks(self.model)
        if self.blocks is None:
            raise SAERegistryError(f"cannot find the transformer blocks of {type(self.model).__name__} to splice into")
        check_layer(layer, self.model.config.num_hidden_layers, model_path)
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
                self.clean.append(out)
            self.zero = self._outputs(lambda h, m: h.masked_fill(m[..., None], 0.0))
        self.setup_seconds = time.perf_counter() - started

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor):
        """Sentence embeddings [B, d] (encoder) or per-window (CE sum, predicted tokens) (causal LM)."""
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:  # as harvest passes them: one segment
            inputs["token_type_ids"] = torch.zeros_like(ids)
        if self.kind == "causal_lm":
            logits = self.model(**inputs, use_cache=False).logits.float()
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            counted = (mask[:, 1:] * mask[:, :-1]).float()
            return (ce.view_as(counted) * counted).sum(1), counted.sum(1)
        hidden = self.model(**inputs).last_hidden_state.float()
        m = mask[..., None].float()
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def _clean_pass(self, ids, mask):
        with capture_stream(self.blocks, self.layer) as captured:
            out = self._forward(ids, mask)
        return (captured.stream.clone(), captured.rest), out

    def _outputs(self, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list:
        """The model's outputs with the stream at ``layer`` replaced by ``edit(stream, splice_mask)``."""
        outs = []
        for (ids, mask, splice), (stream, rest) in zip(self.batches, self.cached):
            with replace_stream(self.blocks, self.layer, edit(stream, splice), rest):
                outs.append(self._forward(ids, mask))
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
            def ce(outs):
                return float(sum(s.sum() for s, _ in outs) / sum(c.sum() for _, c in outs))

            clean, cut, zero = ce(self.clean), ce(spliced), ce(self.zero)
            recovered = (zero - cut) / (zero - clean) if zero != clean else float("nan")
            return {"downstream/ce_clean": clean, "downstream/ce_spliced": cut, "downstream/ce_zero": zero,
                    "downstream/ce_increase": cut - clean, "downstream/loss_recovered": recovered,
                    "downstream/fidelity": recovered}

        def cosine(outs):
            return float(torch.cat([(o * c).sum(-1) for o, c in zip(outs, self.clean)]).mean())

        cut, zero = cosine(spliced), cosine(self.zero)
        fidelity = (cut - zero) / (1.0 - zero) if zero < 1.0 else float("nan")
        return {"downstream/cosine_spliced": cut, "downstream/cosine_zero": zero, "downstream/fidelity": fidelity}


# -- the entry points ------------------------------------------------------------------------------


def prepare(
    store_or_model: ActivationStore | str | Path | None = None,
    *,
    texts: Iterable[str] | None = None,
    model: str | Path | None = None,
    layer: int | None = None,
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
    if layer is None:
        if "layer" not in source:
            raise SAERegistryError("give layer=: which residual stream the dictionary reconstructs")
        layer = int(source["layer"])
    max_length = max_length or int(source.get("max_length", 128))
    exclude_special = bool(source.get("exclude_special", True)) if exclude_special is None else exclude_special
    tokenizer = load_tokenizer(path)
    if texts is not None:
        windows = windows_from_texts(tokenizer, texts, max_length=max_length, exclude_special=exclude_special,
                                     max_tokens=max_tokens)
    elif store is not None and store.has_provenance:
        windows = windows_from_store(store, tokenizer, max_tokens=max_tokens)
    elif store is not None:
        raise SAERegistryError(
            f"{store.path} keeps no token provenance, so its held-out text cannot be rebuilt: pass texts= "
            "(--text PATH), or re-harvest the store with this version of sae-registry"
        )
    else:
        raise SAERegistryError("evaluating on a model directory needs texts= (--text PATH) to run it on")
    return Downstream(path, tokenizer, windows, layer=layer, kind=kind, batch_size=batch_size, device=device)


def check_store(store: ActivationStore) -> Path:
    """The model directory that dictionaries of ``store`` are evaluated in; refuses a store that
    :func:`prepare` could not use without ``texts`` (no model, no layer, no token provenance)."""
    path = _model_path(None, store.source)
    if "layer" not in store.source:
        raise SAERegistryError(f"{store.path} does not say which layer it was harvested from")
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
    return prepare(store_or_model, texts=texts, model=model, layer=layer, max_tokens=max_tokens,
                   max_length=max_length, exclude_special=exclude_special, kind=kind, batch_size=batch_size,
                   device=device).run(dictionary)
