"""Harvest on Ray: documents cut into shards, one model replica per worker, one store at the end.

The Ray edge of harvesting, as :mod:`sae_registry.sweep` is the Ray edge of training: the harvest
itself (:func:`sae_registry.harvest.harvest`) runs without Ray, and this module only splits the work,
schedules it and joins it.

Design (shard sub-stores joined in order):

1. The driver shuffles the documents with the seed exactly as a one-worker harvest does, and cuts
   the shuffled list into ``workers`` contiguous shards *on batch boundaries* (a shard holds whole
   batches of ``batch_size`` documents), so that every forward pass sees the same windows, padded
   the same way, as in a one-worker harvest: the rows come out bit for bit the same.
2. Each shard is a Ray task (one model replica, ``resources`` each) that harvests its documents, in
   order, into its own sub-store ``<store>.shards/shard-00003.zarr`` beside the store. A sub-store is
   an ordinary store, written in whole chunks: a worker killed part way is retried by Ray
   (``max_retries``) and resumes its sub-store from its last whole chunk.
3. The driver runs the one-worker harvest loop over the same batches, taking each batch's rows from
   the sub-stores instead of the model (checking their token ids against its own tokenization), so
   the store, its provenance, statistics and fingerprint are those of a one-worker harvest by
   construction. The sub-stores are deleted when the store is finished.

``--resume`` after the driver died: finished sub-stores are kept, unfinished ones resume, and the
store resumes from its last whole chunk. Rows are copied once more than in a one-worker harvest (a
disk-speed pass, small beside the model's time).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import SAERegistryError
from .store import ActivationStore

SHARD_RETRIES = 3  # a worker killed (node lost, OOM) is started again this many times


def shard_bounds(n_documents: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` document ranges of the shards: contiguous, whole batches, as even as can be.

    With fewer batches than workers, some workers get no shard (there are fewer shards).
    """
    n_batches = -(-n_documents // batch_size)
    shards = min(workers, n_batches)
    cuts = [i * n_batches // shards * batch_size for i in range(shards + 1)]
    return [(a, min(b, n_documents)) for a, b in zip(cuts, cuts[1:]) if a < n_documents]


def _shard_dir(store_path: str | Path) -> Path:
    path = Path(store_path).absolute()
    return path.with_name(path.name + ".shards")


def parse_resources(resources: dict | str | None) -> dict:
    """``resources`` as a dict: ``"gpu=1,cpu=2"`` (the command line's form) or a dict already."""
    if not isinstance(resources, str):
        return dict(resources or {})
    parsed = {}
    for item in filter(None, (part.strip() for part in resources.split(","))):
        name, _, value = item.partition("=")
        try:
            parsed[name.strip()] = float(value)
        except ValueError:
            raise SAERegistryError(
                f"resources: {item!r} is not name=number; give e.g. gpu=1 or cpu=2,gpu=1"
            ) from None
    return parsed


def _ray_options(resources: dict | str | None) -> dict:
    """Ray task options for ``resources`` (``{"gpu": 1, "cpu": 2, "my_label": 1}``)."""
    resources = parse_resources(resources)
    options: dict = {"num_cpus": 1}
    for name, value in list(resources.items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise SAERegistryError(f"resources.{name} must be a number >= 0, got {value!r}")
        if name.lower() in ("cpu", "cpus", "num_cpus"):
            options["num_cpus"] = resources.pop(name)
        elif name.lower() in ("gpu", "gpus", "num_gpus"):
            options["num_gpus"] = resources.pop(name)
    if resources:
        options["resources"] = resources
    return options


def _harvest_shard(path: str, texts: list[str], options: dict) -> int:
    """One shard into its sub-store (resumed when there is one); the number of rows it holds."""
    from . import harvest as H

    if (Path(path) / "zarr.json").exists():
        try:
            return len(ActivationStore.open(path))  # finished by an earlier attempt
        except SAERegistryError:
            pass  # unfinished: resume it
    store = H.harvest(path, texts, resume=True, reuse=False, _in_order=True, **options)
    return len(store)


class _ShardRows:
    """Rows by global index, read from the shard sub-stores in shard order."""

    def __init__(self, paths: list[Path]) -> None:
        self.stores = [ActivationStore.open(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.stores])

    def __call__(self, start: int, n: int, token_ids: torch.Tensor) -> torch.Tensor:
        parts, ids = [], []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while len(parts) == 0 or sum(len(p) for p in parts) < n:
            if i >= len(self.stores):
                raise SAERegistryError("the shard sub-stores hold fewer rows than the documents give; "
                                       "harvest again with --overwrite")
            lo = pos - int(self.starts[i])
            hi = min(len(self.stores[i]), lo + n - sum(len(p) for p in parts))
            parts.append(self.stores[i].read(lo, hi))
            ids.append(torch.from_numpy(self.stores[i].provenance(lo, hi)["token_id"]))
            pos += hi - lo
            i += 1
        rows, got = torch.cat(parts), torch.cat(ids)
        if not torch.equal(got.long(), token_ids.long()):  # the shards were cut or written differently
            raise SAERegistryError(f"the shard sub-stores do not match the documents at row {start}; "
                                   "harvest again with --overwrite")
        return rows


def harvest_on_ray(store_path: str | Path, texts: list[str], *, workers: int, resources: dict | str | None,
                   overwrite: bool, resume: bool, options: dict) -> ActivationStore:
    """:func:`sae_registry.harvest.harvest` with ``workers`` Ray workers; see the module's doc."""
    from . import harvest as H
    from .cluster import connect

    ray_options = _ray_options(resources)
    store_path = Path(store_path).absolute()
    if "://" in str(store_path):
        raise SAERegistryError("a harvest with --workers writes a local store; harvest with one worker to a URL")
    if store_path.exists() and not (overwrite or resume):
        raise SAERegistryError(f"{store_path} already exists; pass overwrite=True (--overwrite) to replace it")
    shard_dir = _shard_dir(store_path)
    if shard_dir.exists() and not resume:
        shutil.rmtree(shard_dir)  # ours (named after the store), left by an earlier harvest
    shard_dir.mkdir(parents=True, exist_ok=True)

    order = list(range(len(texts)))
    random.Random(options["seed"]).shuffle(order)
    docs = [texts[i] for i in order]
    bounds = shard_bounds(len(docs), options["batch_size"], workers)
    paths = [shard_dir / f"shard-{i:05d}.zarr" for i in range(len(bounds))]
    # a worker's model goes on its own device; the driver never loads it
    shard_options = {**options, "progress": False, "text_source": "",
                     "device": "cuda" if ray_options.get("num_gpus") else options["device"]}

    import ray

    started = connect(None)
    try:
        task = ray.remote(_harvest_shard).options(max_retries=SHARD_RETRIES, retry_exceptions=False, **ray_options)
        refs = [task.remote(str(p), docs[a:b], shard_options) for p, (a, b) in zip(paths, bounds)]
        try:
            ray.get(refs)
        except ray.exceptions.RayError as e:
            raise SAERegistryError(
                f"a harvest worker failed ({type(e).__name__}: {str(e).splitlines()[0]}); its shard is kept: "
                "run the same harvest again with --resume to continue"
            ) from e
    finally:
        if started:
            ray.shutdown()
    store = H.harvest(store_path, texts, overwrite=overwrite and not resume, resume=resume, reuse=False,
                      _rows=_ShardRows(paths), **options)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return store
