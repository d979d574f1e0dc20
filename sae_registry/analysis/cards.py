"""Feature cards: what each latent of a dictionary does, as a self-contained HTML page plus JSON.

For each chosen latent: how often it fires on a split of a store, its mean activation when it fires,
its top activating tokens shown in their text (the token highlighted among ±``window`` tokens of its
model input window, from the store's token provenance), and, where the model has an unembedding, the
tokens its decoder direction promotes (``W_dec[f] @ W_U.T``).

One streaming pass over the split keeps, for every latent, counts, sums, maxima and its top
``n_contexts`` rows (a running top-k: memory ``dict_size x n_contexts``, whatever the split's size).
Only then are the latents chosen and their contexts read, chunk by chunk.

The page uses inline CSS only (no script, no external resource), so that MLflow's artifact viewer
shows it as it is; :func:`log_cards` puts it on the dictionary's run as ``cards/index.html`` with
``cards/cards.json`` beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SAERegistryError, printable, require_choice, require_int, require_positive_int
from ..harvest import models
from ..model.sae import SparseAutoencoder
from ..registry.dictionary import load
from ..registry.runs import log_files
from ..registry.tracking import Tracking
from ..registry.versions import CARDS_DIR
from ..store.reader import ActivationStore
from ..store.source import ActivationSource, open_source
from .cards_page import BANDS, band_of, render_html

# -- statistics over a split ---------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Per-latent numbers over ``n_tokens`` rows; ``top_rows[f]`` are store row indices, best first."""

    n_tokens: int
    count: np.ndarray  # [dict_size] rows where the latent is > 0
    total: np.ndarray  # [dict_size] sum of its activations
    top_values: np.ndarray  # [dict_size, n] its largest activations, descending
    top_rows: np.ndarray  # [dict_size, n] the rows they came from (-1: fewer than n rows fired)

    @property
    def frequency(self) -> np.ndarray:
        return self.count / max(self.n_tokens, 1)

    @property
    def mean_active(self) -> np.ndarray:
        """Mean activation over the rows where the latent fires (0 for latents that never fire)."""
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)


def _check_width(sae: SparseAutoencoder, store: ActivationSource) -> None:
    if store.d != sae.cfg.input_size:
        raise SAERegistryError(
            f"the dictionary reads {sae.cfg.input_size}-wide activations but {store.path} holds {store.d}-wide ones; "
            "pass the store it was trained on (--store)"
        )


@torch.no_grad()
def latent_stats(
    sae: SparseAutoencoder,
    store: ActivationSource,
    *,
    split: str = "eval",
    n_top: int = 10,
    batch_size: int = 2048,
    max_tokens: int | None = None,
) -> LatentStats:
    """Stream ``split`` of ``store`` through the encoder once: counts, sums and a top-``n_top`` per latent."""
    require_positive_int("n_top", n_top)
    require_positive_int("batch_size", batch_size)
    _check_width(sae, store)
    lo, hi = store.split_range(split)
    if max_tokens is not None:
        hi = min(hi, lo + require_positive_int("max_tokens", max_tokens))
    device = sae.W_dec.device
    size = sae.cfg.dict_size
    count = torch.zeros(size, dtype=torch.float64)
    total = torch.zeros(size, dtype=torch.float64)
    top_values = torch.full((0, size), -1.0)
    top_rows = torch.zeros((0, size), dtype=torch.long)
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        codes = sae.encode(store.read(start, stop).to(device)).float().cpu()
        count += (codes != 0).sum(0).double()  # a negative code (abs_top_k) fires too
        total += codes.sum(0).double()
        k = min(n_top, len(codes))
        values, idx = codes.topk(k, dim=0)  # [k, dict_size]
        merged_values = torch.cat([top_values, values])
        merged_rows = torch.cat([top_rows, idx + start])
        best = merged_values.topk(min(n_top, len(merged_values)), dim=0).indices
        top_values, top_rows = merged_values.gather(0, best), merged_rows.gather(0, best)
    top_rows = torch.where(top_values > 0, top_rows, -1)  # a latent that fired fewer than n_top times
    return LatentStats(hi - lo, count.numpy(), total.numpy(), top_values.T.numpy(), top_rows.T.numpy())


SELECTIONS = ("bands", "frequent")


def choose_features(stats: LatentStats, features: list[int] | None = None, top: int = 16, *,
                    select: str = "bands", seed: int = 0) -> list[int]:
    """``features`` (checked), else ``top`` latents: by default a sample across frequency bands.

    ``select="bands"``: the latents that fire are split into :data:`BANDS` (dense >= 10%, common
    0.1-10%, rare < 0.1% of tokens) and ``top`` are drawn at random (``seed``) as evenly as the bands
    allow, listed dense first, each band most frequent first. ``select="frequent"``: the ``top`` that
    fire most often. Latents that never fire are never chosen. :func:`describe_choice` says how.
    """
    size = len(stats.count)
    if features:
        bad = [f for f in features if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < size]
        if bad:
            raise SAERegistryError(f"features must be latent indices in 0..{size - 1}; got {bad}")
        return list(dict.fromkeys(features))
    require_positive_int("top", top)
    require_choice("select", select, SELECTIONS)
    order = [int(f) for f in np.argsort(-stats.count, kind="stable") if stats.count[f] > 0]
    if select == "frequent":
        return order[:top]
    members = [[f for f in order if band_of(stats.frequency[f]) == name] for name, _, _ in BANDS]
    quota, left = [0] * len(BANDS), min(top, len(order))
    while left:  # one more from each band that still has latents, until ``top`` are taken
        for i, band in enumerate(members):
            if left and quota[i] < len(band):
                quota[i], left = quota[i] + 1, left - 1
    rng = np.random.default_rng(seed)
    chosen = []
    for band, n in zip(members, quota):
        picked = set(rng.choice(len(band), size=n, replace=False).tolist()) if n else set()
        chosen += [f for i, f in enumerate(band) if i in picked]  # kept in frequency order
    return chosen


def describe_choice(stats: LatentStats, chosen: list[int], features: list[int] | None, select: str,
                    seed: int) -> str:
    """How the latents shown were chosen, in words, for the cards' index and text."""
    if features:
        return f"the {len(chosen)} latents asked for (--features)"
    if select == "frequent":
        return f"the {len(chosen)} most frequent latents (--select frequent)"
    alive = [band_of(f) for f in stats.frequency[stats.count > 0]]
    parts = [f"{name} ({words} of tokens): {sum(band_of(stats.frequency[f]) == name for f in chosen)} of "
             f"{alive.count(name)}" for name, _, words in BANDS]
    return (f"a random sample (seed {seed}) of {len(chosen)} latents across frequency bands: " + "; ".join(parts)
            + f"; {int((stats.count == 0).sum())} never fire (not shown). --select frequent: the most frequent only")


# -- text ----------------------------------------------------------------------------------------------


def load_tokenizer(source: dict):
    """The tokenizer a store was harvested with, offline: from ``model_path``, else by ``tokenizer`` name.

    A folder that asks to run its own code is refused (:func:`sae_registry.harvest.models.refuse_remote_code`),
    not skipped: the store names it, so the user should know.
    """
    tried = []
    for where in (source.get("model_path"), source.get("tokenizer"), source.get("model")):
        if not where or where in tried:
            continue
        tried.append(where)
        models.refuse_remote_code(where)
        try:
            return models.load_tokenizer(where)
        except (OSError, ValueError):
            continue
    raise SAERegistryError(
        f"cannot load the store's tokenizer offline (tried {tried or 'nothing: the store names none'}); "
        "run this where the harvest's model directory exists"
    )


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded string (with its leading space, if any)."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        if not text.startswith(previous):  # decoding is not prefix-stable here: fall back to raw tokens
            raw = tokenizer.convert_ids_to_tokens(list(ids))
            return [t if i == 0 or t.startswith("##") else " " + t for i, t in enumerate(raw)]
        pieces.append(text[len(previous):])
        previous = text
    if pieces and pieces[0].startswith("##"):  # a context that starts inside a word (WordPiece)
        pieces[0] = pieces[0][2:]
    return pieces


def _gather(store: ActivationStore, rows: np.ndarray) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Activations and provenance of ``rows`` (sorted, unique), reading each chunk they touch once."""
    chunk = store.metadata["chunk_tokens"]
    acts, prov = [], {"token_id": [], "seq": [], "pos": []}
    for c in np.unique(rows // chunk):
        start, stop = int(c * chunk), min(int(c + 1) * chunk, len(store))
        local = rows[(rows >= start) & (rows < stop)] - start
        acts.append(store.read(start, stop)[local])
        for name, values in store.provenance(start, stop).items():
            prov[name].append(values[local])
    return torch.cat(acts), {k: np.concatenate(v) for k, v in prov.items()}


# -- unembedding ---------------------------------------------------------------------------------------


def unembedding(source: dict, d: int) -> tuple[torch.Tensor | None, str]:
    """The model's output embedding ``W_U [vocab, d]`` when it has one that reads this width, and why not.

    The logit lens: a decoder direction's effect on the next-token logits, read straight through the
    unembedding (the final norm is left out, as is usual for this table; it rescales, it does not
    reorder much). Any reference :func:`sae_registry.harvest.models.resolve` takes: a directory, a ``.gguf``
    (SmolLM2's tied embedding is its unembedding), a named model.
    """
    path = source.get("model_path")
    if not path:
        return None, "no unembedding: the store names no model"
    models.refuse_remote_code(path)  # loudly, not as "no unembedding": the store names that code
    try:
        ref = models.resolve(path)
        kind = models.model_kind(ref)
    except (OSError, ValueError, TypeError):
        return None, "no unembedding: the harvest's model is not here"
    if kind != "causal_lm":
        architectures = models.load_config(ref).architectures or []
        return None, (f"no unembedding: {source.get('model', path)} ({', '.join(architectures) or 'no head'}) "
                      "has no language-model head")
    model = models.load_model(ref, causal_lm=True)
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != d:
        return None, "no unembedding of this width"
    return head.weight.detach().float(), ""


@torch.no_grad()
def promoted_tokens(directions: torch.Tensor, W_U: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` token logits ``(values, ids)`` that each decoder direction ``[n, d]`` adds: ``directions @ W_U.T``."""
    return (directions.float() @ W_U.T).topk(k, dim=1)


# -- cards ---------------------------------------------------------------------------------------------




@dataclass
class Context:
    """One top activation: the store row, its window, and the tokens around it (``center`` is the row's)."""

    row: int
    seq: int
    pos: int
    activation: float
    tokens: list[str]
    activations: list[float]
    center: int


@dataclass
class FeatureCard:
    feature: int
    frequency: float
    mean_activation: float
    max_activation: float
    contexts: list[Context] = field(default_factory=list)
    promoted: list[tuple[str, float]] | None = None


@dataclass
class Cards:
    """Cards for some latents of one dictionary over one split of one store."""

    title: str
    info: dict
    cards: list[FeatureCard]
    unembedding_note: str = ""

    def to_dict(self) -> dict:
        return {"title": self.title, "info": self.info, "unembedding": self.unembedding_note or "yes",
                "features": [asdict(c) for c in self.cards]}

    def text(self, contexts: int | None = None) -> str:
        """Plain text: each card's numbers and its top contexts, the token in [[brackets]].

        Tokens come from the store's tokenizer and provenance (someone else's data): control
        characters are shown escaped (``\\x1b``), so that printing the cards cannot drive a terminal.
        """
        lines = [f"chosen: {self.info['chosen']}"] if "chosen" in self.info else []
        for card in self.cards:
            band = f" ({band_of(card.frequency)})" if card.frequency > 0 else ""
            lines.append(f"feature {card.feature}{band}: frequency {card.frequency:.4g}, "
                         f"mean activation {card.mean_activation:.3g}, max {card.max_activation:.3g}")
            for ctx in card.contexts[:contexts]:
                text = "".join(f"[[{t}]]" if i == ctx.center else t for i, t in enumerate(ctx.tokens))
                lines.append(f"  {ctx.activation:7.3f}  {printable(' '.join(text.split()))}")
            if card.promoted:
                # repr escapes every non-printable character itself
                lines.append("  promotes: " + ", ".join(repr(t) for t, _ in card.promoted))
        return "\n".join(lines)

    def to_html(self) -> str:
        return render_html(self)

    def write(self, out_dir: str | Path) -> Path:
        """``index.html`` + ``cards.json`` in ``out_dir``; returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "index.html").write_text(self.to_html(), encoding="utf-8")
        (out / "cards.json").write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return out


@torch.no_grad()
def make_cards(
    sae: SparseAutoencoder,
    store: ActivationStore,
    *,
    features: list[int] | None = None,
    top: int = 16,
    select: str = "bands",
    seed: int = 0,
    n_contexts: int = 10,
    window: int = 8,
    split: str = "eval",
    max_tokens: int | None = None,
    title: str = "",
    info: dict | None = None,
    tokenizer=None,
) -> Cards:
    """Feature cards for ``features`` (else ``top`` latents chosen by ``select``, see :func:`choose_features`)
    of ``sae`` over a store split; ``info["chosen"]`` says how they were chosen."""
    require_positive_int("n_contexts", n_contexts)
    require_int("window", window, min=0)
    _check_width(sae, store)  # before provenance: a store of another width is the wrong store, whatever it keeps
    if not store.has_provenance:
        raise SAERegistryError(
            f"{store.path} was harvested without token provenance, so its rows cannot be shown as text; "
            "feature cards need it: re-harvest the store with this version (`sae-registry harvest`)"
        )
    tokenizer = tokenizer or load_tokenizer(store.source)
    stats = latent_stats(sae, store, split=split, n_top=n_contexts, max_tokens=max_tokens)
    chosen = choose_features(stats, features, top, select=select, seed=seed)

    # every row any context needs, read once; contexts never leave their window (same seq)
    centers = {f: [int(r) for r in stats.top_rows[f] if r >= 0] for f in chosen}
    wanted = sorted({r for rows in centers.values() for c in rows
                     for r in range(max(0, c - window), min(len(store), c + window + 1))})
    index = {r: i for i, r in enumerate(wanted)}
    if wanted:
        acts, prov = _gather(store, np.asarray(wanted, dtype=np.int64))
        feature_acts = sae.encode(acts.to(sae.W_dec.device))[:, chosen].float().cpu().numpy()
    column = {f: j for j, f in enumerate(chosen)}

    W_U, note = unembedding(store.source, store.d)
    promoted = None
    if W_U is not None and chosen:
        values, ids = promoted_tokens(sae.W_dec[chosen].detach().cpu(), W_U)
        promoted = [[(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(vs, is_)]
                    for vs, is_ in zip(values, ids)]

    cards = []
    for j, f in enumerate(chosen):
        card = FeatureCard(f, float(stats.frequency[f]), float(stats.mean_active[f]),
                           float(stats.top_values[f][0]) if stats.count[f] else 0.0,
                           promoted=promoted[j] if promoted else None)
        for c in centers[f]:
            i = index[c]
            seq, pos = int(prov["seq"][i]), int(prov["pos"][i])
            rows = [r for r in range(max(0, c - window), min(len(store), c + window + 1))
                    if prov["seq"][index[r]] == seq]
            ids = [int(prov["token_id"][index[r]]) for r in rows]
            card.contexts.append(Context(
                row=c, seq=seq, pos=pos, activation=float(feature_acts[i, column[f]]),
                tokens=token_pieces(tokenizer, ids),
                activations=[round(float(feature_acts[index[r], column[f]]), 4) for r in rows],
                center=rows.index(c),
            ))
        cards.append(card)
    lo, _ = store.split_range(split)
    meta = {"store": str(store.path), "store_fingerprint": store.fingerprint, "split": split,
            "tokens": stats.n_tokens, "first_row": lo, "dict_size": sae.cfg.dict_size,
            "sparsity": sae.cfg.sparsity, "model": store.source.get("model", ""),
            "layer": store.source.get("layer", ""), "window": window,
            "alive_fraction": float((stats.count > 0).mean()),
            "chosen": describe_choice(stats, chosen, features, select, seed), **(info or {})}
    return Cards(title or "Feature cards", meta, cards, note)


def log_cards(out_dir: str | Path, run_id: str, tracking_uri=None) -> str:
    """Log ``out_dir``'s ``index.html`` + ``cards.json`` on the run as ``cards/``; returns the page's URI.

    ``tracking_uri``: a URI or a ``Tracking`` (default ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` here).
    """

    folder = log_files(run_id, [Path(out_dir) / name for name in ("index.html", "cards.json")], CARDS_DIR,
                       tracking_uri)
    return f"{folder}/index.html"


def cards_for(
    name: str,
    *,
    store_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    log: bool = True,
    tracking_uri=None,
    **options,
) -> tuple[Cards, Path, str | None]:
    """Cards for the registered dictionary ``name``: made, written to ``out_dir``, logged on its run.

    The store defaults to the one the dictionary was trained on (its ``store.path`` lineage tag).
    Returns ``(cards, out_dir, artifact_uri or None)``.
    """

    tracking_uri = Tracking.resolve(tracking_uri)  # once: loading and logging talk to the same server
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise SAERegistryError(f"{out_dir} is a file; give --out a directory for index.html and cards.json")
    dictionary = load(name, tracking_uri=tracking_uri)
    where = store_path or dictionary.lineage.get("store.path")
    if not where:
        raise SAERegistryError(f"{name} records no store path; pass --store")
    store = open_source(where)  # a path or URL; an in-memory array's lineage (memory:...) is refused by name
    info = {"dictionary": f"{dictionary.family}/{dictionary.version}",
            "aliases": ", ".join(dictionary.aliases) or "-", "run_id": dictionary.lineage.get("run_id", "")}
    trained_on = dictionary.lineage.get("store.fingerprint")
    if trained_on and trained_on != store.fingerprint:
        info["note"] = f"this store is not the one the dictionary was trained on (fingerprint {trained_on})"
    cards = make_cards(dictionary.sae, store, title=f"Feature cards: {dictionary.family}/{dictionary.version}",
                       info=info, **options)
    out = cards.write(out_dir or Path("cards") / f"{dictionary.family}-v{dictionary.version}")
    uri = None
    if log and dictionary.lineage.get("run_id"):
        uri = log_cards(out, dictionary.lineage["run_id"], tracking_uri)
    return cards, out, uri
