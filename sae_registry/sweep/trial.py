"""One trial of a sweep, as it runs in a Ray worker: train a pack, report to Tune, checkpoint, resume.

The driver (:mod:`sae_registry.sweep`) hands Tune :func:`run_trial` with the spec, the store and the
tracking server as values; a retried trial continues the same MLflow runs from its last Tune
checkpoint, and a trial whose runs an earlier attempt of the sweep already finished only reports them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..architectures.catalogue import architecture
from ..config.options import SAEConfig, TrainConfig
from ..config.sweep import SweepSpec, rule_keys
from ..errors import SAERegistryError
from ..metrics import downstream as fidelity
from ..registry.runs import default_run_name, record_pack, set_tags, start_runs
from ..registry.tracking import Tracking
from ..store.reader import ActivationStore
from .progress import live_numbers, report

__all__ = ["member_names", "member_run_names", "member_runs", "run_trial"]

# At most one Tune checkpoint per trial in this many seconds (see the trial's reporter).
TUNE_CHECKPOINT_SECONDS = 10.0


def member_run_names(spec: SweepSpec, configs: list[tuple[SAEConfig, TrainConfig]]) -> list[str]:
    """Each configuration's MLflow run name: the rule's (:func:`sae_registry.registry.runs.run_name`), then
    ``-{key}{value}`` for every other grid key whose value differs across the sweep (``-lr0.003``): a
    grid over ``lr`` or ``batch_size`` would otherwise give two members one name."""

    belongs = rule_keys()

    def unnamed(sae_cfg: SAEConfig, key: str) -> bool:  # the key means something for the rule, which does not show it
        rule = sae_cfg.sparsity
        return rule in belongs.get(key, (rule,)) and key not in architecture(rule).named_keys

    def value(sae_cfg: SAEConfig, train_cfg: TrainConfig, key: str):
        v = getattr(train_cfg, key, getattr(sae_cfg, key, None))
        return repr(v) if isinstance(v, float) else v  # the shortest form that tells two floats apart

    keys = sorted({key for grid in spec.grid for key in grid} - {"sparsity", "dict_size", "seed"})
    varying = [k for k in keys if len({json.dumps(value(s, t, k)) for s, t in configs if unnamed(s, k)}) > 1]
    return [default_run_name(s, t) + "".join(f"-{k}{value(s, t, k)}" for k in varying
                                             if unnamed(s, k) and value(s, t, k) is not None)
            for s, t in configs]


def member_names(spec: SweepSpec, configs: list[tuple[SAEConfig, TrainConfig]],
                 run_names: list[str] | None = None) -> list[str]:
    """Each configuration's member name within the sweep: its run name (:func:`member_run_names` unless
    given) and seed, ``topk-d1024-k32-s0``; refuses two alike."""

    run_names = run_names or member_run_names(spec, configs)
    names = [f"{r}-s{t.seed}" for (_, t), r in zip(configs, run_names)]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SAERegistryError(f"sweep {spec.name}: members {twice} would share a name; give them different settings")
    return names


def run_trial(config: dict, *, spec: dict, store_path: str, sweep_id: str, parent_run_id: str, tracking_uri: str,
              device: str, threads: int, on_cluster: bool = True) -> None:
    """Train one pack; report to Tune at every evaluation, with a checkpoint when one was written.

    ``config["pack"]`` is the pack's members as indices into the spec's configurations (the driver's
    :meth:`SweepSpec.pack_plan`, kept in Tune's state so that a resumed trial trains the same members).
    The last report carries where the trial's seconds went (``time/*``: see :func:`sae_registry.sweep.fixed_costs`).
    """
    clock = {"start": time.perf_counter()}
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(max(1, threads))
    clock["imports"] = time.perf_counter()
    # On a cluster, a node that names its own tracking server (docker-compose.yml does) uses it: the
    # driver's address (say a laptop's tunnel to 127.0.0.1) may mean nothing there. A local Ray
    # inherits the driver's environment, which may still hold an earlier sweep's URI: not that.
    # The URI comes in the trial's config, as a value; nothing here writes the environment.
    tracking = Tracking.resolve((os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri) if on_cluster else tracking_uri)
    tracking.assume_reachable()  # the driver checked it: a trial rides out a server restart on MLflow's retries
    store = ActivationStore.open(store_path)
    clock["store"] = time.perf_counter()
    sweep_spec = SweepSpec.from_dict(spec)
    configs = sweep_spec.configurations(store.d)
    members = [configs[i] for i in config["pack"]]
    trial_dir = Path(tune.get_context().get_trial_dir())
    every_run_name = member_run_names(sweep_spec, configs)
    every_name = member_names(sweep_spec, configs, every_run_name)
    run_names, names = [every_run_name[i] for i in config["pack"]], [every_name[i] for i in config["pack"]]
    out_dirs = [trial_dir / "dictionaries" / n for n in names]
    members = [(s, replace(t, device=device), o) for (s, t), o in zip(members, out_dirs)]
    checkpoint = tune.get_checkpoint()
    node = ray.get_runtime_context().get_node_id()
    if checkpoint is None:
        # No Tune checkpoint, but an earlier attempt of this sweep may have made runs for these
        # members (interrupted before its first checkpoint, or finished just before the head died).
        existing = member_runs(spec["name"], sweep_id, names, tracking)
        if len(existing) == len(names) and all(r.info.status == "FINISHED" for r in existing.values()):
            tune.report({**report(0, {n: live_numbers(r.data.metrics, lambda m: m.run_key)
                                       for n, r in existing.items()}), "done": 1})
            return
        missing = [i for i, n in enumerate(names) if n not in existing]
        # a new run is made with its node tags; an existing one gets them below
        new_ids = iter(start_runs(store, [members[i] for i in missing], family=spec["name"], sweep_id=sweep_id,
                                  parent_run_id=parent_run_id, tracking_uri=tracking,
                                  member_tags=[{"sweep.member": names[i], **_node_tags("", node)} for i in missing],
                                  run_names=[run_names[i] for i in missing]))
        run_ids = [existing[n].info.run_id if n in existing else next(new_ids) for n in names]
        earlier = {existing[n].info.run_id: existing[n].data.tags.get("ray.node_ids", "") for n in names if n in existing}
    else:  # a retry: continue from the last reported checkpoint, in the same MLflow runs
        with checkpoint.as_directory() as saved:
            saved = Path(saved)
            run_ids = json.loads((saved / "runs.json").read_text())
            for name, out in zip(names, out_dirs):
                shutil.rmtree(out / "checkpoint", ignore_errors=True)
                out.mkdir(parents=True, exist_ok=True)
                shutil.copytree(saved / name, out / "checkpoint")
        earlier = {run_id: tracking.client.get_run(run_id).data.tags.get("ray.node_ids", "") for run_id in run_ids}

    client = tracking.client
    for run_id, before in earlier.items():  # where it ran: every attempt's node, in order (a retry may run elsewhere)
        set_tags(client, run_id, _node_tags(before, node))
    clock["runs"] = clock["last_eval"] = time.perf_counter()
    pending: dict[int, dict] = {}
    last_tune_checkpoint = [-math.inf]

    def reporter(i: int):
        def call(step: int, entry: dict, checkpoint_dir: Path | None) -> None:
            pending[i] = {**entry, "_checkpoint": checkpoint_dir}
            if len(pending) < len(members):  # one Tune report per step, when every member has evaluated
                return
            clock["last_eval"] = time.perf_counter()
            metrics = report(step, {names[j]: live_numbers(e, lambda m: m.eval_key)
                                    for j, e in sorted(pending.items())})
            # Tune snapshots its experiment state whenever a trial has reported num_to_keep checkpoints
            # since the last snapshot, and warns when that happens within seconds: with a small
            # checkpoint_every it would, at every step. Our own checkpoints stay as frequent as asked.
            due = time.monotonic() - last_tune_checkpoint[0] >= TUNE_CHECKPOINT_SECONDS
            if due and all(e["_checkpoint"] is not None for e in pending.values()):
                last_tune_checkpoint[0] = time.monotonic()
                with tempfile.TemporaryDirectory() as tmp:
                    for name, out in zip(names, out_dirs):
                        shutil.copytree(out / "checkpoint", Path(tmp) / name)
                    (Path(tmp) / "runs.json").write_text(json.dumps(run_ids))
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(metrics)
            pending.clear()
        return call

    def downstream(results) -> list[dict]:
        """Downstream fidelity of every member: one model load and clean pass for the pack (and for the
        next trials this worker process runs, when Tune reuses it)."""
        started = time.perf_counter()
        splice = _prepared(store, spec.get("evaluate_tokens", 4096), device)
        out = [splice.run(r.sae) for r in results]
        clock["downstream"] = time.perf_counter() - started
        return out

    recorded = record_pack(store, members, family=spec["name"], run_ids=run_ids, tracking_uri=tracking,
                           resume=checkpoint is not None, progress=False,
                           callbacks=[reporter(i) for i in range(len(members))],
                           finish=downstream if spec.get("evaluate") == "downstream" else None)
    end, result = time.perf_counter(), recorded[0].result
    # the step loop's own seconds, from the rate training/loop.py measured over it (a retried trial's whole
    # run at its last attempt's rate: an estimate)
    train_loop = result.history[-1]["tokens"] / max(result.tokens_per_second, 1e-9)
    downstream_s = clock.get("downstream", 0.0)
    tune.report({**report(result.history[-1]["step"],
                          {n: live_numbers(r.result.metrics, lambda m: m.key) for n, r in zip(names, recorded)}),
                 "done": 1,
                 "time/imports": clock["imports"] - clock["start"], "time/store_open": clock["store"] - clock["imports"],
                 "time/mlflow_setup": clock["runs"] - clock["store"],
                 "time/training": clock["last_eval"] - clock["runs"], "time/train_loop": train_loop,
                 "time/downstream": downstream_s,
                 "time/outputs": end - clock["last_eval"] - downstream_s, "time/trial": end - clock["start"]})


_PREPARED: dict = {}  # this worker process's prepared downstream evaluation (model, text, clean pass)


def _prepared(store, max_tokens: int, device: str):
    """The store's downstream evaluation, prepared once per worker process: a worker that Tune reuses
    for the next trial (``reuse_actors``) neither loads the model nor runs the clean pass again."""

    key = (str(store.path), store.fingerprint, max_tokens, device)
    if key not in _PREPARED:
        _PREPARED.clear()  # one model held at a time
        _PREPARED[key] = fidelity.prepare(store, max_tokens=max_tokens, device=device)
    return _PREPARED[key]


def _node_tags(earlier: str, node: str) -> dict[str, str]:
    """The ``ray.*`` tags of a run whose next attempt runs on ``node``: every attempt's node in order, and the last."""
    return {"ray.node_ids": ",".join([*filter(None, earlier.split(",")), node]), "ray.node_id": node}


def member_runs(family: str, sweep_id: str, names: list[str], tracking: Tracking) -> dict:
    """This sweep's runs for these member names, by name (the newest when there are several): one search."""
    client = tracking.client
    experiment = client.get_experiment_by_name(family)
    found: dict = {}
    for run in client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{sweep_id}'",
                                  order_by=["attributes.start_time DESC"], max_results=10_000):
        name = run.data.tags.get("sweep.member")
        if name in names and name not in found:
            found[name] = run
    return found
