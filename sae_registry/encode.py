"""Encode a whole activation store with a dictionary and keep the codes on disk as a zarr v3 group.

Layout of a codes directory::

    codes.zarr/
      zarr.json        group; attributes = what was encoded, by what (see ``encode_store``)
      values/          top_k: float32 [n_tokens, k], each row's entries sorted by latent index
      indices/         top_k: int32   [n_tokens, k]
      codes/           l1:    float32 [n_tokens, dict_size], dense

Token ``i`` of the file is token ``i`` of the store's split, so the codes line up with anything else
computed on that split. As with stores, ``status`` stays ``"writing"`` until the last batch is on
disk and :func:`open_codes` refuses anything else.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
import zarr
import zarr.storage
from tqdm.auto import tqdm

from .errors import SAERegistryError, require_positive_int
from .sae import SparseAutoencoder
from .store import ActivationStore, _codecs

CODES_FORMAT = "sae-registry/codes"
FORMAT_VERSION = 1


@torch.no_grad()
def encode_store(
    sae: SparseAutoencoder,
    store: ActivationStore,
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

    With ``resume``, codes at ``out`` left unfinished by an interrupted encoding (same dictionary,
    store, split, batch size and attrs) are continued from the first batch not on disk; the result
    equals an uninterrupted encoding's bit for bit.
    """
    require_positive_int("batch_size", batch_size)
    cfg, out = sae.cfg, Path(out)
    if store.d != cfg.input_size:
        raise SAERegistryError(
            f"{store.path} holds {store.d}-wide activations but the dictionary takes "
            f"input_size={cfg.input_size}"
        )
    n = store.num_tokens(split)  # also rejects a bad split name before anything is deleted
    meta = {
        "format": CODES_FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "writing",
        "sparsity": cfg.sparsity,
        "dict_size": cfg.dict_size,
        "top_k": cfg.top_k,
        "n_tokens": n,
        "split": split,
        "store_fingerprint": store.fingerprint,
        "store_path": str(store.path),
        "batch_size": batch_size,
        "sae_sha256": _weights_sha256(sae),
        "encoded_tokens": 0,  # how far the writer got: a resumed encoding starts there
    }
    # Our own keys say how to read the file; a caller's key of the same name would corrupt that.
    if clash := sorted(set(attrs or {}) & set(meta)):
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
    group.attrs["status"] = "complete"
    return out


def _weights_sha256(sae: SparseAutoencoder) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _reopen(out: Path, wanted: dict) -> tuple[zarr.Group, int]:
    """An unfinished codes group written with the same settings, and how many tokens it holds."""
    group = zarr.open_group(zarr.storage.LocalStore(out), mode="r+")
    have = dict(group.attrs)
    if have.get("format") != CODES_FORMAT or have.get("status") != "writing":
        raise SAERegistryError(
            f"{out} is not an unfinished codes group (status {have.get('status')!r}); nothing to resume"
        )
    if differ := sorted(k for k, v in wanted.items() if k != "encoded_tokens" and have.get(k) != v):
        raise SAERegistryError(
            f"{out} was started with another dictionary, store or settings ({', '.join(differ)}); "
            "resume with the same ones, or start again with overwrite=True (--overwrite)"
        )
    return group, int(have["encoded_tokens"])


def _create(out: Path, attrs: dict, widths: dict, n: int, batch_size: int, overwrite: bool) -> zarr.Group:
    if out.exists():
        if not overwrite:
            raise SAERegistryError(
                f"{out} already exists; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    group = zarr.create_group(store=zarr.storage.LocalStore(out), zarr_format=3)
    group.attrs.update(attrs)
    for name, width in widths.items():
        group.create_array(
            name,
            shape=(n, width),
            chunks=(batch_size, width),  # one batch = one row of chunks: writes never overlap
            dtype="int32" if name == "indices" else "float32",
            compressors=_codecs("lz4"),
        )
    return group


def open_codes(path: str | Path) -> tuple[dict, dict[str, zarr.Array]]:
    """Open a finished codes group read-only: ``(attrs, {array name: zarr array})``."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise SAERegistryError(f"no codes at {path}; make them with encode_store")
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != CODES_FORMAT:
        raise SAERegistryError(f"{path} is a zarr group but not sae-registry codes")
    if attrs.get("status") != "complete":
        raise SAERegistryError(
            f"{path} was never finished (its encoding stopped part way); it may be missing "
            "tokens. Encode again with overwrite=True."
        )
    return attrs, {name: array for name, array in group.arrays()}


def dense_codes(path: str | Path, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a codes group as dense float32 ``[rows, dict_size]``."""
    attrs, arrays = open_codes(path)
    if attrs["sparsity"] != "top_k":
        return torch.from_numpy(arrays["codes"][start:stop])
    values = torch.from_numpy(arrays["values"][start:stop])
    indices = torch.from_numpy(arrays["indices"][start:stop]).long()
    return torch.zeros(len(values), attrs["dict_size"]).scatter_(-1, indices, values)
