"""Encode a whole activation store with a dictionary and keep the codes on disk as a zarr v3 group.

The codes format (``format: "sae-registry/codes"``, ``format_version: 2``)::

    codes.zarr/
      zarr.json        group; attributes (below)
      values/          top_k: float32 [n_tokens, k], each row's entries sorted by latent index
      indices/         top_k: int32   [n_tokens, k], the latents of ``values``, ascending per row
      codes/           l1:    float32 [n_tokens, dict_size], dense

Attributes: ``sparsity``, ``dict_size``, ``top_k``, ``n_tokens``, ``split`` (which split of the
store), ``store_fingerprint`` and ``store_path`` (the store encoded), ``batch_size`` (rows per
chunk), ``sae_sha256`` (the SHA-256 of the dictionary's ``sae.safetensors`` bytes as
``SparseAutoencoder.save`` writes them: the same checksum the registry records for a version as its
``sha256.sae.safetensors`` tag; format version 1 hashed the tensors instead), ``encoded_tokens``
(how far the writer got), ``status`` and whatever ``attrs`` the caller added (e.g. the
dictionary's registered name and version).

Token ``i`` of the file is token ``i`` of the store's split, so the codes line up with anything else
computed on that split. As with stores, ``status`` stays ``"writing"`` until the last batch is on
disk, and the readers (:func:`open_codes`, :func:`read_codes`, :func:`dense_codes`) refuse
anything else (:mod:`sae_registry.store.zarr_files`).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.storage
from tqdm.auto import tqdm

from ..errors import SAERegistryError, require_int, require_positive_int
from ..model.files import WEIGHTS_FILE
from ..model.sae import SparseAutoencoder
from ..store import zarr_files
from ..store.layout import MAX_CHUNK_BYTES
from ..store.source import ActivationSource

CODES_FORMAT = "sae-registry/codes"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # the arrays are the same; only what sae_sha256 hashes changed
CODES_ARRAYS = ("values", "indices", "codes")


@torch.no_grad()
def encode_store(
    sae: SparseAutoencoder,
    store: ActivationSource,
    out: str | Path,
    *,
    split: str = "all",
    batch_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
    attrs: dict | None = None,
    resume: bool = False,
) -> Path:
    """Encode every token of ``store``'s ``split``, in order, and write the codes to ``out``.

    top_k dictionaries are written compactly (``values`` + ``indices``), l1 ones densely
    (``codes``). Each batch goes straight to its slice on disk, so memory stays at one batch.
    ``attrs`` (e.g. the dictionary's registered name and version) join the group's attributes.
    ``overwrite`` replaces existing codes, and only codes: any other folder is refused.

    With ``resume``, codes at ``out`` left unfinished by an interrupted encoding (same dictionary,
    store, split, batch size and attrs) are continued from the first batch not on disk; the result
    equals an uninterrupted encoding's bit for bit.
    """
    require_positive_int("batch_size", batch_size)
    cfg, out = sae.cfg, Path(out).absolute()
    if store.d != cfg.input_size:
        raise SAERegistryError(
            f"{store.path} holds {store.d}-wide activations but the dictionary takes "
            f"input_size={cfg.input_size}"
        )
    lo, hi = store.split_range(split)  # also rejects a bad split name before anything is deleted
    n = hi - lo
    meta = {
        "format_version": FORMAT_VERSION,
        "sparsity": cfg.sparsity,
        "dict_size": cfg.dict_size,
        "top_k": cfg.top_k,
        "n_tokens": n,
        "split": split,
        "store_fingerprint": store.fingerprint,
        "store_path": str(store.path),
        "batch_size": batch_size,
        "sae_sha256": weights_sha256(sae),
        "encoded_tokens": 0,  # how far the writer got: a resumed encoding starts there
    }
    # Our own keys say how to read the file; a caller's key of the same name would corrupt that.
    if clash := sorted(set(attrs or {}) & {*meta, "format", "status"}):
        raise SAERegistryError(f"attrs may not set {clash}; encode_store writes those itself")
    top_k = cfg.sparsity == "top_k"
    widths = {"values": cfg.top_k, "indices": cfg.top_k} if top_k else {"codes": cfg.dict_size}
    if resume and (out / "zarr.json").exists():
        group, done = _reopen(out, {**(attrs or {}), **meta})
    else:
        group, done = _create(out, {**(attrs or {}), **meta}, widths, n, batch_size, overwrite), 0
    arrays = {name: group[name] for name in widths}
    device = next(sae.parameters()).device
    bar = tqdm(total=n, initial=done, unit="tok", desc="encode", disable=not progress)
    start = 0
    for x in store.batches(batch_size, split=split, shuffle=False):
        stop = start + len(x)
        if stop <= done:  # on disk already (resume)
            start = stop
            continue
        x = x.to(device)
        if top_k:
            values, indices = sae.encode_topk(x)
            indices, order = indices.sort(dim=-1)  # canonical rows: same codes, same bytes
            arrays["values"][start:stop] = values.gather(-1, order).float().cpu().numpy()
            arrays["indices"][start:stop] = indices.int().cpu().numpy()
        else:
            arrays["codes"][start:stop] = sae.encode(x).float().cpu().numpy()
        group.attrs["encoded_tokens"] = stop
        bar.update(stop - start)
        start = stop
    bar.close()
    if start != n:  # would mean the store's reader lost rows; never mark such a file complete
        raise SAERegistryError(f"encoded {start} tokens but the {split} split holds {n}")
    zarr_files.finish(group, {})
    return out


def weights_sha256(sae: SparseAutoencoder) -> str:
    """SHA-256 of the ``sae.safetensors`` that ``sae.save()`` writes: the registry's checksum of it."""
    with tempfile.TemporaryDirectory(prefix="sae-sha256-") as tmp:
        sae.save(tmp)  # the file itself, so that the two checksums cannot drift apart
        digest = hashlib.sha256()
        with open(Path(tmp) / WEIGHTS_FILE, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _reopen(out: Path, wanted: dict) -> tuple[zarr.Group, int]:
    """An unfinished codes group written with the same settings, and how many tokens it holds."""
    group = zarr.open_group(zarr.storage.LocalStore(out), mode="r+")
    have = dict(group.attrs)
    zarr_files.require_unfinished(out, have, CODES_FORMAT, "codes group")
    if differ := sorted(k for k, v in wanted.items() if k != "encoded_tokens" and have.get(k) != v):
        raise SAERegistryError(
            f"{out} was started with another dictionary, store or settings ({', '.join(differ)}); "
            "resume with the same ones, or start again with overwrite=True (--overwrite)"
        )
    return group, int(have["encoded_tokens"])


def _create(out: Path, attrs: dict, widths: dict, n: int, batch_size: int, overwrite: bool) -> zarr.Group:
    group = zarr_files.create(out, CODES_FORMAT, attrs, overwrite=overwrite, arrays=CODES_ARRAYS)
    for name, width in widths.items():
        group.create_array(
            name,
            shape=(n, width),
            chunks=(batch_size, width),  # one batch = one row of chunks: writes never overlap
            dtype="int32" if name == "indices" else "float32",
            compressors=zarr_files.codecs("lz4"),
        )
    return group


def open_codes(path: str | Path) -> tuple[dict, dict[str, zarr.Array]]:
    """Open a finished codes group read-only: ``(attrs, {array name: zarr array})``.

    Refuses missing, foreign, unfinished or malformed files: the arrays must be the ones its
    sparsity writes, of ``n_tokens`` rows, in chunks of at most ``batch_size`` rows that fit the
    store reader's memory budget.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise SAERegistryError(f"no codes at {path}; make them with encode_store")
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    attrs = dict(group.attrs)
    zarr_files.require_finished(
        path, attrs, CODES_FORMAT, what="sae-registry codes",
        stopped="its encoding stopped part way", fix="Encode again with overwrite=True.",
    )
    arrays = {name: array for name, array in group.arrays()}
    if attrs.get("format_version") not in READABLE_VERSIONS:
        raise SAERegistryError(f"{path} is codes format version {attrs.get('format_version')!r}; this "
                               f"sae-registry reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        n = require_int("n_tokens", attrs.get("n_tokens"), min=0)
        dict_size = require_positive_int("dict_size", attrs.get("dict_size"))
        top_k = attrs.get("sparsity") == "top_k"
        width = {"values": attrs.get("top_k"), "indices": attrs.get("top_k")} if top_k else {"codes": dict_size}
        if set(arrays) != set(width):
            raise SAERegistryError(f"arrays {sorted(arrays)}, expected {sorted(width)}")
        batch = require_positive_int("batch_size", attrs.get("batch_size"))
        for name, array in arrays.items():
            # reading one row decodes its chunk: never more than the budget or the file's own rows
            nbytes = batch * width[name] * array.dtype.itemsize
            if array.shape != (n, width[name]) or array.chunks != (batch, width[name]) or array.shards is not None \
                    or nbytes > max(MAX_CHUNK_BYTES, n * width[name] * array.dtype.itemsize):
                raise SAERegistryError(f"{name}/ is {array.shape} in chunks {array.chunks}")
    except SAERegistryError as e:
        raise SAERegistryError(f"{path} is damaged or not ours: {e}. Encode again with overwrite=True.") from e
    return attrs, arrays


def read_codes(path: str | Path, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``[start, stop)`` of a finished codes file, as the arrays it holds.

    top_k: ``{"values": float32 [rows, k], "indices": int64 [rows, k]}`` (each row sorted by
    latent); l1: ``{"codes": float32 [rows, dict_size]}``. :func:`dense_codes` gives either as
    dense ``[rows, dict_size]``; :func:`open_codes` gives the attributes (see the module docstring).
    """
    return _read(path, start, stop)[1]


def dense_codes(path: str | Path, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a codes group as dense float32 ``[rows, dict_size]``."""
    attrs, codes = _read(path, start, stop)
    if "codes" in codes:
        return codes["codes"]
    values = codes["values"]
    return torch.zeros(len(values), attrs["dict_size"]).scatter_(-1, codes["indices"], values)


def _read(path: str | Path, start: int, stop: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    attrs, arrays = open_codes(path)
    n = attrs["n_tokens"]
    start = require_int("start", start, min=0, max=n)
    stop = n if stop is None else require_int("stop", stop, min=start, max=n)
    out = {name: torch.from_numpy(np.asarray(array[start:stop])) for name, array in arrays.items()}
    if "indices" in out:
        indices = out["indices"] = out["indices"].long()
        if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < attrs["dict_size"]):
            raise SAERegistryError(
                f"{path} is damaged: indices/ outside [0, {attrs['dict_size']}) in rows {start}-{stop}. "
                "Encode again with overwrite=True."
            )
    return attrs, out
