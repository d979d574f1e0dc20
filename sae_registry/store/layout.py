"""Activation stores: a zarr v3 group holding one ``[n_tokens, d]`` array plus its metadata.

Layout of a store directory::

    store.zarr/
      zarr.json                 group; attributes = the store's metadata (see ``metadata``)
      activations/              [n_tokens, d], chunked along tokens, compressed
      token_id/ seq/ pos/       optional token provenance, one entry per row, chunked like the rows:
                                the token's id (int32), its model input window (int64, 0, 1, ... in
                                harvest order) and its index in that window's input_ids (int32)

The group's ``status`` attribute is ``"writing"`` until the writer's ``close()`` writes the
statistics and the fingerprint and sets it to ``"complete"``; :meth:`ActivationStore.open` refuses
anything else, so an interrupted harvest is never read as if it were whole (the same life cycle as
codes files: :mod:`sae_registry.store.zarr_files`).

The last ``eval_fraction`` of tokens is the held-out split (chosen at creation, fixed for the life of
the store, so that every metric anywhere is computed on the same tokens). Harvests write documents in
order, so the split holds whole documents the training split never saw.

This module holds what the reader, the writer and the checks share: the names, formats and limits of
the layout, the conversions of stored rows, and :class:`StoreInfo`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import SAERegistryError, require_choice

FORMAT = "sae-registry/activation-store"
FORMAT_VERSION = 1
ARRAY = "activations"
COMPRESSORS = ("lz4", "zstd", "none")
PROVENANCE = {"token_id": "int32", "seq": "int64", "pos": "int32"}  # array name -> dtype
STORE_ARRAYS = (ARRAY, *PROVENANCE)
SPLITS = ("train", "eval", "all")
READ_AGAIN = ("When it answers again, run the same command again; a training continues where its last checkpoint "
              "left it with --resume (resume=True), in the same data order.")
# Reading one row decodes its whole chunk: a store's chunks may not ask for more memory than this
# (the default chunk of 8192 rows of d = 16384 float32 is 512 MiB).
MAX_CHUNK_BYTES = 1 << 30
DEFAULT_CHUNK_TOKENS = 8192  # a chunk may hold more rows than the store only up to this many
# The shuffle buffer of `batches`: rows drawn at random for each batch (256 MiB is 174,762 rows of d = 384
# float32), sized in bytes so that the window grows with the store until it meets this budget.
SHUFFLE_BYTES = 256 << 20


def to_numpy(array: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Rows as the numpy array zarr stores: bfloat16 is kept as its raw 16 bits (uint16)."""
    tensor = torch.as_tensor(array).detach().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def finite(raw: np.ndarray, dtype: str) -> bool:
    """Whether stored rows hold no NaN or Inf: two reductions (min and max propagate NaN)."""
    if raw.size == 0:
        return True
    # 16-bit floats by their bits (an all-ones exponent is Inf or NaN): numpy's float16 min/max
    # run in software, ~6x slower than the read itself
    if dtype == "bfloat16":
        return not ((raw & 0x7F80) == 0x7F80).any()
    if dtype == "float16":
        return not ((raw.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(raw.min()) and np.isfinite(raw.max()))


def to_float32(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows (see :func:`to_numpy`) as a float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(raw)).float()


def held_out_start(n: int, eval_fraction: float) -> int:
    """First row of the held-out split of ``n`` rows: the last ``eval_fraction`` of them, at least one
    (and at least one row left to train on). Every backend splits so, so every metric anywhere is
    computed on the same rows."""
    return n - min(n - 1, max(1, round(n * eval_fraction)))


def split_range(split: str, start_of_eval: int, n: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``split`` (``train``, ``eval`` or ``all``) of ``n`` rows."""
    require_choice("split", split, SPLITS)
    return {"train": (0, start_of_eval), "eval": (start_of_eval, n), "all": (0, n)}[split]


def row_range(start: int, stop: int | None, n: int) -> tuple[int, int]:
    """``read(start, stop)``'s rows of ``n`` as ``[start, stop)`` (negative positions count from the end, as in a
    slice); a stop before the start is an error (``read(i * count, count)`` would come back empty, silently)."""
    given = (start, stop)
    start, stop, _ = slice(start, stop).indices(n)
    if stop < start:
        raise SAERegistryError(f"read{given}: stop is before start; read takes the rows [start, stop) of {n}, "
                               f"not a start and a count: read({given[0]}, {given[0]} + count)")
    return start, stop


def fingerprint_hash(d: int, dtype: str):
    """The running hash of a store's fingerprint: its width, dtype, then its rows' bytes as stored
    (bfloat16 as its raw bits), in order; :func:`fingerprint_hex` of it is the fingerprint."""
    return hashlib.sha256(f"{d}:{dtype}:".encode())


def fingerprint_hex(digest) -> str:
    """The fingerprint a :func:`fingerprint_hash` gives."""
    return digest.hexdigest()[:16]


class StoreInfo:
    """What a store's metadata says, for the reader and the writer alike (``metadata`` is its attributes)."""

    metadata: dict

    @property
    def d(self) -> int:
        return self.metadata["d"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def source(self) -> dict:
        return self.metadata.get("source", {})

    @property
    def has_provenance(self) -> bool:
        """Whether each row's token id and place (window ``seq``, position ``pos``) were kept."""
        return bool(self.metadata.get("provenance", False))
