"""What training, encoding and feature statistics read activations through: :class:`ActivationSource`.

Two backends satisfy it: the zarr :class:`~sae_registry.store.reader.ActivationStore` (on disk or
on an object store) and :class:`ArraySource` (a tensor or numpy array in memory). :func:`open_source`
is the one place a reference (a path, a URL, an array, an opened source) becomes a backend.

Both split rows alike, the last ``eval_fraction`` held out, and fingerprint alike: an array and a
store holding the same rows in the same dtype have the same fingerprint, so a dictionary trained on
either traces to the same data.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, overload, runtime_checkable

import numpy as np
import torch

from ..errors import SAERegistryError, require_float, require_int, require_positive_int
from .layout import fingerprint_hash, fingerprint_hex, held_out_start, row_range, split_range
from .reader import ActivationStore

# What a dictionary trained on an in-memory array records as its store path: the array was never
# written anywhere, so the path says so, and names the rows by their fingerprint.
MEMORY_PREFIX = "memory:"
KEPT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the store's dtypes: other floats become float32
_STATS_BYTES = 64 << 20  # rows summed at once while checking an array (as float64)


@runtime_checkable
class ActivationSource(Protocol):
    """Rows of activations ``[len(self), d]`` with a held-out split, read in float32 batches.

    What :func:`sae_registry.training.loop.train`, :func:`sae_registry.analysis.encode.encode_store`,
    :func:`sae_registry.analysis.cards.latent_stats` and the registry's lineage need, and no more.
    A new backend implements these; nothing else names the backend.
    """

    @property
    def path(self) -> Path | str:
        """Where the rows live (a folder, a URL, ``memory:<fingerprint>``): recorded as lineage, shown in errors."""

    @property
    def fingerprint(self) -> str:
        """A hash of the rows, their width and dtype: lineage, and how a resumed training knows its data."""

    @property
    def source(self) -> dict:
        """What the rows are activations of (``model``, ``layer``, ``hook``, ...); JSON data, possibly empty."""

    @property
    def d(self) -> int:
        """The width of a row: a dictionary's ``input_size`` must equal it."""

    @property
    def mean_norm(self) -> float:
        """The mean L2 norm of a row over all rows: training scales inputs by ``sqrt(d) / mean_norm``."""

    def __len__(self) -> int:
        """The number of rows, both splits."""

    def split_range(self, split: str) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``split``: ``train``, ``eval`` (the held-out last rows) or ``all``."""

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as a new float32 CPU tensor (negative positions count from the end)."""

    def batches(self, batch_size: int, *, split: str = "train", shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        """One epoch of float32 CPU batches ``[<=batch_size, d]`` of ``split``: every row exactly once;
        in order, or shuffled (the same ``seed``, the same batches). Arguments are checked when called;
        closing the iterator early releases what it holds."""


class ArraySource:
    """Activations in memory: a float ``[n, d]`` torch tensor or numpy array, read as a store is read.

    >>> source = ArraySource(acts)                      # [n, d]; the last 5% of rows held out
    >>> for batch in source.batches(4096, seed=0): ...  # float32 [<=4096, d]

    float32, float16 and bfloat16 rows are kept as given (not copied when already a contiguous CPU
    tensor or array: do not change them while the source is in use); other floats become float32, and
    a GPU tensor is copied to the host. They are checked once: 2-d, floats, at least 2 rows and a
    column, no NaN or Inf. ``source`` says what they are activations of (``{"model": ..., "layer":
    ...}``), as a store's does; it is recorded as lineage.
    """

    def __init__(self, acts: torch.Tensor | np.ndarray, *, eval_fraction: float = 0.05,
                 source: dict | None = None) -> None:
        require_float("eval_fraction", eval_fraction, above=0, max=1)
        if eval_fraction == 1:
            raise SAERegistryError("eval_fraction must be < 1, got 1: the training split would be empty")
        self.eval_fraction = float(eval_fraction)
        self._source = _json_dict("source", source)
        self._data = _rows(acts)
        self.dtype = str(self._data.dtype).removeprefix("torch.")
        self._fingerprint, self._mean_norm = _check_and_sum(self._data, self.dtype)

    @property
    def path(self) -> str:
        return f"{MEMORY_PREFIX}{self._fingerprint}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def source(self) -> dict:
        return self._source

    @property
    def d(self) -> int:
        return self._data.shape[1]

    @property
    def mean_norm(self) -> float:
        return self._mean_norm

    def __len__(self) -> int:
        return self._data.shape[0]

    @property
    def eval_start(self) -> int:
        """First row of the held-out split (the last ``eval_fraction`` of rows, at least one): as a store's."""
        return held_out_start(len(self), self.eval_fraction)

    def split_range(self, split: str) -> tuple[int, int]:
        return split_range(split, self.eval_start, len(self))

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        start, stop = row_range(start, stop, len(self))
        return self._data[start:stop].to(torch.float32, copy=True)

    def batches(self, batch_size: int, *, split: str = "train", shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        """One epoch of ``split``; shuffled, it is one permutation of the whole split (it is all in memory)."""
        require_positive_int("batch_size", batch_size)
        require_int("seed", seed, min=0)
        lo, hi = self.split_range(split)
        order = lo + torch.from_numpy(np.random.default_rng(seed).permutation(hi - lo)) if shuffle else None
        return self._batches(batch_size, lo, hi, order, drop_last)

    def _batches(self, batch_size: int, lo: int, hi: int, order: torch.Tensor | None,
                 drop_last: bool) -> Iterator[torch.Tensor]:
        for i in range(0, hi - lo, batch_size):
            if drop_last and i + batch_size > hi - lo:
                return
            if order is None:
                yield self._data[lo + i : min(lo + i + batch_size, hi)].to(torch.float32, copy=True)
            else:
                yield self._data[order[i : i + batch_size]].to(torch.float32)  # indexing made a copy

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, d={self.d}, dtype={self.dtype!r}, fingerprint={self.fingerprint!r})"


def _json_dict(name: str, value: object) -> dict:
    """``value`` (a dict of JSON data, or None for ``{}``), checked now: it goes into ``config.json`` at the end."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SAERegistryError(f"{name} must be a dict (e.g. {{'model': ..., 'layer': ...}}), "
                               f"got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise SAERegistryError(f"{name} must hold JSON data (strings, numbers, lists, dicts): {e}") from None
    return dict(value)


def _rows(acts: object) -> torch.Tensor:
    """``acts`` as a contiguous CPU tensor of a :data:`KEPT_DTYPES`, [n >= 2, d >= 1]; errors name what is wrong."""
    if not isinstance(acts, (torch.Tensor, np.ndarray)):
        raise SAERegistryError(f"acts must be a torch tensor or a numpy array of floats [n, d], got "
                               f"{type(acts).__name__}")
    if not (acts.dtype.kind == "f" if isinstance(acts, np.ndarray) else acts.dtype.is_floating_point):
        fix = ".astype(np.float32)" if isinstance(acts, np.ndarray) else ".float()"
        raise SAERegistryError(f"acts must hold floats, got {type(acts).__name__} of {acts.dtype}; convert it "
                               f"with {fix}")
    if acts.ndim != 2:
        raise SAERegistryError(f"acts must be 2-d, [n, d] (a row per token), got shape {tuple(acts.shape)}")
    n, d = acts.shape
    if n < 2 or d < 1:
        raise SAERegistryError(f"acts needs at least 2 rows (one to train on, one held out) and 1 column, got "
                               f"shape {tuple(acts.shape)}")
    if isinstance(acts, np.ndarray):  # shared, not copied, when already float32/float16 in C order
        keep = acts.dtype in (np.float32, np.float16)
        acts = np.ascontiguousarray(acts if keep else acts.astype(np.float32))
        with warnings.catch_warnings():  # a read-only array (np.load(..., mmap_mode="r")): every read copies
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            acts = torch.from_numpy(acts)
    tensor = acts.detach()
    if tensor.dtype not in KEPT_DTYPES:
        tensor = tensor.to(torch.float32)
    return tensor.cpu().contiguous()


def _check_and_sum(data: torch.Tensor, dtype: str) -> tuple[str, float]:
    """One pass over the rows: refuses NaN/Inf (naming the first such row); the fingerprint, as a store's
    writer computes it from the same rows in the same dtype; the mean norm of a row, as the writer sums it."""
    digest = fingerprint_hash(data.shape[1], dtype)
    norm_sum = 0.0
    block = max(1, _STATS_BYTES // (8 * data.shape[1]))
    for lo in range(0, len(data), block):
        rows = data[lo : lo + block]
        wide = rows.double()
        finite = torch.isfinite(wide).all(dim=1)
        if not bool(finite.all()):
            row = lo + int((~finite).nonzero()[0])
            raise SAERegistryError(f"acts holds NaN or Inf (row {row} is the first); drop or fix those rows first")
        digest.update(rows.view(torch.uint8).numpy().data)  # the rows' bytes, as stored (bfloat16 as its raw bits)
        norm_sum += float(wide.norm(dim=1).sum())
    return fingerprint_hex(digest), norm_sum / len(data)


Source = TypeVar("Source", bound=ActivationSource)
# What open_source (and so sae_registry.train) accepts.
SourceLike = ActivationSource | torch.Tensor | np.ndarray | str | os.PathLike


@overload
def open_source(ref: str | os.PathLike) -> ActivationStore: ...
@overload
def open_source(ref: torch.Tensor | np.ndarray) -> ArraySource: ...
@overload
def open_source(ref: Source) -> Source: ...


def open_source(ref: SourceLike) -> ActivationSource:
    """The activation source ``ref`` names: the one place a reference becomes a backend.

    - a local path, or a URL of an object store zarr reads (``s3://``, ``gs://``, ``az://``, ...):
      the zarr :class:`ActivationStore` there (opened and checked; other URLs are refused);
    - a torch tensor or numpy array ``[n, d]``: an :class:`ArraySource` of it (checked);
    - anything that already is an :class:`ActivationSource` (an opened store, an ``ArraySource``): as it is.

    ``memory:<fingerprint>``, the store path an in-memory array leaves in a dictionary's lineage, is
    refused by name: those rows were never written anywhere.
    """
    if isinstance(ref, (str, os.PathLike)):
        if str(ref).startswith(MEMORY_PREFIX):
            raise SAERegistryError(
                f"{ref} names activations that were held in memory (an array given to train); they were never "
                "written anywhere, so they cannot be opened again: pass the array itself, or a store path"
            )
        return ActivationStore.open(ref if isinstance(ref, str) else Path(ref))
    if isinstance(ref, (torch.Tensor, np.ndarray)):
        return ArraySource(ref)
    if isinstance(ref, ActivationSource):
        return ref
    raise SAERegistryError(
        f"activations must be a store path or URL, a torch tensor or numpy array of floats [n, d], or an "
        f"ActivationSource (e.g. an opened ActivationStore), got {type(ref).__name__}"
    )


if TYPE_CHECKING:  # the type checker's proof that both backends satisfy the protocol, as they are

    def _zarr_store_is_a_source(store: ActivationStore) -> ActivationSource:
        return store

    def _array_is_a_source(array: ArraySource) -> ActivationSource:
        return array
