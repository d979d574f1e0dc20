"""What opening a store checks before any read: its metadata against its arrays, chunk shapes bounded
by the store's size and a memory budget, and chunk files cut short (which blosc may decode silently).

A store written by someone else is not trusted for its shape: these checks make a crafted or damaged
store an error at open instead of gigabytes allocated, or garbage read, later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ..config.options import STORE_DTYPES as DTYPES
from ..errors import SAERegistryError, require_choice, require_int, require_positive_int
from .layout import ARRAY, DEFAULT_CHUNK_TOKENS, PROVENANCE


def check_shape(path: object, attrs: dict, group: zarr.Group, array: zarr.Array, max_chunk_bytes: int) -> None:
    """The metadata, the arrays and their chunks agree, and no chunk costs more memory than allowed.

    Reading one row decodes its whole chunk, so a store written by someone else could make a two-row
    read allocate gigabytes with a chunk shape of its choosing: refuse that here, before any read.
    """
    try:
        n = require_int("n_tokens", attrs.get("n_tokens"), min=2)
        d = require_positive_int("d", attrs.get("d"))
        chunk = require_positive_int("chunk_tokens", attrs.get("chunk_tokens"))
        require_choice("dtype", attrs.get("dtype"), DTYPES)
    except SAERegistryError as e:
        raise SAERegistryError(
            f"{path} has bad metadata ({e}); the store is damaged. Delete it and harvest again."
        ) from e
    if array.shape != (n, d):
        raise SAERegistryError(
            f"{path} says it holds {n} x {d} but its array is {array.shape}; the store is damaged. "
            "Delete it and harvest again."
        )
    stored = "uint16" if attrs["dtype"] == "bfloat16" else attrs["dtype"]
    why = None
    if array.shards is not None or array.dtype != np.dtype(stored):
        sharded = " and sharded" if array.shards is not None else ""
        why = f"its array is {array.dtype}{sharded}, not {stored} in plain chunks"
    elif array.chunks != (chunk, d):
        why = f"its metadata says chunks of ({chunk}, {d})"
    elif chunk > max(n, DEFAULT_CHUNK_TOKENS):
        why = f"a chunk holds more rows than the whole store ({n}), so reading one row decodes {chunk}"
    elif chunk * d * array.dtype.itemsize > max_chunk_bytes:
        why = (f"decoding one chunk takes {chunk * d * array.dtype.itemsize / 2**20:.0f} MiB, over the budget of "
               f"{max_chunk_bytes / 2**20:.0f} MiB (max_chunk_bytes)")
    if why:
        raise SAERegistryError(
            f"{path}: refusing its chunk shape {array.chunks} of {ARRAY}/: {why}. Harvest the store again "
            "with a smaller --chunk-tokens."
        )
    for name in PROVENANCE if attrs.get("provenance") else ():
        if name not in group or group[name].shape != (n,):
            raise SAERegistryError(
                f"{path} says it keeps token provenance but its {name!r} array is missing or does not "
                "match its rows; the store is damaged. Delete it and harvest again."
            )
        if group[name].chunks != (chunk,) or group[name].shards is not None:
            raise SAERegistryError(
                f"{path}: refusing the chunk shape {group[name].chunks} of {name}/: its metadata says chunks of "
                f"({chunk},). Harvest the store again."
            )


def check_blosc_frames(path: Path, array: zarr.Array, chunk_tokens: int) -> None:
    """Refuse a blosc chunk file shorter than its frame says (a writer killed mid-file).

    Blosc can decode a truncated frame without an error, reading past the data it was given; its
    16-byte header holds the frame's size, so a cut file is caught here, before any read.
    """
    if not any(type(c).__name__ == "BloscCodec" for c in array.compressors):
        return
    for i, header, size in chunk_headers(path, array):
        frame = int.from_bytes(header[12:16], "little") if len(header) == 16 else -1
        if frame != size:
            n = array.shape[0]
            raise SAERegistryError(
                f"{path} is damaged: chunk {i} of {ARRAY}/ (rows {i * chunk_tokens}-{min(n, (i + 1) * chunk_tokens)}) "
                f"cannot be read (RuntimeError: its blosc frame is {frame} bytes but the file holds {size}; it was "
                "cut short). Delete the store and harvest it again."
            )


def chunk_headers(path: Path | str, array: zarr.Array) -> list[tuple[int, bytes, int]]:
    """(chunk index, its first 16 bytes, its size) of every chunk file of ``array``, local or in an object store."""
    if isinstance(path, Path):
        out = []
        for chunk_file in sorted((path / ARRAY / "c").glob("*/*")):
            with open(chunk_file, "rb") as f:
                out.append((int(chunk_file.parent.name), f.read(16), chunk_file.stat().st_size))
        return out
    from zarr.core.sync import sync  # zarr's own event loop, where its (async) filesystem lives

    fs, root = array.store.fs, array.store.path.rstrip("/")
    sizes = {p: info["size"] for p, info in sync(fs._find(f"{root}/{ARRAY}/c", detail=True)).items()}
    files = sorted(sizes)
    # one round of concurrent range reads, not one request after another
    headers = sync(fs._cat_ranges(files, [0] * len(files), [16] * len(files))) if files else []
    return [(int(p.rsplit("/", 2)[-2]), h, sizes[p]) for p, h in zip(files, headers)]
