"""Sweeps: a YAML spec -> a Ray Tune grid of training trials -> runs and versions in the registry.

A trial trains one *pack* of configurations on one shared batch stream (``pack: 1`` means one
dictionary per trial). Every dictionary is its own MLflow run, a child of the sweep's parent run.
When the grid is done, the Pareto frontier of FVU against L0 (per dict_size) is computed from the
registry, the chosen versions are registered, the best gets the alias, and the parent run gets a
summary table and a frontier plot. With ``evaluate: downstream`` each trial also splices every
dictionary of its pack into the source model (``downstream.py``) before the runs end, and
``champion_by: downstream`` gives the alias to the highest downstream fidelity instead of the lowest FVU.

Faults: trials report a Tune checkpoint (our safetensors checkpoints + the MLflow run ids) every
``checkpoint_every`` steps; a crashed trial is retried from it (``max_failures``) and continues the
same MLflow runs. A sweep interrupted as a whole is continued with ``resume=True``: finished trials
are not rerun, registration is idempotent, so no run or version is duplicated.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .._util.cluster import check_resources, client_progress, connect
from ..architectures.catalogue import k_rules
from ..config.metrics import axis, champion_metric, default_champion, frontier, listed, usable
from ..config.metrics import metrics as metric_table
from ..config.sweep import SweepSpec
from ..errors import SAERegistryError
from ..harvest.local import ensure_store, resolve_store
from ..metrics import plots
from ..metrics.downstream import check_store
from ..registry.tracking import Tracking, TrackingLike, lineage_tags
from ..registry.versions import register_run, set_alias
from ..store.reader import ActivationStore
from ..training.loop import changed
from .progress import LiveTable, live_callback
from .trial import run_trial

# -- the driver ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    dictionaries: list[dict]  # one row per trained dictionary: run, shape, metrics, frontier, version
    champion: str | None  # the version given the alias
    failed_trials: int
    wall_seconds: float
    seconds: dict[str, float] = field(default_factory=dict)  # where the wall time went (see fixed_costs)
    nothing_to_do: bool = False  # resumed a sweep that had finished: its recorded result, nothing run


def _finished(spec: SweepSpec, experiment_path: str, tracking: Tracking) -> SweepResult | None:
    """The recorded result of the sweep at ``experiment_path`` if it finished (nothing to resume), else None."""
    client = tracking.client
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        return None
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`sweep.role` = 'parent' and tags.`sweep.storage` = '{experiment_path}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents or parents[0].info.status != "FINISHED":
        return None
    parent = parents[0]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep_summary.json", tmp)).read_text())
            rows = [dict(zip(table["columns"], values)) for values in table["data"]]
        except Exception:  # a sweep that trained nothing logged no table
            rows = []
    champion = None
    if spec.alias:
        try:
            champion = client.get_model_version_by_alias(spec.name, spec.alias).version
        except Exception:  # no such alias (any more): no champion to name
            pass
    metrics = parent.data.metrics
    return SweepResult(parent.data.tags["sweep.id"], parent.info.run_id, rows, champion,
                       int(metrics.get("failed_trials", 0)), metrics.get("wall_seconds", 0.0), nothing_to_do=True)


def pareto_frontier(rows: list[dict]) -> list[bool]:
    """Per dict_size, whether each row is on the FVU-vs-L0 frontier (the metrics table's ``axis`` metrics):
    no other row is at least as good on both and better on one."""
    axes = frontier()

    def ranks(row: dict) -> list[float]:
        return [m.rank(row[m.name]) for m in axes]

    on = []
    for r in rows:
        mine = ranks(r)
        dominated = any(
            o is not r and o["dict_size"] == r["dict_size"]
            and all(a <= b for a, b in zip(ranks(o), mine, strict=True)) and ranks(o) != mine
            for o in rows
        )
        on.append(not dominated)
    return on


def summary_row(run_id: str, name: str, params: dict, metrics: dict) -> dict:
    """A finished dictionary run as a row of the sweep's summary: its shape, then every metric of the
    metrics table by name (``None`` where the run has none)."""
    return {"run_id": run_id, "name": name, "dict_size": int(params["dict_size"]), "sparsity": params["sparsity"],
            "k": int(params["top_k"]) if params["sparsity"] in k_rules() else None,
            "l1_coeff": float(params["l1_coeff"]), "lr": float(params["lr"]), "seed": int(params["seed"]),
            **{m.name: metrics.get(m.run_key) for m in metric_table()}}


def champion_of(rows: list[dict], spec: SweepSpec) -> str | None:
    """The registered version that gets ``spec.alias``: the best by ``spec.champion_by`` among those
    with L0 <= ``champion_max_l0`` that have a number for it; ties go to the best by the default."""
    ranked, then = champion_metric(spec.champion_by), champion_metric(default_champion())
    eligible = [r for r in rows if r["version"] and usable(r.get(ranked.name))  # NaN fidelity: zeros changed nothing
                and (spec.champion_max_l0 is None or r[axis("x").name] <= spec.champion_max_l0)]
    if not eligible:
        return None
    return min(eligible, key=lambda r: (ranked.rank(r[ranked.name]), then.rank(r[then.name])))["version"]


def _ensure_store(spec: SweepSpec) -> str:
    """The store's absolute path or URL; harvested first when missing and the spec says how."""

    location = resolve_store(spec.store, spec.harvest)  # a path, a URL, or key:<hex> (a store by its content)
    ensure_store(location, spec.harvest)
    return location


TRIAL_KEYS = ("store", "grid", "train", "seeds", "pack", "harvest")  # what decides the trials of a sweep


def _check_same_trials(client, parent_run_id: str, spec: SweepSpec) -> None:
    """Refuse a resume whose spec would make other trials than the first run's, naming what changed."""

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="sweep-spec-") as tmp:
        try:
            first = json.loads(Path(client.download_artifacts(parent_run_id, "sweep_spec.json", tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            # its artifacts are out of reach (e.g. the first driver's working directory is gone): the trials'
            # own records still decide what is resumed, so there is nothing to compare against here
            return
    now = json.loads(json.dumps(spec.to_dict()))
    if differ := changed({k: first.get(k) for k in TRIAL_KEYS}, {k: now.get(k) for k in TRIAL_KEYS}):
        raise SAERegistryError(f"sweep {spec.name!r} was started with other options: {differ}; resume with the "
                               "spec it started with, or give the changed sweep another name:")


def fixed_costs(result) -> dict[str, float]:
    """Seconds per phase summed over a fit's trials (the ``time/*`` of their last reports)."""
    totals: dict[str, float] = {}
    for r in result:
        for key, value in (r.metrics or {}).items():
            if key.startswith("time/"):
                totals[key.removeprefix("time/")] = totals.get(key.removeprefix("time/"), 0.0) + float(value)
    return totals


def _sweep_state(spec: SweepSpec, store, experiment_path: str, client, tracking: Tracking, resume: bool) -> dict:
    """The sweep's id and parent run: made on a first run, found again in MLflow on resume.

    MLflow holds them (the parent run's tags), so resuming works wherever Tune's state lives.
    """

    experiment_id = tracking.ensure_experiment(spec.name)  # in the driver, before any trial (see STACK-NOTES)
    if resume:
        parents = client.search_runs(
            [experiment_id],
            f"tags.`sweep.role` = 'parent' and tags.`sweep.storage` = '{experiment_path}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not parents:
            raise SAERegistryError(f"no sweep {spec.name!r} to resume at {experiment_path}; run it without --resume")
        _check_same_trials(client, parents[0].info.run_id, spec)
        return {"sweep_id": parents[0].data.tags["sweep.id"], "parent_run_id": parents[0].info.run_id}
    sweep_id = f"{spec.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    parent = client.create_run(experiment_id, run_name=f"sweep {spec.name}", tags={
        **lineage_tags(store, sweep_id), "sweep.role": "parent", "sweep.storage": experiment_path})
    client.log_dict(parent.info.run_id, spec.to_dict(), "sweep_spec.json")
    return {"sweep_id": sweep_id, "parent_run_id": parent.info.run_id}


def run(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: TrackingLike = None,
    verbose: int = 1,
) -> SweepResult:
    """Run (or with ``resume``, continue) a sweep; register its dictionaries; summarise it on MLflow.

    ``tracking_uri``: a URI or a :class:`~sae_registry.registry.tracking.Tracking` (default
    ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` here); the trials get it as a value in their config.
    """
    import ray
    from ray import tune

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    phase = _PhaseClock(seconds)
    tracking = Tracking.resolve(tracking_uri)
    store_path = _ensure_store(spec)
    store = ActivationStore.open(store_path)
    if spec.evaluate == "downstream":

        check_store(store)  # in the driver: a store the trials cannot evaluate on fails before any training
    storage = spec.storage if "://" in spec.storage else str(Path(spec.storage).absolute())
    if not resume and tune.Tuner.can_restore(f"{storage}/{spec.name}"):  # read from disk: before Ray starts
        raise SAERegistryError(
            f"sweep {spec.name!r} already ran at {storage}/{spec.name}: continue it with --resume, or remove that "
            "directory (or change name:) to start over"
        )
    if resume:  # a finished sweep: nothing to do, said before Ray starts
        done = _finished(spec, f"{storage}/{spec.name}", tracking)
        if done is not None:
            return done
    phase("driver_setup")
    opened = tracking.open_in_background()  # a new SQLite store's schema is made while Ray starts
    try:
        started_ray = connect(address)
    finally:
        opened()
    phase("ray_start")
    try:
        check_resources(spec.resources)  # before anything is created: a sweep that cannot run leaves no trace
        # the costliest packs first, sized so that the trials running side by side end together
        slots = spec.concurrent_slots(ray.nodes())
        plan = spec.pack_plan(store.d, slots)
        phase("plan")
        client = tracking.client
        experiment_path = f"{storage}/{spec.name}"
        state = _sweep_state(spec, store, experiment_path, client, tracking, resume)
        phase("mlflow_setup")
        sweep_id, parent_run_id = state["sweep_id"], state["parent_run_id"]
        cpu, gpu = spec.resources.cpu, spec.resources.gpu
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec.to_dict(), store_path=store_path, sweep_id=sweep_id,
                                 parent_run_id=parent_run_id, tracking_uri=tracking.uri,
                                 on_cluster=bool(address or os.environ.get("RAY_ADDRESS")),
                                 device="cuda" if gpu > 0 else "cpu", threads=max(1, int(cpu))),
            {"cpu": cpu, "gpu": gpu},
        )
        if resume and tune.Tuner.can_restore(experiment_path):
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
        else:
            reporter = client_progress(verbose)
            tuner = tune.Tuner(
                trainable,
                param_space={"pack": tune.grid_search(plan)},
                # with more trials than slots, one worker process (its imports) serves trial after trial
                tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials or None,
                                            reuse_actors=len(plan) > slots),
                run_config=tune.RunConfig(
                    # our table, one row per dictionary, where the driver runs Tune; over Ray Client Tune's
                    # own (per trial, each trial's best member's FVU and L0), which is all that reaches here
                    name=spec.name, storage_path=storage, verbose=verbose if reporter else 0, progress_reporter=reporter,
                    callbacks=[live_callback(LiveTable(), print)] if verbose and reporter is None else [],
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        if resume:
            client.update_run(parent_run_id, status="RUNNING")
        phase("tune_setup")
        with _driver_guard(spec, client, parent_run_id):
            results = tuner.fit()
            phase("fit")
            seconds.update({f"trials/{k}": v for k, v in fixed_costs(results).items()})
            failed = sum(1 for r in results if r.error is not None)
            # Ctrl-C makes fit() return early with trials still running: nothing is registered then.
            unfinished = sum(1 for r in results if r.error is None and not (r.metrics or {}).get("done"))
    finally:
        if started_ray:
            ray.shutdown()
            phase("ray_shutdown")
    if unfinished:
        client.set_terminated(parent_run_id, "KILLED")
        raise SAERegistryError(
            f"sweep {spec.name!r} was interrupted with {unfinished} trial(s) unfinished; continue it with "
            "`sae-registry sweep SPEC --resume` (finished trials are kept, nothing is duplicated)"
        )
    with _driver_guard(spec, client, parent_run_id):
        rows, champion = _register_and_summarise(spec, client, sweep_id, parent_run_id, failed, tracking, phase)
    wall = time.perf_counter() - started
    client.log_metric(parent_run_id, "wall_seconds", wall)
    client.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")
    return SweepResult(sweep_id, parent_run_id, rows, champion, failed, wall, seconds)


class _PhaseClock:
    """``phase(name)``: the seconds since the previous call (or since it was made) go to ``seconds[name]``.
    Called at every step of :func:`run`, so the phases add up to its wall time."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.last = seconds, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


@contextmanager
def _driver_guard(spec: SweepSpec, client, parent_run_id: str) -> Iterator[None]:
    """A failure here once the trials are launched: the parent run FAILED, ``--resume`` named (what they
    finished is in MLflow and Tune's storage, at absolute locations: resume works from any directory)."""
    try:
        yield
    except SAERegistryError:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    except Exception as e:  # e.g. Tune's result analysis losing its working directory under a Ray job
        client.set_terminated(parent_run_id, "FAILED")
        raise SAERegistryError(
            f"sweep {spec.name!r} failed in this process after its trials were launched ({type(e).__name__}: "
            f"{e}); what they finished is kept: `sae-registry sweep SPEC --resume` continues the sweep and "
            "registers the finished dictionaries"
        ) from e


def _register_and_summarise(spec: SweepSpec, client, sweep_id: str, parent_run_id: str, failed: int,
                            tracking: Tracking, phase: _PhaseClock) -> tuple[list[dict], str | None]:
    """Frontier, registration per ``spec.register``, alias, and the summary on the parent run.

    ``phase`` times registering and summarising (the frontier plot and table).
    """
    from mlflow.entities import Metric

    experiment = client.get_experiment_by_name(spec.name)
    # fit() is over: a run still RUNNING belongs to a trial whose last attempt died; it failed.
    for r in client.search_runs([experiment.experiment_id],
                                f"tags.`sweep.id` = '{sweep_id}' and attributes.status = 'RUNNING'"):
        if r.data.tags.get("sweep.role") != "parent":
            client.set_terminated(r.info.run_id, "FAILED")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`sweep.id` = '{sweep_id}' and attributes.status = 'FINISHED'",
                              max_results=10_000)
    rows = [summary_row(r.info.run_id, r.info.run_name, r.data.params, r.data.metrics) for r in runs
            if r.data.tags.get("sweep.role") != "parent" and all(m.run_key in r.data.metrics for m in frontier())]
    x, y = axis("x"), axis("y")
    rows.sort(key=lambda r: (r["dict_size"], x.rank(r[x.name]), y.rank(r[y.name])))
    for row, on in zip(rows, pareto_frontier(rows)):
        row["frontier"] = on
        client.set_tag(row["run_id"], "sweep.frontier", str(on).lower())  # also lands on its version
        wanted = spec.register == "all" or (spec.register == "pareto" and on)
        row["version"] = register_run(row["run_id"], spec.name, tracking_uri=tracking) if wanted else None
    registered = [r for r in rows if r["version"]]
    champion = champion_of(rows, spec) if spec.alias else None
    if champion and spec.alias:
        set_alias(spec.name, spec.alias, champion, tracking_uri=tracking)
    phase("registration")
    if rows:
        client.log_table(parent_run_id, data={k: [r[k] for r in rows] for k in rows[0]},
                         artifact_file="sweep_summary.json")
        fig = plots.frontier(rows)
        client.log_figure(parent_run_id, fig, "plots/frontier.png")
    client.log_batch(parent_run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in (
        ("dictionaries", len(rows)), ("registered", len(registered)), ("failed_trials", failed))])
    phase("frontier_summary")
    return rows, champion


def summary_table(result: SweepResult, alias: str | None) -> str:
    """The sweep as a text table, frontier marked with *, the champion named.

    Its metric columns are the metrics table's listed ones; a downstream one only when some dictionary has it.
    """
    columns = [m for m in listed() if not m.optional or any(r.get(m.name) is not None for r in result.dictionaries)]
    width = max([28, *(len(r["name"]) + 1 for r in result.dictionaries)])  # a matryoshka's name is long
    lines = [f"{'dictionary':{width}} {'dict_size':>9} {'k':>4} {'l1_coeff':>9}"
             + "".join(f" {m.header}" for m in columns) + "  version"]
    for r in result.dictionaries:
        version = (r["version"] or "-") + (f" ({alias})" if alias and r["version"] == result.champion else "")
        lines.append(f"{('*' if r['frontier'] else ' ') + r['name']:{width}} {r['dict_size']:>9} {r['k'] or '-':>4} "
                     f"{r['l1_coeff']:>9.2g}" + "".join(f" {m.cell(r.get(m.name))}" for m in columns) + f"  {version}")
    x, y = axis("x"), axis("y")
    lines.append(f"* on the {y.title}-vs-{x.title} frontier of its dict_size; "
                 f"{result.failed_trials} failed trial(s); {result.wall_seconds:.0f} s")
    return "\n".join(lines)
