"""The reader: :class:`ActivationStore` opens a finished store (checked), reads it, and draws shuffled batches.

Writing is :mod:`sae_registry.store.writer` (reached through
:meth:`ActivationStore.create` / :meth:`ActivationStore.reopen`). Reading (:meth:`batches`) follows
what is fast for zarr: whole chunks in random order into a shuffle buffer sized by a memory budget
(``SHUFFLE_BYTES``), each batch drawn at random from it, decoded by background threads ahead of the
consumer (:mod:`sae_registry._util.prefetch`).

What a store's metadata is trusted for: its shape, chunking and statistics are checked at open
(chunks bounded by the store's size and a memory budget, every chunk file present); its ``source``
is description only.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.storage

from .._util.prefetch import prefetched
from ..errors import SAERegistryError, require_positive_int
from . import zarr_files
from .checks import check_blosc_frames, check_shape
from .layout import (
    ARRAY,
    DEFAULT_CHUNK_TOKENS,
    FORMAT,
    MAX_CHUNK_BYTES,
    PROVENANCE,
    READ_AGAIN,
    SHUFFLE_BYTES,
    StoreInfo,
    finite,
    held_out_start,
    row_range,
    split_range,
    to_float32,
)
from .writer import StoreWriter


class ActivationStore(StoreInfo):
    """A finished zarr activation store, open for reading; :meth:`create` / :meth:`reopen` write one.

    >>> with ActivationStore.create("acts.zarr", d=384, source={"model": "minilm"}) as store:
    ...     store.append(chunk_of_activations)          # [n, 384], as often as needed
    >>> store = ActivationStore.open("acts.zarr")
    >>> for batch in store.batches(4096, seed=0): ...   # float32 torch tensors [<=4096, 384]
    """

    def __init__(self, path: Path | str, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self._array = group[ARRAY]
        self.metadata: dict = dict(group.attrs)
        self._provenance = {name: group[name] for name in PROVENANCE} if self.has_provenance else {}

    # -- writing (the writer lives in writer.py) ----------------------------------------------

    @staticmethod
    def create(
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
        """Start a new store at ``path`` for ``d``-wide activations; fill it with ``append``.

        ``source`` is free-form lineage (model, layer, hook, text...) kept in the metadata. With
        ``provenance``, every ``append`` must also give each row's ``token_id``, ``seq`` and ``pos``.
        ``overwrite`` replaces an existing store, and only a store: any other folder is refused.
        Returns a :class:`~sae_registry.store.writer.StoreWriter` (a context manager that closes
        the store when its block ends without an error).
        """
        return StoreWriter.create(path, d, dtype=dtype, chunk_tokens=chunk_tokens, compressor=compressor,
                                  eval_fraction=eval_fraction, source=source, overwrite=overwrite,
                                  provenance=provenance)

    @staticmethod
    def reopen(path: str | Path) -> StoreWriter:
        """Reopen a store an interrupted writer left ``writing``; see :meth:`StoreWriter.reopen
        <sae_registry.store.writer.StoreWriter.reopen>`."""
        return StoreWriter.reopen(path)

    def append(self, *args: object, **kwargs: object) -> None:
        """Refused: a store open for reading is finished."""
        raise SAERegistryError(f"{self.path} is open for reading; create a new store to write")

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> ActivationStore:
        """Open a finished store for reading; refuses missing, foreign, unfinished or damaged stores.

        ``path`` is a directory or an object-store URL (``s3://bucket/acts.zarr``: the endpoint and
        credentials come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...; also ``gs://``,
        ``az://``, ``abfs://``), so that every node of a cluster can read one store; other URLs are
        refused before anything is fetched. A chunk over ``max_chunk_bytes`` decoded is refused.
        """
        require_positive_int("max_chunk_bytes", max_chunk_bytes)
        path = zarr_files.location(path)
        if isinstance(path, str):
            zstore = zarr_files.open_store(path, read_only=True)  # no credentials, no endpoint: an error in seconds
            try:
                group = zarr.open_group(zstore, mode="r")
                attrs = dict(group.attrs)
                array = group[ARRAY]
            except Exception as e:  # fsspec and its backends raise many types for "not there"
                raise SAERegistryError(f"no readable activation store at {path}: {type(e).__name__}: {e}") from e
        else:
            if not (path / "zarr.json").exists():
                raise SAERegistryError(f"no activation store at {path}; make one with `sae-registry harvest`")
            try:
                group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
                attrs = dict(group.attrs)
                array = group[ARRAY]
            except (KeyError, ValueError, OSError) as e:
                raise SAERegistryError(f"{path} is not a readable activation store: {e}") from e
        zarr_files.require_finished(
            path, attrs, FORMAT, what="an sae-registry activation store",
            stopped="its writer stopped before close()", fix="Delete it and harvest again.",
        )
        check_shape(path, attrs, group, array, max_chunk_bytes)
        if array.nchunks_initialized != array.nchunks:  # zarr would read zeros there
            raise SAERegistryError(
                f"{path} is damaged: {array.nchunks - array.nchunks_initialized} of the {array.nchunks} chunk "
                f"files of {ARRAY}/ are missing (deleted, or never copied). Delete the store and harvest it again."
            )
        check_blosc_frames(path, array, attrs.get("chunk_tokens") or array.chunks[0])
        return cls(path, group)

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.metadata["n_tokens"]

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    def provenance(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """``{"token_id", "seq", "pos"}`` of rows ``[start, stop)``, aligned with :meth:`read`."""
        if not self.has_provenance:
            raise SAERegistryError(
                f"{self.path} was harvested without token provenance (token ids, windows, positions); "
                "re-harvest it with this version of sae-registry (`sae-registry harvest`) to get them"
            )
        return {name: zarr_files.through_outages(self.path, f"reading the {name} of rows {start}-{stop}", READ_AGAIN,
                                                 lambda array=array: array[start:stop])
                for name, array in self._provenance.items()}

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.metadata["mean"], dtype=torch.float32)

    @property
    def mean_norm(self) -> float:
        return self.metadata["mean_norm"]

    @property
    def eval_start(self) -> int:
        """First token of the held-out split (the last ``eval_fraction`` of tokens, at least one)."""
        return held_out_start(len(self), self.metadata["eval_fraction"])

    def split_range(self, split: str) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``split`` (``train``, ``eval`` or ``all``)."""
        return split_range(split, self.eval_start, len(self))

    def num_tokens(self, split: str = "train") -> int:
        lo, hi = self.split_range(split)
        return hi - lo

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as a float32 tensor (negative positions count from the end, as in a slice)."""
        start, stop = row_range(start, stop, self._array.shape[0])
        return to_float32(self._rows(start, stop), self.dtype)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Stored rows ``[start, stop)``; a chunk that cannot be decoded, or holds NaN/Inf, is an error naming it."""
        rows, why = self._try_rows(start, stop)
        if why is None:
            return rows
        chunk = self.metadata["chunk_tokens"]
        for lo in range(start - start % chunk, stop, chunk):  # which chunk: only read again on failure
            bad = self._try_rows(max(lo, start), min(lo + chunk, stop))[1]
            if bad is not None:
                start, stop, why = max(lo, start), min(lo + chunk, stop), bad
                break
        raise SAERegistryError(
            f"{self.path} is damaged: chunk {start // chunk} of {ARRAY}/ (rows {start}-{stop}) cannot be read "
            f"({why}). Delete the store and harvest it again."
        )

    def _try_rows(self, start: int, stop: int) -> tuple[np.ndarray | None, str | None]:
        try:
            rows = zarr_files.through_outages(self.path, f"reading rows {start}-{stop}", READ_AGAIN,
                                              lambda: self._array[start:stop])
        except SAERegistryError:
            raise
        except (RuntimeError, ValueError, OSError) as e:  # codecs raise RuntimeError, a short raw chunk ValueError
            return None, f"{type(e).__name__}: {e}"
        return rows, None if finite(rows, self.dtype) else "it holds NaN or Inf"

    def read_split(self, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
        """A whole split (or its first ``max_tokens`` rows) as a float32 tensor."""
        lo, hi = self.split_range(split)
        if max_tokens is not None:
            hi = min(hi, lo + max_tokens)
        return self.read(lo, hi)

    def shuffle_window(self, batch_size: int, split: str = "train", shuffle_tokens: int | None = None) -> int:
        """Rows :meth:`batches` shuffles together: ``shuffle_tokens``, else as many as fit in
        ``SHUFFLE_BYTES`` (256 MiB) stored; at least a chunk and a batch, at most the whole split."""
        row_bytes = self.d * (4 if self.dtype == "float32" else 2)
        window = shuffle_tokens if shuffle_tokens is not None else max(1, SHUFFLE_BYTES // row_bytes)
        return min(self.num_tokens(split), max(window, self.metadata["chunk_tokens"] + batch_size))

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        shuffle_tokens: int | None = None,
        prefetch: int = 4,
        drop_last: bool = False,
        threads: int = 2,
    ) -> Iterator[torch.Tensor]:
        """One epoch of float32 batches ``[batch_size, d]`` (the last may be smaller).

        With ``shuffle``, whole chunks are read in a random order into a shuffle buffer of
        :meth:`shuffle_window` rows (by default as many as 256 MiB holds, so the window grows with the
        store up to that budget, and a store that fits is shuffled as a whole); each batch is
        ``batch_size`` rows drawn at random from the buffer, and the next chunk comes in when there is
        room. The same ``seed`` gives the same batches. Every token of the split appears exactly once
        per epoch. Reading and decoding run in background threads: ``threads`` chunks at once (more
        for an object store, where each chunk is a request that waits).

        Memory is bounded by the buffer, not the store: the window's rows plus about
        ``threads + 1`` chunks being read and ``prefetch`` batches, whatever the store's size.
        """
        require_positive_int("batch_size", batch_size)
        if shuffle_tokens is not None:
            require_positive_int("shuffle_tokens", shuffle_tokens)
        require_positive_int("prefetch", prefetch)
        require_positive_int("threads", threads)
        lo, hi = self.split_range(split)
        chunk = self.metadata["chunk_tokens"]
        spans = [(max(start, lo), min(start + chunk, hi)) for start in range((lo // chunk) * chunk, hi, chunk)]
        window = self.shuffle_window(batch_size, split, shuffle_tokens)

        def chunks(order: list[tuple[int, int]], pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
            """The rows of ``order``'s spans, in that order, at most ``threads`` reads ahead."""
            ahead: deque = deque(pool.submit(self._rows, *span) for span in order[:threads])
            for span in order[threads:] + [None] * len(ahead):
                rows = ahead.popleft().result()
                if span is not None:
                    ahead.append(pool.submit(self._rows, *span))
                yield rows

        def in_order() -> Iterator[torch.Tensor]:
            leftover = np.zeros((0, self.d), dtype=self._array.dtype)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for part in chunks(spans, pool):
                    rows = np.concatenate([leftover, part])
                    n_full = (len(rows) // batch_size) * batch_size
                    for i in range(0, n_full, batch_size):
                        yield to_float32(rows[i : i + batch_size], self.dtype)
                    leftover = rows[n_full:]
            if len(leftover) and not drop_last:
                yield to_float32(leftover, self.dtype)

        def shuffled() -> Iterator[torch.Tensor]:
            rng = np.random.default_rng(seed)
            order = [spans[i] for i in rng.permutation(len(spans))]
            buffer = np.empty((window, self.d), dtype=self._array.dtype)
            n = 0  # rows [0, n) of the buffer are waiting to go out

            def take(k: int) -> torch.Tensor:
                """``k`` rows drawn at random from the buffer; the buffer's last rows fill their places."""
                nonlocal n
                picked = rng.choice(n, k, replace=False)
                out = to_float32(buffer[picked], self.dtype)
                tail = n - k
                kept = np.ones(k, dtype=bool)
                kept[picked[picked >= tail] - tail] = False
                buffer[picked[picked < tail]] = buffer[tail + np.flatnonzero(kept)]
                n = tail
                return out

            with ThreadPoolExecutor(max_workers=threads) as pool:
                for part in chunks(order, pool):
                    while n + len(part) > window:  # full: batches go out until the chunk fits
                        yield take(batch_size)
                    buffer[n : n + len(part)] = part
                    n += len(part)
            while n >= batch_size:
                yield take(batch_size)
            if n and not drop_last:
                yield take(n)

        return prefetched(shuffled if shuffle else in_order, prefetch, name="store-batches")

    def __repr__(self) -> str:
        status = self.metadata.get("status")
        return f"ActivationStore({str(self.path)!r}, n_tokens={len(self)}, d={self.d}, status={status!r})"


# -- finding stores by what they hold ------------------------------------------------------------------


def store_roots(store_root: str | Path | None = None) -> list[Path | str]:
    """Where stores are looked for by content key: ``store_root``, else ``$SAE_REGISTRY_STORE_ROOT`` (read now);
    a folder or an object-store prefix (``s3://bucket/stores``)."""
    root = store_root or os.environ.get("SAE_REGISTRY_STORE_ROOT")
    return [zarr_files.location(root)] if root else []


def list_stores(roots: list[Path | str]) -> list[tuple[Path | str, dict]]:
    """Finished stores directly under each of ``roots`` (and each root itself), with their attributes."""
    found, seen = [], set()
    for root in roots:
        for path, attrs in zarr_files.groups_under(zarr_files.location(root)):
            same = path.resolve() if isinstance(path, Path) else path
            if attrs.get("format") == FORMAT and attrs.get("status") == "complete" and same not in seen:
                seen.add(same)
                found.append((path, attrs))
    return found


def find_by_key(key: str, roots: list[Path | str]) -> Path | str | None:
    """The finished store under ``roots`` whose content key is ``key`` (or starts with it), if any."""
    for path, attrs in list_stores(roots):
        have = str(attrs.get("source", {}).get("content_key", ""))
        if have and have.startswith(key):
            return path
    return None
