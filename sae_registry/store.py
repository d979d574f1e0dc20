"""Activation stores: a zarr v3 group holding one ``[n_tokens, d]`` array plus its metadata.

Layout of a store directory::

    store.zarr/
      zarr.json                 group; attributes = the store's metadata (see ``metadata``)
      activations/              [n_tokens, d], chunked along tokens, compressed
      token_id/ seq/ pos/       optional token provenance, one entry per row, chunked like the rows:
                                the token's id (int32), its model input window (int64, 0, 1, ... in
                                harvest order) and its index in that window's input_ids (int32)

The group's ``status`` attribute is ``"writing"`` until :meth:`ActivationStore.close` writes the
statistics and the fingerprint and sets it to ``"complete"``; :meth:`ActivationStore.open` refuses
anything else, so an interrupted harvest is never read as if it were whole.

The last ``eval_fraction`` of tokens is the held-out split (chosen at creation, fixed for the life of
the store, so that every metric anywhere is computed on the same tokens). Harvests write documents in
order, so the split holds whole documents the training split never saw.

Reading (:meth:`batches`) follows what is fast for zarr: whole chunks in random order, shuffled
within a buffer of several chunks, decoded by background threads ahead of the consumer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import zarr
import zarr.codecs
import zarr.storage

from .config import STORE_DTYPES as DTYPES
from .errors import SAERegistryError, require_positive_int

FORMAT_VERSION = 1
ARRAY = "activations"
COMPRESSORS = ("lz4", "zstd", "none")
PROVENANCE = {"token_id": "int32", "seq": "int64", "pos": "int32"}  # array name -> dtype


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def _storage_options(url: str) -> dict:
    """fsspec options for ``url``: an S3-compatible endpoint from the environment, when set."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def _codecs(name: str) -> list:
    if name == "lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return []


def _to_numpy(array: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Rows as the numpy array zarr stores: bfloat16 is kept as its raw 16 bits (uint16)."""
    tensor = torch.as_tensor(array).detach().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def _finite(raw: np.ndarray, dtype: str) -> bool:
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


def _to_float32(raw: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(raw)).float()


class ActivationStore:
    """A zarr activation store: create and append, or open and read.

    >>> with ActivationStore.create("acts.zarr", d=384, source={"model": "minilm"}) as store:
    ...     store.append(chunk_of_activations)          # [n, 384], as often as needed
    >>> store = ActivationStore.open("acts.zarr")
    >>> for batch in store.batches(4096, seed=0): ...   # float32 torch tensors [<=4096, 384]
    """

    def __init__(self, path: Path | str, group: zarr.Group, writable: bool) -> None:
        self.path = path
        self._group = group
        self._array = group[ARRAY]
        if writable:  # every chunk a file, zeros too, so that open() can tell when one is missing
            self._array = self._array.with_config({"write_empty_chunks": True})
        self._writable = writable
        self.metadata: dict = dict(group.attrs)
        self._provenance = {name: group[name] for name in PROVENANCE} if self.has_provenance else {}
        if writable:
            self._pending_provenance: dict[str, list[np.ndarray]] = {name: [] for name in self._provenance}
            self._pending: list[np.ndarray] = []
            self._pending_rows = 0
            self._n_written = 0
            self._hash = hashlib.sha256(f"{self.metadata['d']}:{self.metadata['dtype']}:".encode())
            self._sum = np.zeros(self.d, dtype=np.float64)
            self._sum_sq = np.zeros(self.d, dtype=np.float64)
            self._norm_sum = 0.0

    # -- creating ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        d: int,
        *,
        dtype: str = "float32",
        chunk_tokens: int = 8192,
        compressor: str = "none",
        eval_fraction: float = 0.05,
        source: dict | None = None,
        overwrite: bool = False,
        provenance: bool = False,
    ) -> "ActivationStore":
        """Start a new store at ``path`` for ``d``-wide activations; fill it with :meth:`append`.

        ``source`` is free-form lineage (model, layer, hook, text...) kept in the metadata. With
        ``provenance``, every :meth:`append` must also give each row's ``token_id``, ``seq`` and ``pos``.
        """
        require_positive_int("d", d)
        require_positive_int("chunk_tokens", chunk_tokens)
        if dtype not in DTYPES:
            raise SAERegistryError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if compressor not in COMPRESSORS:
            raise SAERegistryError(
                f"compressor must be one of {', '.join(COMPRESSORS)}, got {compressor!r}"
            )
        if not 0 < eval_fraction < 1:
            raise SAERegistryError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        path = Path(path).absolute()
        if path.exists():
            if not overwrite:
                raise SAERegistryError(
                    f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
                )
            shutil.rmtree(path)
        group = zarr.create_group(store=zarr.storage.LocalStore(path), zarr_format=3)
        group.create_array(
            ARRAY,
            shape=(0, d),
            chunks=(chunk_tokens, d),
            dtype="uint16" if dtype == "bfloat16" else dtype,
            compressors=_codecs(compressor),
        )
        for name, int_dtype in PROVENANCE.items() if provenance else ():
            # small integers compress well whatever the activations use
            group.create_array(name, shape=(0,), chunks=(chunk_tokens,), dtype=int_dtype,
                               compressors=[zarr.codecs.ZstdCodec(level=3)])
        group.attrs.update(
            {
                "format": "sae-registry/activation-store",
                "format_version": FORMAT_VERSION,
                "status": "writing",
                "d": d,
                "dtype": dtype,
                "chunk_tokens": chunk_tokens,
                "compressor": compressor,
                "eval_fraction": eval_fraction,
                "source": source or {},
                "provenance": bool(provenance),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        return cls(path, group, writable=True)

    def append(
        self, array: np.ndarray | torch.Tensor, provenance: dict[str, np.ndarray | torch.Tensor] | None = None
    ) -> None:
        """Add rows ``[n, d]``. Full chunks go to disk at once; the rest waits for more rows.

        A store created with ``provenance=True`` needs ``provenance={"token_id": [n], "seq": [n],
        "pos": [n]}`` with every append; the arrays stay aligned with the rows.
        """
        if not self._writable:
            raise SAERegistryError(f"{self.path} is open for reading; create a new store to write")
        tensor = torch.as_tensor(array).detach().cpu()
        if tensor.ndim != 2 or tensor.shape[1] != self.d:
            raise SAERegistryError(
                f"append needs rows of shape [n, {self.d}], got {tuple(tensor.shape)}"
            )
        columns = self._provenance_columns(provenance, len(tensor))
        rows = _to_numpy(tensor, self.dtype)
        stored = _to_float32(rows, self.dtype).double()  # statistics of what is on disk
        if not torch.isfinite(stored).all():
            raise SAERegistryError(
                f"append got NaN or Inf activations (or values too large for {self.dtype}); "
                "refusing to store them"
            )
        self._pending.append(rows)
        for name, column in columns.items():
            self._pending_provenance[name].append(column)
        self._pending_rows += len(rows)
        chunk = self.metadata["chunk_tokens"]
        if self._pending_rows >= chunk:
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
            self._array.resize((start + n, self.d))
            self._array[start : start + n] = data[:n]
            self._hash.update(np.ascontiguousarray(data[:n]).tobytes())
            for i in range(0, n, chunk):  # chunk by chunk, so that reopen() can redo the same sums
                self._add_stats(data[i : min(i + chunk, n)])
            for name, array in self._provenance.items():
                column = np.concatenate(self._pending_provenance[name])
                array.resize((start + n,))
                array[start : start + n] = column[:n]
                self._pending_provenance[name] = [column[n:]]
            self._n_written += n
        self._pending = [data[n:]] if n < len(data) else []
        self._pending_rows = len(data) - n

    def _add_stats(self, rows: np.ndarray) -> None:
        stored = _to_float32(rows, self.dtype).double()  # statistics of what is on disk
        self._sum += stored.sum(0).numpy()
        self._sum_sq += stored.pow(2).sum(0).numpy()
        self._norm_sum += float(stored.norm(dim=1).sum())

    @classmethod
    def reopen(cls, path: str | Path) -> ActivationStore:
        """Reopen a store that an interrupted writer left ``writing``, to append where it stopped.

        Keeps the whole chunks on disk (before close() a writer flushes only whole chunks), drops
        anything past them, and redoes the fingerprint and statistics from those rows in the order a
        writer does, so that a store finished after reopen() equals one written in one go, bit for
        bit. ``len(store)`` says how many rows were kept: the writer goes on from the next one.
        """
        path = Path(path).absolute()
        if not (path / "zarr.json").exists():
            raise SAERegistryError(f"no activation store at {path} to resume; start a new one")
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
        status = group.attrs.get("status")
        if group.attrs.get("format") != "sae-registry/activation-store" or status != "writing":
            raise SAERegistryError(
                f"{path} is not an unfinished activation store (status {status!r}); nothing to resume"
            )
        store = cls(path, group, writable=True)
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
        with self._writing():
            self._close()

    def _close(self) -> None:
        if not self._writable:
            return
        self._flush(whole_chunks_only=False)
        n = self._n_written
        if n < 2:
            raise SAERegistryError(f"a store needs at least 2 tokens; {self.path} got {n}")
        mean = self._sum / n
        var = np.maximum(self._sum_sq / n - mean**2, 0.0)
        self._group.attrs.update(
            {
                "status": "complete",
                "n_tokens": n,
                "mean": mean.tolist(),
                "mean_norm": self._norm_sum / n,
                "total_variance": float(var.sum()),
                "fingerprint": self._hash.hexdigest()[:16],
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        self.metadata = dict(self._group.attrs)
        self._writable = False

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An exception inside the block leaves the store "writing": open() will refuse it.
        if exc_type is None:
            self.close()

    # -- opening and reading ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "ActivationStore":
        """Open a finished store for reading; refuses missing, foreign or unfinished stores.

        ``path`` is a directory or a URL that fsspec knows (``s3://bucket/acts.zarr``: the
        endpoint and credentials come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so
        that every node of a cluster can read one store.
        """
        if is_url(path):
            path = str(path).rstrip("/")
            try:
                zstore = zarr.storage.FsspecStore.from_url(path, read_only=True, storage_options=_storage_options(path))
                group = zarr.open_group(zstore, mode="r")
                attrs = dict(group.attrs)
                array = group[ARRAY]
            except Exception as e:  # fsspec and its backends raise many types for "not there"
                raise SAERegistryError(f"no readable activation store at {path}: {type(e).__name__}: {e}") from e
        else:
            path = Path(path).absolute()
            if not (path / "zarr.json").exists():
                raise SAERegistryError(f"no activation store at {path}; make one with `sae-registry harvest`")
            try:
                group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
                attrs = dict(group.attrs)
                array = group[ARRAY]
            except (KeyError, ValueError, OSError) as e:
                raise SAERegistryError(f"{path} is not a readable activation store: {e}") from e
        if attrs.get("format") != "sae-registry/activation-store":
            raise SAERegistryError(f"{path} is a zarr group but not an sae-registry activation store")
        if attrs.get("status") != "complete":
            raise SAERegistryError(
                f"{path} was never finished (its writer stopped before close()); it may be "
                "missing tokens. Delete it and harvest again."
            )
        if array.shape != (attrs["n_tokens"], attrs["d"]):
            raise SAERegistryError(
                f"{path} says it holds {attrs['n_tokens']} x {attrs['d']} but its array is "
                f"{array.shape}; the store is damaged. Delete it and harvest again."
            )
        if not is_url(path) and array.nchunks_initialized != array.nchunks:  # zarr would read zeros there
            raise SAERegistryError(
                f"{path} is damaged: {array.nchunks - array.nchunks_initialized} of the {array.nchunks} chunk "
                f"files of {ARRAY}/ are missing (deleted, or never copied). Delete the store and harvest it again."
            )
        for name in PROVENANCE if attrs.get("provenance") else ():
            if name not in group or group[name].shape != (attrs["n_tokens"],):
                raise SAERegistryError(
                    f"{path} says it keeps token provenance but its {name!r} array is missing or does not "
                    "match its rows; the store is damaged. Delete it and harvest again."
                )
        return cls(path, group, writable=False)

    def __len__(self) -> int:
        return self.metadata.get("n_tokens", getattr(self, "_n_written", 0))

    @property
    def d(self) -> int:
        return self.metadata["d"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def source(self) -> dict:
        return self.metadata.get("source", {})

    @property
    def has_provenance(self) -> bool:
        """Whether each row's token id and place (window ``seq``, position ``pos``) were kept."""
        return bool(self.metadata.get("provenance", False))

    def provenance(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """``{"token_id", "seq", "pos"}`` of rows ``[start, stop)``, aligned with :meth:`read`."""
        if not self.has_provenance:
            raise SAERegistryError(
                f"{self.path} was harvested without token provenance (token ids, windows, positions); "
                "re-harvest it with this version of sae-registry (`sae-registry harvest`) to get them"
            )
        return {name: array[start:stop] for name, array in self._provenance.items()}

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.metadata["mean"], dtype=torch.float32)

    @property
    def mean_norm(self) -> float:
        return self.metadata["mean_norm"]

    @property
    def eval_start(self) -> int:
        """First token of the held-out split (the last ``eval_fraction`` of tokens, at least one)."""
        n = len(self)
        return n - min(n - 1, max(1, round(n * self.metadata["eval_fraction"])))

    def split_range(self, split: str) -> tuple[int, int]:
        if split == "train":
            return 0, self.eval_start
        if split == "eval":
            return self.eval_start, len(self)
        if split == "all":
            return 0, len(self)
        raise SAERegistryError(f"split must be 'train', 'eval' or 'all', got {split!r}")

    def num_tokens(self, split: str = "train") -> int:
        lo, hi = self.split_range(split)
        return hi - lo

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as a float32 tensor."""
        start, stop, _ = slice(start, stop).indices(self._array.shape[0])
        return _to_float32(self._rows(start, stop), self.dtype)

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
            rows = self._array[start:stop]
        except (RuntimeError, ValueError, OSError) as e:  # codecs raise RuntimeError, a short raw chunk ValueError
            return None, f"{type(e).__name__}: {e}"
        return rows, None if _finite(rows, self.dtype) else "it holds NaN or Inf"

    def read_split(self, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
        """A whole split (or its first ``max_tokens`` rows) as a float32 tensor."""
        lo, hi = self.split_range(split)
        if max_tokens is not None:
            hi = min(hi, lo + max_tokens)
        return self.read(lo, hi)

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 8,
        prefetch: int = 4,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """One epoch of float32 batches ``[batch_size, d]`` (the last may be smaller).

        With ``shuffle``, chunks are read in a random order and rows shuffled across a buffer of
        ``buffer_chunks`` chunks; the same ``seed`` gives the same batches. Every token of the split
        appears exactly once per epoch. Reading and decoding run in background threads.
        """
        require_positive_int("batch_size", batch_size)
        lo, hi = self.split_range(split)
        chunk = self.metadata["chunk_tokens"]
        spans = [
            (max(start, lo), min(start + chunk, hi))
            for start in range((lo // chunk) * chunk, hi, chunk)
        ]
        rng = np.random.default_rng(seed)
        if shuffle:
            spans = [spans[i] for i in rng.permutation(len(spans))]
        out: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                leftover = np.zeros((0, self.d), dtype=self._array.dtype)
                with ThreadPoolExecutor(max_workers=2) as pool:
                    for g in range(0, len(spans), buffer_chunks):
                        group = spans[g : g + buffer_chunks]
                        parts = list(pool.map(lambda s: self._rows(s[0], s[1]), group))
                        rows = np.concatenate([leftover, *parts])
                        if shuffle:
                            rows = rows[rng.permutation(len(rows))]
                        last_group = g + buffer_chunks >= len(spans)
                        n_full = (len(rows) // batch_size) * batch_size
                        for i in range(0, n_full, batch_size):
                            if not put(_to_float32(rows[i : i + batch_size], self.dtype)):
                                return
                        leftover = rows[n_full:]
                        if last_group and len(leftover) and not drop_last:
                            put(_to_float32(leftover, self.dtype))
                put(None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(target=produce, name="store-batches", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def __repr__(self) -> str:
        status = self.metadata.get("status")
        return f"ActivationStore({str(self.path)!r}, n_tokens={len(self)}, d={self.d}, status={status!r})"
