"""Writing an activation store: rows in whole chunks, running statistics, the fingerprint, and
resuming a writer that was interrupted.

Get one from :meth:`ActivationStore.create <sae_registry.store.ActivationStore.create>` or
:meth:`ActivationStore.reopen <sae_registry.store.ActivationStore.reopen>`; the layout and the
reader are in :mod:`sae_registry.store`.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.codecs
import zarr.storage

from ..config.options import STORE_DTYPES as DTYPES
from ..errors import SAERegistryError, require_choice, require_float, require_positive_int
from . import zarr_files
from .layout import (
    ARRAY,
    COMPRESSORS,
    DEFAULT_CHUNK_TOKENS,
    FORMAT,
    FORMAT_VERSION,
    MAX_CHUNK_BYTES,
    PROVENANCE,
    STORE_ARRAYS,
    StoreInfo,
    fingerprint_hash,
    fingerprint_hex,
    to_float32,
    to_numpy,
)

RESUME_HINT = ("The store is left 'writing' (unfinished) with the whole chunks written so far; when the endpoint "
               "answers again, run the same harvest with --resume (resume=True) to continue it.")


class StoreWriter(StoreInfo):
    """Appends rows to a store that is ``"writing"``; :meth:`close` marks it ``"complete"``.

    Rows are written in whole chunks as they come (the rest waits for more rows); the mean, the
    mean norm, the total variance and the fingerprint are summed chunk by chunk on the way, from the
    rows as stored, so that a store reopened after a crash can redo the same sums bit for bit.
    Use it as a context manager: an exception inside the block leaves the store ``"writing"``.
    """

    def __init__(self, path: Path | str, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self.metadata: dict = dict(group.attrs)
        # every chunk a file, zeros too, so that open() can tell when one is missing
        self._array = group[ARRAY].with_config({"write_empty_chunks": True})
        self._provenance = {name: group[name] for name in PROVENANCE} if self.has_provenance else {}
        self._pending_provenance: dict[str, list[np.ndarray]] = {name: [] for name in self._provenance}
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._n_written = 0
        self._closed = False
        self._hash = fingerprint_hash(self.d, self.dtype)
        self._sum = np.zeros(self.d, dtype=np.float64)
        self._sum_sq = np.zeros(self.d, dtype=np.float64)
        self._norm_sum = 0.0

    @classmethod
    def create(
        cls,
        path: str | Path,
        d: int,
        *,
        dtype: str = "float32",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        compressor: str = "none",
        eval_fraction: float = 0.05,
        source: dict | None = None,
        overwrite: bool = False,
        provenance: bool = False,
    ) -> StoreWriter:
        """Start a new store at ``path``; see :meth:`sae_registry.store.ActivationStore.create`."""
        require_positive_int("d", d)
        require_positive_int("chunk_tokens", chunk_tokens)
        require_choice("dtype", dtype, DTYPES)
        require_choice("compressor", compressor, COMPRESSORS)
        if chunk_tokens * d * (4 if dtype == "float32" else 2) > MAX_CHUNK_BYTES:  # what open() would refuse to read: refused before writing
            raise SAERegistryError(f"a chunk of {chunk_tokens} tokens x {d} would be over {MAX_CHUNK_BYTES >> 20} MiB, "
                                   "more than a store reads at once; lower chunk_tokens (--chunk-tokens)")
        require_float("eval_fraction", eval_fraction, above=0, max=1)
        if eval_fraction == 1:
            raise SAERegistryError("eval_fraction must be < 1, got 1: the training split would be empty")
        path = zarr_files.location(path)  # a local folder or an object-store URL
        attrs = {
            "format_version": FORMAT_VERSION,
            "d": d,
            "dtype": dtype,
            "chunk_tokens": chunk_tokens,
            "compressor": compressor,
            "eval_fraction": eval_fraction,
            "source": source or {},
            "provenance": bool(provenance),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        group = zarr_files.create(path, FORMAT, attrs, overwrite=overwrite, arrays=STORE_ARRAYS)
        _create_missing_arrays(group)
        return cls(path, group)

    @classmethod
    def reopen(cls, path: str | Path) -> StoreWriter:
        """Reopen a store that an interrupted writer left ``writing``, to append where it stopped.

        Keeps the whole chunks on disk (before close() a writer flushes only whole chunks), drops
        anything past them, and redoes the fingerprint and statistics from those rows in the order a
        writer does, so that a store finished after reopen() equals one written in one go, bit for
        bit. ``len(store)`` says how many rows were kept: the writer goes on from the next one.
        """
        path = zarr_files.location(path)
        if not zarr_files.exists(path):
            raise SAERegistryError(f"no activation store at {path} to resume; start a new one")
        group = zarr.open_group(zarr_files.open_store(path, read_only=False), mode="r+")
        zarr_files.require_unfinished(path, dict(group.attrs), FORMAT, "activation store")
        if _create_missing_arrays(group):  # a writer killed inside create(): no row was written yet
            for name in (ARRAY, *(PROVENANCE if group.attrs.get("provenance") else ())):
                group[name].resize((0, *group[name].shape[1:]))
        store = cls(path, group)
        chunk = store.metadata["chunk_tokens"]
        arrays = [store._array, *store._provenance.values()]
        n = min(a.shape[0] for a in arrays) // chunk * chunk
        for a in arrays:
            a.resize((n, *a.shape[1:]))
        # a writer killed between growing an array and writing its rows leaves chunk files missing at the
        # end (zarr would read zeros there): drop chunks until every one left is on disk
        while n and any(a.nchunks_initialized != a.nchunks for a in arrays):
            n -= chunk
            for a in arrays:
                a.resize((n, *a.shape[1:]))
        for start in range(0, n, chunk):
            rows = store._array[start : start + chunk]
            store._hash.update(np.ascontiguousarray(rows).tobytes())
            store._add_stats(rows)
        store._n_written = n
        return store

    def __len__(self) -> int:
        """Rows on disk so far (whole chunks; rows still pending are not counted until written)."""
        return self.metadata.get("n_tokens", self._n_written)

    def append(
        self, array: np.ndarray | torch.Tensor, provenance: dict[str, np.ndarray | torch.Tensor] | None = None
    ) -> None:
        """Add rows ``[n, d]``. Full chunks go to disk at once; the rest waits for more rows.

        A store created with ``provenance=True`` needs ``provenance={"token_id": [n], "seq": [n],
        "pos": [n]}`` with every append; the arrays stay aligned with the rows.
        """
        if self._closed:
            raise SAERegistryError(f"{self.path} is finished (closed); create a new store to write more")
        tensor = torch.as_tensor(array).detach().cpu()
        if tensor.ndim != 2 or tensor.shape[1] != self.d:
            raise SAERegistryError(f"append needs rows of shape [n, {self.d}], got {tuple(tensor.shape)}")
        columns = self._provenance_columns(provenance, len(tensor))
        rows = to_numpy(tensor, self.dtype)
        stored = to_float32(rows, self.dtype).double()  # statistics of what is on disk
        if not torch.isfinite(stored).all():
            raise SAERegistryError(
                f"append got NaN or Inf activations (or values too large for {self.dtype}); refusing to store them"
            )
        self._pending.append(rows)
        for name, column in columns.items():
            self._pending_provenance[name].append(column)
        self._pending_rows += len(rows)
        if self._pending_rows >= self.metadata["chunk_tokens"]:
            with self._writing():
                self._flush(whole_chunks_only=True)

    def _provenance_columns(self, provenance: dict | None, n: int) -> dict[str, np.ndarray]:
        """``provenance`` checked against this store: the same keys it was created with, ``n`` each."""
        if not self._provenance:
            if provenance is not None:
                raise SAERegistryError(
                    f"{self.path} was created without token provenance; create it with provenance=True "
                    "to store token_id/seq/pos"
                )
            return {}
        if provenance is None or set(provenance) != set(PROVENANCE):
            got = "nothing" if provenance is None else sorted(provenance)
            raise SAERegistryError(
                f"{self.path} keeps token provenance: append needs provenance with keys "
                f"{sorted(PROVENANCE)}, got {got}"
            )
        columns = {}
        for name, int_dtype in PROVENANCE.items():
            column = np.asarray(torch.as_tensor(provenance[name]).cpu())
            if column.shape != (n,) or not np.issubdtype(column.dtype, np.integer):
                raise SAERegistryError(
                    f"provenance[{name!r}] must be {n} integers (one per row), got {column.dtype} {column.shape}"
                )
            columns[name] = column.astype(int_dtype)
        return columns

    def _flush(self, whole_chunks_only: bool) -> None:
        data = np.concatenate(self._pending) if self._pending else np.zeros((0, self.d))
        chunk = self.metadata["chunk_tokens"]
        n = (len(data) // chunk) * chunk if whole_chunks_only else len(data)
        if n:
            start = self._n_written
            columns = {name: np.concatenate(parts) for name, parts in self._pending_provenance.items()}

            def write() -> None:  # the same bytes to the same chunks: safe to do again after an outage
                self._array.resize((start + n, self.d))
                self._array[start : start + n] = data[:n]
                for name, array in self._provenance.items():
                    array.resize((start + n,))
                    array[start : start + n] = columns[name][:n]

            zarr_files.through_outages(self.path, f"writing rows {start}-{start + n}", RESUME_HINT, write)
            self._hash.update(np.ascontiguousarray(data[:n]).tobytes())
            for i in range(0, n, chunk):  # chunk by chunk, so that reopen() can redo the same sums
                self._add_stats(data[i : min(i + chunk, n)])
            self._pending_provenance = {name: [column[n:]] for name, column in columns.items()}
            self._n_written += n
        self._pending = [data[n:]] if n < len(data) else []
        self._pending_rows = len(data) - n

    def _add_stats(self, rows: np.ndarray) -> None:
        stored = to_float32(rows, self.dtype).double()  # statistics of what is on disk
        self._sum += stored.sum(0).numpy()
        self._sum_sq += stored.pow(2).sum(0).numpy()
        self._norm_sum += float(stored.norm(dim=1).sum())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A full disk while writing is an error that says so (zarr raises a bare OSError)."""
        try:
            yield
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise SAERegistryError(
                f"the disk is full: writing {self.path} failed ({e}). The store is left 'writing' (unfinished), "
                "so nothing will read it as whole; free some space, then harvest again"
            ) from e

    def close(self) -> None:
        """Write what is pending, the statistics and the fingerprint; mark the store complete."""
        if self._closed:
            return
        with self._writing():
            self._flush(whole_chunks_only=False)
            n = self._n_written
            if n < 2:
                raise SAERegistryError(f"a store needs at least 2 tokens; {self.path} got {n}")
            mean = self._sum / n
            var = np.maximum(self._sum_sq / n - mean**2, 0.0)
            final = {
                "n_tokens": n,
                "mean": mean.tolist(),
                "mean_norm": self._norm_sum / n,
                "total_variance": float(var.sum()),
                "fingerprint": fingerprint_hex(self._hash),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            zarr_files.through_outages(self.path, "finishing the store", RESUME_HINT,
                                       lambda: zarr_files.finish(self._group, final))
        self.metadata = dict(self._group.attrs)
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An exception inside the block leaves the store "writing": open() will refuse it.
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        status = self.metadata.get("status")
        return f"StoreWriter({str(self.path)!r}, n_tokens={len(self)}, d={self.d}, status={status!r})"


def _create_missing_arrays(group: zarr.Group) -> bool:
    """Create the store's empty arrays that ``group`` lacks (all of them, for a new store).

    Returns whether any was missing. Their layout comes from the group's attributes alone, so that a
    store whose creation was interrupted between its group and its arrays can be completed on resume.
    """
    attrs = group.attrs
    existing = set(group.array_keys())
    created = False
    if ARRAY not in existing:
        d, chunk_tokens, dtype = attrs["d"], attrs["chunk_tokens"], attrs["dtype"]
        group.create_array(ARRAY, shape=(0, d), chunks=(chunk_tokens, d),
                           dtype="uint16" if dtype == "bfloat16" else dtype,
                           compressors=zarr_files.codecs(attrs["compressor"]))
        created = True
    for name, int_dtype in PROVENANCE.items() if attrs.get("provenance") else ():
        if name not in existing:
            # small integers compress well whatever the activations use
            group.create_array(name, shape=(0,), chunks=(attrs["chunk_tokens"],), dtype=int_dtype,
                               compressors=[zarr.codecs.ZstdCodec(level=3)])
            created = True
    return created
