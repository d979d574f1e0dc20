"""Harvest on Ray: the model's batches cut into shards, one model replica per worker, one store at the end.

The Ray edge of harvesting, as :mod:`sae_registry.sweep.driver` is the Ray edge of training: the harvest
itself (:func:`sae_registry.harvest.local.harvest`) runs without Ray, and this module only splits the work,
schedules it and joins it.

Design (shard sub-stores joined in order):

1. The driver shuffles the documents with the seed and cuts them into the batches of token windows
   exactly as a one-worker harvest does (packed or not: packing joins documents across batches, so
   the unit of work is the batch, never the document), and cuts the list of batches into ``workers``
   contiguous shards, so that every forward pass sees the same windows, padded the same way, as in a
   one-worker harvest: the rows come out bit for bit the same.
2. Each shard is a Ray task (one model replica, ``resources`` each) that runs the model over its
   batches, in order, into its own sub-store ``<store>.shards/shard-00003.zarr`` beside the store (a
   folder of one sub-store per hook with several hooks; an ``s3://`` prefix for a store on S3). A
   sub-store is an ordinary store, written in whole chunks: a worker killed part way is retried by Ray
   (``max_retries``) and resumes its sub-store from its last whole chunk.
3. The driver runs the one-worker harvest loop over the same batches, taking each batch's rows from
   the sub-stores instead of the model (checking their token ids against its own tokenization), so
   the stores, their provenance, statistics and fingerprints are those of a one-worker harvest by
   construction. The sub-stores are deleted when the stores are finished.

``--resume`` after the driver died: finished sub-stores are kept, unfinished ones resume, and the
store resumes from its last whole chunk. Rows are copied once more than in a one-worker harvest (a
disk-speed pass, small beside the model's time).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .._util.cluster import connect
from ..errors import SAERegistryError
from ..store import zarr_files
from ..store.reader import ActivationStore

SHARD_RETRIES = 3  # a worker killed (node lost, OOM) is started again this many times


def shard_bounds(n_documents: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` document ranges of the shards: contiguous, whole batches, as even as can be.

    With fewer batches than workers, some workers get no shard (there are fewer shards).
    """
    n_batches = -(-n_documents // batch_size)
    shards = min(workers, n_batches)
    cuts = [i * n_batches // shards * batch_size for i in range(shards + 1)]
    return [(a, min(b, n_documents)) for a, b in zip(cuts, cuts[1:]) if a < n_documents]


def _shard_dir(store_path: Path | str) -> Path | str:
    if isinstance(store_path, str):
        return store_path + ".shards"
    return store_path.with_name(store_path.name + ".shards")


def _join(where: Path | str, name: str) -> Path | str:
    return f"{where}/{name}" if isinstance(where, str) else where / name


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


def _hook_paths(where: Path | str, hooks: list[str] | None) -> dict[str | None, Path | str]:
    """The stores a harvest into ``where`` writes: ``where`` itself, or ``where/<hook>.zarr`` per hook."""
    return {h: _join(where, f"{h}.zarr") for h in hooks} if hooks else {None: where}


def _finished(path: Path | str) -> bool:
    if not zarr_files.exists(path):
        return False
    try:
        ActivationStore.open(path)
        return True
    except SAERegistryError:
        return False


def _harvest_shard(harvest: Callable, path: str, label: str, batches: list, options: dict) -> int:
    """One shard's batches into its sub-store(s) by ``harvest`` (the one-worker harvest), resumed when
    there are some; the number of rows."""
    where = zarr_files.location(path)
    paths = _hook_paths(where, options.get("hooks"))
    if all(_finished(p) for p in paths.values()):  # finished by an earlier attempt
        return len(ActivationStore.open(next(iter(paths.values()))))
    # several hooks close one after another: one finished beside an unfinished one is harvested again
    for p in paths.values():
        if _finished(p):
            zarr_files.delete_tree(p)
    batches = [(ids.long(), mask.long(), keep) for ids, mask, keep in batches]  # as the tokenizer gave them
    stores = harvest(where, [label], resume=True, reuse=False, _batches=batches, **options)
    return len(next(iter(stores.values())) if isinstance(stores, dict) else stores)


class _ShardRows:
    """Rows by global index, read from the shard sub-stores in shard order: one list of rows per hook,
    in the order the hooks were given."""

    def __init__(self, paths: list[dict[str | None, Path | str]]) -> None:
        self.stores = [[ActivationStore.open(p) for p in shard.values()] for shard in paths]
        self.names = range(len(self.stores[0]))
        self.starts = np.cumsum([0] + [len(shard[0]) for shard in self.stores])

    def __call__(self, start: int, n: int, token_ids: torch.Tensor) -> list[torch.Tensor]:
        parts: list[list] = [[] for _ in self.names]
        ids: list[torch.Tensor] = []
        got, pos = 0, start
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while got < n or not ids:
            if i >= len(self.stores):
                raise SAERegistryError("the shard sub-stores hold fewer rows than the documents give; "
                                       "harvest again with --overwrite")
            shard = self.stores[i]
            lo = pos - int(self.starts[i])
            hi = min(len(shard[0]), lo + n - got)
            for name in self.names:
                parts[name].append(shard[name].read(lo, hi))
            ids.append(torch.from_numpy(shard[0].provenance(lo, hi)["token_id"]))
            got += hi - lo
            pos += hi - lo
            i += 1
        if not torch.equal(torch.cat(ids).long(), token_ids.long()):  # the shards were cut or written differently
            raise SAERegistryError(f"the shard sub-stores do not match the documents at row {start}; "
                                   "harvest again with --overwrite")
        return [torch.cat(rows) for rows in parts]


def harvest_on_ray(harvest: Callable, store_path: str | Path, texts: list[str], batches: list, *, workers: int,
                   resources: dict | str | None, overwrite: bool, resume: bool, options: dict):
    """``harvest`` (:func:`sae_registry.harvest.local.harvest`, handed down so that this module needs
    not import it) with ``workers`` Ray workers over ``batches`` (the batches of windows a one-worker
    harvest of ``texts`` runs the model on); see the module's doc."""
    ray_options = _ray_options(resources)
    where = zarr_files.location(store_path)
    hooks = list(options["hooks"]) if options.get("hooks") else None
    if not (overwrite or resume):
        for p in _hook_paths(where, hooks).values():
            if zarr_files.exists(p) or (isinstance(p, Path) and p.exists()):
                raise SAERegistryError(f"{p} already exists; pass overwrite=True (--overwrite) to replace it")
    shard_dir = _shard_dir(where)
    if not resume:
        zarr_files.delete_tree(shard_dir)  # ours (named after the store), left by an earlier harvest
    bounds = shard_bounds(len(batches), 1, workers)
    paths = [_join(shard_dir, f"shard-{i:05d}" if hooks else f"shard-{i:05d}.zarr") for i in range(len(bounds))]
    # a worker's model goes on its own device; the driver never loads it
    shard_options = {**options, "progress": False, "text_source": "",
                     "device": "cuda" if ray_options.get("num_gpus") else options["device"]}

    import ray

    started = connect(None)
    try:
        task = ray.remote(_harvest_shard).options(max_retries=SHARD_RETRIES, retry_exceptions=False, **ray_options)
        # token ids as int32 and the mask as bools on the way (5 bytes a token, not 16); widened back in the worker
        refs = [task.remote(harvest, str(p), f"shard {i} of {where}", [(ids.int(), mask.bool(), keep) for ids, mask, keep
                                                                in batches[a:b]], shard_options)
                for i, (p, (a, b)) in enumerate(zip(paths, bounds))]
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
    rows = _ShardRows([_hook_paths(p, hooks) for p in paths])
    store = harvest(store_path, texts, overwrite=overwrite and not resume, resume=resume, reuse=False,
                      _rows=rows, **options)
    zarr_files.delete_tree(shard_dir)
    return store
