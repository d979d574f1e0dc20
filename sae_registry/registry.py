"""The dictionary registry on MLflow: record training runs, register versions, find and load by name.

- **Where**: ``MLFLOW_TRACKING_URI`` (or an explicit ``tracking_uri``) when set; otherwise the
  embedded default, a SQLite database ``mlflow.db`` in the working directory with artifacts in
  ``./mlruns``, which the stock ``mlflow ui`` opens from the same directory.
- **Recording** (:func:`train_and_register`): one MLflow run per trained dictionary, in an
  experiment named after its family: every parameter, metrics over steps (one batched, asynchronous
  call per evaluation), final held-out metrics, lineage tags, ``metrics.json`` and plots as run
  artifacts, and the dictionary itself logged as a models-from-code pyfunc (``serving.py``) whose
  artifacts are ``sae.safetensors`` + ``config.json``.
- **Registration**: only after all of that succeeded, as a version of the registered model
  ``family``, tagged with its shape, metrics, lineage and the SHA-256 of both files.
- **Loading** (:func:`load`): ``family@alias``, ``family/3``, ``models:/family/3``; downloads the two
  files once per version into a local cache, checks them against the registered checksums,
  rebuilds the model. Never unpickles.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import SAERegistryError
from .interchange import SAEBenchConfig, Weights, folded_weights, saebench_config
from .sae import CONFIG_FILE, WEIGHTS_FILE, SAEConfig, SparseAutoencoder
from .store import ActivationStore
from .train import METRICS_FILE, TrainConfig, TrainResult, train_pack

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars per file on load
MODEL_ARTIFACT = "sae"  # name of the logged pyfunc model inside a run
METRIC_TAGS = ("fvu", "l0", "dead_fraction", "mse", "explained_variance")
SERVING_CODE = Path(__file__).with_name("serving.py")


# -- where ------------------------------------------------------------------------------------------


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_REACHED: set[str] = set()  # tracking servers this process has connected to


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Refuse, in seconds and naming it, a tracking server that does not accept connections.

    MLflow would retry each request for minutes and then fail deep inside ``requests``. Checked once
    per server per process (a server seen once gets MLflow's own retries); skipped behind a proxy.
    """
    import socket
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _REACHED:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname or ""):
        return
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        raise SAERegistryError(
            f"cannot reach the MLflow tracking server at {uri} ({e}); start it, or point "
            "MLFLOW_TRACKING_URI (--tracking-uri) at one that runs (unset it for the embedded registry)"
        ) from None
    _REACHED.add(uri)


def _client(tracking_uri: str | None = None):
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def ensure_experiment(family: str, tracking_uri: str | None = None) -> str:
    """The id of the experiment named ``family``, created if needed (call it in the driver)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(family)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(family)
    except Exception:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(family)
        if experiment is None:
            raise
        return experiment.experiment_id


def check_family_name(family: str) -> str:
    if not isinstance(family, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", family):
        raise SAERegistryError(
            f"family name {family!r} must be 1-128 letters, digits, '.', '_' or '-' (no '/' or '@')"
        )
    return family


# -- recording ----------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def lineage_tags(store: ActivationStore, sweep_id: str | None = None) -> dict[str, str]:
    """Tags that trace a dictionary to its data and code; on runs and on versions."""
    source = store.source
    tags = {
        "store.path": str(store.path),
        "store.fingerprint": store.fingerprint,
        "source.model": str(source.get("model", "")),
        "source.layer": str(source.get("layer", "")),
        "source.hook": str(source.get("hook", "")),
        "sae_registry.version": __version__,
    }
    if sweep_id:
        tags["sweep.id"] = sweep_id
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


RETRY_SECONDS = float(os.environ.get("SAE_REGISTRY_RETRY_SECONDS", 600))


def _retrying(call, what: str, seconds: float | None = None):
    """``call()``, again and again (with backoff) while the tracking server cannot be reached.

    MLflow's client retries each request a few times, but an asynchronous batch that still fails is
    only logged and dropped; a server restarted in the middle of a sweep must lose nothing. Errors
    that the server answered (a bad value, a name taken) are raised at once.
    """
    import random
    import time

    import requests
    from mlflow.exceptions import MlflowException, RestException

    deadline = time.monotonic() + (RETRY_SECONDS if seconds is None else seconds)
    wait = 1.0
    while True:
        try:
            return call()
        except RestException:
            raise  # the server answered
        except (MlflowException, requests.RequestException, OSError) as e:
            if time.monotonic() + wait > deadline:
                raise SAERegistryError(f"{what}: the tracking server did not come back ({e})") from e
            time.sleep(wait + random.random())
            wait = min(wait * 2, 30.0)


class MetricLogger:
    """Training callback: each evaluation's numbers as one asynchronous ``log_batch`` call.

    :meth:`flush` waits for them all and sends again, synchronously, any that failed.
    """

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.pending: list = []  # (MLflow's handle of an asynchronous batch, its metrics)

    def __call__(self, step: int, entry: dict, _checkpoint=None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in entry.items() if k != "step"]
        self.pending.append((self.client.log_batch(self.run_id, metrics=metrics, synchronous=False), metrics))

    def flush(self) -> None:
        """Every metric logged so far is on the server when this returns (or it raises)."""
        for operation, metrics in self.pending:
            try:
                operation.wait()
            except Exception:  # dropped by MLflow's logging thread: send it ourselves
                _retrying(lambda m=metrics: self.client.log_batch(self.run_id, metrics=m),
                          f"logging metrics of run {self.run_id}")
        self.pending.clear()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Recorded:
    """What :func:`train_and_register` made: the run, and the version when one was registered."""

    run_id: str
    version: str | None
    result: TrainResult


def train_and_register(
    store: ActivationStore,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    family: str,
    register: bool = True,
    alias: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    progress: bool = True,
    callback=None,
) -> Recorded:
    """Train one dictionary as an MLflow run and (when ``register``) register it in ``family``.

    A run that raises is marked FAILED (KILLED on Ctrl-C) and nothing is registered.
    """
    (recorded,) = record_pack(store, [(sae_cfg, train_cfg, out_dir)], family=family, tracking_uri=tracking_uri,
                              resume=resume, progress=progress, callbacks=[callback])
    if register:
        recorded.version = register_run(recorded.run_id, family, tracking_uri=tracking_uri)
        if alias:
            set_alias(family, alias, recorded.version, tracking_uri=tracking_uri)
    return recorded


def default_run_name(sae_cfg: SAEConfig, train_cfg: TrainConfig) -> str:
    if sae_cfg.sparsity == "top_k":
        return f"topk-d{sae_cfg.dict_size}-k{sae_cfg.top_k}"
    return f"l1-d{sae_cfg.dict_size}-l1c{train_cfg.resolved(sae_cfg).l1_coeff:g}"


def start_runs(
    store: ActivationStore,
    members: list[tuple[SAEConfig, TrainConfig, str | Path]],
    *,
    family: str,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    member_tags: list[dict] | None = None,
) -> list[str]:
    """Create one MLflow run per configuration, with its parameters and lineage tags; their ids."""
    from mlflow.entities import Param

    check_family_name(family)
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(family, tracking_uri)
    tags = lineage_tags(store, sweep_id)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_ids = []
    for (sae_cfg, train_cfg, _), extra in zip(members, member_tags or [{}] * len(members)):
        run = client.create_run(experiment_id, run_name=default_run_name(sae_cfg, train_cfg), tags={**tags, **extra})
        params = {**sae_cfg.to_dict(), **train_cfg.resolved(sae_cfg).to_dict(), "store_tokens": len(store)}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        run_ids.append(run.info.run_id)
    return run_ids


def record_pack(
    store: ActivationStore,
    members: list[tuple[SAEConfig, TrainConfig, str | Path]],
    *,
    family: str,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    run_ids: list[str] | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    finish=None,
) -> list[Recorded]:
    """Train a pack of dictionaries on one batch stream (see ``train.train_pack``), one MLflow run each.

    ``finish(results) -> [{metric: value}, ...]`` adds final metrics per member after training and
    before the runs end (the sweep's downstream fidelity): logged like ``final/*``, and as run tags
    (``downstream/fidelity`` -> ``downstream.fidelity``) that registration copies onto the version.

    ``run_ids`` continue existing runs (made by :func:`start_runs`; a retried trial) instead of starting
    new ones. Nothing is registered here: see :func:`register_run`. If training raises, every run of
    the pack is marked FAILED (KILLED on Ctrl-C).
    """
    client = _client(tracking_uri)
    if run_ids is None:
        run_ids = start_runs(store, members, family=family, sweep_id=sweep_id, parent_run_id=parent_run_id,
                             tracking_uri=tracking_uri)
    else:
        for run_id in run_ids:
            client.update_run(run_id, status="RUNNING")
    tags = {k: v for k, v in client.get_run(run_ids[0]).data.tags.items() if not k.startswith("mlflow.")}
    loggers = [MetricLogger(client, run_id) for run_id in run_ids]

    def on_eval(logger, user):
        def call(step: int, entry: dict, checkpoint: Path | None) -> None:
            logger(step, entry)
            if user is not None:
                user(step, entry, checkpoint)
        return call

    user_callbacks = callbacks or [None] * len(members)
    try:
        results = train_pack(store, members, resume=resume, progress=progress,
                             callbacks=[on_eval(lg, cb) for lg, cb in zip(loggers, user_callbacks)],
                             extras=[{"lineage": tags}] * len(members))
        more = finish(results) if finish is not None else [{}] * len(results)
        for logger in loggers:  # a run ends only once all its step metrics are on the server
            logger.flush()
        for run_id, result, extra in zip(run_ids, results, more):
            _log_outputs(client, run_id, result, extra)
    except KeyboardInterrupt:
        for run_id in run_ids:
            _end_run(client, run_id, "KILLED")
        raise
    except BaseException:
        for run_id in run_ids:
            _end_run(client, run_id, "FAILED")
        raise
    return [Recorded(run_id, None, result) for run_id, result in zip(run_ids, results)]


def _end_run(client, run_id: str, status: str) -> None:
    try:
        import mlflow

        mlflow.flush_async_logging()
        client.set_terminated(run_id, status)
    except Exception:  # the original error matters more than a failed status update
        pass


def _log_outputs(client, run_id: str, result: TrainResult, extra: dict[str, float] | None = None) -> None:
    """Final metrics (and ``extra`` ones, also as tags), artifacts, plots, the logged model; the run ends FINISHED."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, RunTag

    from . import plots

    step = result.history[-1]["step"] if result.history else 0
    client.log_batch(run_id, metrics=[Metric(f"final/{k}", v, 0, step) for k, v in result.metrics.items()]
                     + [Metric("final/tokens_per_second", result.tokens_per_second, 0, step)]
                     + [Metric(k, v, 0, step) for k, v in (extra or {}).items()],
                     tags=[RunTag(k.replace("/", "."), repr(float(v))) for k, v in (extra or {}).items()])
    out = result.out_dir
    client.log_artifact(run_id, str(out / METRICS_FILE))
    for name, fig in (
        ("training_curves", plots.training_curves(result.history)),
        ("feature_density", plots.density_histogram(result.evaluation.density)),
        ("l0_distribution", plots.l0_histogram(result.evaluation.l0_per_row)),
    ):
        client.log_figure(run_id, fig, f"plots/{name}.png")
        plt.close(fig)
    _log_model(run_id, out, result.sae.cfg)


def _log_model(run_id: str, out: Path, cfg: SAEConfig) -> None:
    """Log the dictionary in ``out`` as the run's pyfunc model, with the tags registration needs; ends the run FINISHED."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.input_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.dict_size))]),
    )
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow's advice to pyfunc authors (type hints, an input example): our signature is explicit.
        warnings.filterwarnings("ignore", message=".*(Add type hints|input example was not provided|Any type hint)")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(SERVING_CODE),
            artifacts={WEIGHTS_FILE: str(out / WEIGHTS_FILE), CONFIG_FILE: str(out / CONFIG_FILE)},
            signature=signature,
            pip_requirements=["torch", "safetensors", "numpy", f"sae-registry=={__version__}"],
        )
        # What registration needs, kept on the run so that any process can register it later.
        mlflow.set_tags({
            "sae.model_uri": info.model_uri,
            f"sha256.{WEIGHTS_FILE}": _sha256(out / WEIGHTS_FILE),
            f"sha256.{CONFIG_FILE}": _sha256(out / CONFIG_FILE),
        })
        # leaving the block ends the run FINISHED


def log_files(run_id: str, files: list[Path], artifact_path: str, tracking_uri: str | None = None) -> str:
    """Log ``files`` on a run under ``artifact_path`` (e.g. feature cards); returns that folder's URI."""
    client = _client(tracking_uri)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"


def register_run(run_id: str, family: str, tracking_uri: str | None = None) -> str:
    """Register a finished run's dictionary as a version of ``family``; returns the version.

    Idempotent: a run already registered in ``family`` gives its existing version. Refuses runs that
    did not finish (nothing half-trained or failed is ever registered).
    """
    check_family_name(family)
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    rt, params, metrics = run.data.tags, run.data.params, run.data.metrics
    if run.info.status != "FINISHED" or "sae.model_uri" not in rt:
        raise SAERegistryError(f"run {run_id} is {run.info.status}, not a finished dictionary; refusing to register it")
    for mv in client.search_model_versions(f"run_id='{run_id}'"):
        if mv.name == family:
            return str(mv.version)
    sparsity = params["sparsity"]
    version_tags = {
        "dict_size": params["dict_size"],
        "k": params["top_k"] if sparsity == "top_k" else "",
        "sparsity": sparsity,
        "l1_coeff": params.get("l1_coeff", ""),  # none for an imported dictionary
        **{k: repr(float(metrics[f"final/{k}"])) for k in METRIC_TAGS if f"final/{k}" in metrics},
        **{k: v for k, v in rt.items()
           if k.split(".")[0] in ("store", "source", "sweep", "git", "sae_registry", "sha256", "downstream",
                                     "import")},
    }
    _ensure_registered_model(client, family)
    model_uri = rt["sae.model_uri"]
    return _create_version(client, family, run_id, model_uri, version_tags)


def _create_version(client, family: str, run_id: str, model_uri: str, tags: dict, attempts: int = 8) -> str:
    """A new version of ``family`` for ``run_id``, with many processes registering at once.

    MLflow retries a version number taken meanwhile 3 times and SQLite waits 20 s for its lock;
    more writers than that are retried here, checking first that the version did not land.
    """
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            version = client.create_model_version(family, source=model_uri, run_id=run_id, tags=tags,
                                                  model_id=model_uri.rsplit("/", 1)[-1])
            return str(version.version)
        except MlflowException as e:
            if attempt == attempts - 1 or not ("Giving up after" in str(e) or "database is locked" in str(e)):
                raise
        for mv in client.search_model_versions(f"run_id='{run_id}'"):
            if mv.name == family:
                return str(mv.version)
        time.sleep(random.uniform(0.1, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def _ensure_registered_model(client, family: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(family)
    except MlflowException:
        try:
            client.create_registered_model(family, description="sae-registry dictionary family")
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(family)


# -- imports from other libraries ---------------------------------------------------------------------


@dataclass
class Imported:
    """What :func:`import_dictionary` made: the run, the version, and what was read."""

    run_id: str
    version: str
    format: str  # saelens | dictionary_learning
    architecture: str  # theirs: topk, standard, AutoEncoderTopK, AutoEncoder


def import_dictionary(
    directory: str | Path,
    family: str,
    *,
    fmt: str | None = None,
    alias: str | None = None,
    tracking_uri: str | None = None,
) -> Imported:
    """Register a SAELens or dictionary_learning dictionary saved in ``directory`` as the next version of ``family``.

    ``fmt`` None detects the format from the files; the weights are mapped exactly or refused (see
    ``interchange.py``). One MLflow run records it like a trained dictionary, without training
    metrics: params (the shape, ``import.format``, ``import.architecture``, ``import.origin``), tags
    (``import.*`` incl. the SHA-256 of the weights read, ``source.*`` where their config names the
    model and hook, ``sae_registry.version``), their config file as the artifact ``import/``, and the
    dictionary logged as trained ones are (``sae.safetensors`` + ``config.json``), so that
    :func:`load`, its checksums and serving work. A failure marks the run FAILED and registers nothing.
    """
    from mlflow.entities import Param

    from .interchange import read

    check_family_name(family)
    foreign = read(directory, fmt)  # refuses what cannot be mapped before any run exists
    cfg = foreign.sae.cfg
    origin = str(foreign.origin.resolve())
    tags = {
        "import.format": foreign.format,
        "import.architecture": foreign.architecture,
        "import.origin": origin,
        f"import.sha256.{foreign.weights_file.name}": _sha256(foreign.weights_file),
        **foreign.source,
        "sae_registry.version": __version__,
    }
    if foreign.conversions:
        tags["import.conversions"] = "; ".join(foreign.conversions)
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(family, tracking_uri)
    shape = f"topk-d{cfg.dict_size}-k{cfg.top_k}" if cfg.sparsity == "top_k" else f"relu-d{cfg.dict_size}"
    run_id = client.create_run(experiment_id, run_name=f"import-{foreign.format}-{shape}", tags=tags).info.run_id
    try:
        params = {**cfg.to_dict(), "import.format": foreign.format, "import.architecture": foreign.architecture,
                  "import.origin": origin}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.log_artifact(run_id, str(foreign.config_file), "import")
        with tempfile.TemporaryDirectory(prefix="sae-import-") as tmp:
            foreign.sae.save(tmp, extra={"lineage": tags, "imported_from": {
                "format": foreign.format, "architecture": foreign.architecture, "origin": origin,
                "conversions": foreign.conversions, "config": foreign.config}})
            _log_model(run_id, Path(tmp), cfg)
    except KeyboardInterrupt:
        _end_run(client, run_id, "KILLED")
        raise
    except BaseException:
        _end_run(client, run_id, "FAILED")
        raise
    version = register_run(run_id, family, tracking_uri=tracking_uri)
    if alias:
        set_alias(family, alias, version, tracking_uri=tracking_uri)
    return Imported(run_id, version, foreign.format, foreign.architecture)


# -- aliases ------------------------------------------------------------------------------------------


def set_alias(family: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` of ``family`` (moving it if it pointed elsewhere)."""
    client = _client(tracking_uri)
    _get_version(client, family, str(version))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", alias or "") or re.fullmatch(r"v\d+", alias) or alias == "latest":
        raise SAERegistryError(f"alias {alias!r} must be a word (letters, digits, '_', '-'), not 'latest' or 'v<N>'")
    client.set_registered_model_alias(family, alias, str(version))


def remove_alias(family: str, alias: str, tracking_uri: str | None = None) -> None:
    client = _client(tracking_uri)
    aliases = _get_model(client, family).aliases
    if alias not in aliases:
        raise SAERegistryError(f"{family} has no alias {alias!r}; it has: {_listing(sorted(aliases))}")
    client.delete_registered_model_alias(family, alias)


# -- finding ------------------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    """One registered dictionary, as the registry describes it."""

    family: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    created: int  # ms since epoch

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(self.tags[k]) for k in METRIC_TAGS if self.tags.get(k)}


def _listing(items: list[str], limit: int = 20) -> str:
    if not items:
        return "(none)"
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def families(tracking_uri: str | None = None) -> list[tuple[str, int, dict[str, str]]]:
    """Every family in the registry: (name, newest version, {alias: version}), by name."""
    client = _client(tracking_uri)
    out = []
    for m in client.search_registered_models():
        newest = max((int(v.version) for v in _versions(client, m.name)), default=0)
        out.append((m.name, newest, {a: str(v) for a, v in m.aliases.items()}))
    return sorted(out)


def _get_model(client, family: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(family)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # not "no such family": the server's own error
            raise
        raise SAERegistryError(
            f"no dictionary family {family!r} in the registry at {resolve_tracking_uri()}; "
            f"families: {_listing([name for name, _, _ in families()])}"
        ) from None


def _versions(client, family: str) -> list:
    return client.search_model_versions(f"name='{family}'")


def _get_version(client, family: str, version: str):
    from mlflow.exceptions import MlflowException

    model = _get_model(client, family)
    try:
        return client.get_model_version(family, version), model
    except MlflowException:
        existing = sorted((str(v.version) for v in _versions(client, family)), key=int)
        raise SAERegistryError(f"{family} has no version {version}; versions: {_listing(existing)}") from None


def _aliases_by_version(model) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(model.aliases.items()):
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _info(mv, aliases_by_version: dict[str, list[str]]) -> VersionInfo:
    version = str(mv.version)
    return VersionInfo(mv.name, version, aliases_by_version.get(version, []), dict(mv.tags), mv.run_id,
                       mv.creation_timestamp)


def versions(family: str, tracking_uri: str | None = None) -> list[VersionInfo]:
    """Every version of ``family``, newest first."""
    client = _client(tracking_uri)
    by_version = _aliases_by_version(_get_model(client, family))
    infos = [_info(mv, by_version) for mv in _versions(client, family)]
    return sorted(infos, key=lambda i: int(i.version), reverse=True)


def find(family: str, *, tracking_uri: str | None = None, order_by: str = "fvu", **filters: Any) -> list[VersionInfo]:
    """Versions of ``family`` whose tags match every filter, best first (lowest ``order_by``).

    ``find("minilm-l3", dict_size=4096, k=32)``; filters compare as numbers when both sides are.
    """

    def matches(info: VersionInfo) -> bool:
        for key, wanted in filters.items():
            have = info.tags.get(key)
            if have is None:
                return False
            try:
                if float(have) != float(wanted):
                    return False
            except (TypeError, ValueError):
                if str(have) != str(wanted):
                    return False
        return True

    def rank(info: VersionInfo) -> tuple:
        try:
            return (0, float(info.tags[order_by]), -int(info.version))
        except (KeyError, ValueError):
            return (1, 0.0, -int(info.version))

    return sorted((i for i in versions(family, tracking_uri) if matches(i)), key=rank)


# -- loading ------------------------------------------------------------------------------------------

_NAME = re.compile(r"^(?:models:/)?(?P<family>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?$")


def parse_name(name: str) -> tuple[str, str | None, str | None]:
    """``family@alias`` / ``family/3`` / ``models:/...`` / ``family`` -> (family, alias, version)."""
    m = _NAME.match(name.strip()) if isinstance(name, str) else None
    if not m:
        raise SAERegistryError(
            f"cannot read dictionary name {name!r}: use FAMILY@ALIAS, FAMILY/VERSION or models:/FAMILY/VERSION"
        )
    return m["family"], m["alias"], m["version"]


def resolve(name: str, tracking_uri: str | None = None) -> VersionInfo:
    """The registered version ``name`` points at (a bare family means its newest version)."""
    family, alias, version = parse_name(name)
    client = _client(tracking_uri)
    model = _get_model(client, family)
    if alias is not None:
        if alias not in model.aliases:
            raise SAERegistryError(
                f"{family} has no alias {alias!r}; aliases: "
                f"{_listing([f'{a} (v{v})' for a, v in sorted(model.aliases.items())])}"
            )
        version = str(model.aliases[alias])
    elif version is None:
        all_versions = _versions(client, family)
        if not all_versions:
            raise SAERegistryError(f"{family} has no versions yet")
        version = str(max(int(v.version) for v in all_versions))
    mv, _ = _get_version(client, family, version)
    return _info(mv, _aliases_by_version(model))


def cache_root() -> Path:
    return Path(os.environ.get("SAE_REGISTRY_CACHE", Path.home() / ".cache" / "sae-registry"))


def _cache_dir(info: VersionInfo) -> Path:
    where = hashlib.sha256(resolve_tracking_uri().encode()).hexdigest()[:12]
    return cache_root() / where / info.family / info.version


def _verified(directory: Path, info: VersionInfo) -> bool:
    """Whether both files are present and match the checksums recorded at registration."""
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = directory / name
        expected = info.tags.get(f"sha256.{name}")
        if not path.is_file() or expected is None or _sha256(path) != expected:
            return False
    return True


def _download(info: VersionInfo, directory: Path) -> None:
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory.parent))
    try:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{info.family}/{info.version}/artifacts/{name}", dst_path=str(tmp)
            )
            shutil.move(got, tmp / name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Dictionary:
    """A registered dictionary, ready to encode. Get one with :func:`load`.

    It is also an SAE as SAEBench's custom-SAE interface wants one (``sae_bench.custom_saes.base_sae``):
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``, ``encode``,
    ``decode``, ``forward`` (and calling it), ``device``, ``dtype``, ``to(device=, dtype=)`` and ``cfg``
    (``d_in``, ``d_sae``, ``model_name``, ``hook_name``, ``hook_layer``, ``architecture``, ...). The
    weights are the model's with its ``input_scale`` s folded in (see ``interchange.py``):

        W_enc = s * encoder.weight.T    b_enc = encoder.bias    W_dec = W_dec / s    b_dec = b_dec / s

    so that on raw activations ``x [..., d_in]`` and codes ``f [..., d_sae]``

        encode(x) == TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))     # sparsity l1: no TopK
        decode(f) == f @ W_dec + b_dec

    bit for bit when s is 1 (every imported dictionary), else to float32 rounding. They are tensors
    derived from ``sae`` (read-only views or copies, cached until :meth:`to`), not its parameters.
    Decoder rows have norm 1/s when the trainer kept them at unit norm.
    """

    name: str
    family: str
    version: str
    aliases: list[str]
    sae: SparseAutoencoder
    metrics: dict[str, float]
    lineage: dict[str, str]
    path: Path
    tags: dict[str, str] = field(repr=False, default_factory=dict)
    _folded: Weights | None = field(init=False, repr=False, compare=False, default=None)

    @property
    def config(self) -> SAEConfig:
        return self.sae.cfg

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    @property
    def cfg(self) -> SAEBenchConfig:
        """SAEBench's config view: shape, architecture, source model and hook (from the lineage)."""
        return saebench_config(self.sae.cfg, self.lineage, self.device, self.dtype)

    def _weights(self) -> Weights:
        if self._folded is None:
            self._folded = folded_weights(self.sae)
        return self._folded

    @property
    def W_enc(self) -> torch.Tensor:
        """``[d_in, d_sae]``, input_scale folded in (see the class docstring)."""
        return self._weights().W_enc

    @property
    def b_enc(self) -> torch.Tensor:
        """``[d_sae]``."""
        return self._weights().b_enc

    @property
    def W_dec(self) -> torch.Tensor:
        """``[d_sae, d_in]``, rows are the dictionary directions, input_scale folded in."""
        return self._weights().W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        """``[d_in]``, input_scale folded in."""
        return self._weights().b_dec

    def _tensor(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, self.dtype)
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device).to(self.dtype)

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """Sparse codes ``[..., dict_size]`` of raw activations ``[..., input_size]``."""
        return self.sae.encode(self._tensor(x))

    @torch.no_grad()
    def encode_topk(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact codes ``(values, indices)``, each ``[batch, k]`` (top_k dictionaries)."""
        return self.sae.encode_topk(self._tensor(x))

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """Reconstruction ``[..., input_size]`` (raw units) of dense codes ``[..., dict_size]``."""
        return self.sae.decode(self._tensor(codes))

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        return self.sae(self._tensor(x))

    def forward(self, x) -> torch.Tensor:
        """``decode(encode(x))``: the reconstruction (SAEBench calls the SAE itself)."""
        return self.reconstruct(x)

    __call__ = forward

    def to(self, *args, **kwargs) -> Dictionary:
        """Move and/or cast the model in place, as ``nn.Module.to``: ``to("cuda")``, ``to(dtype=torch.bfloat16)``."""
        self.sae.to(*args, **kwargs)
        self._folded = None
        return self


def load(name: str, *, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> Dictionary:
    """Fetch a registered dictionary by name and rebuild it on ``device``.

    ``load("family@champion")``, ``load("family/3")``, ``load("models:/family/3")``. The two files
    are cached per version (``$SAE_REGISTRY_CACHE``, default ``~/.cache/sae-registry``) and checked
    against the SHA-256 recorded at registration every time; a mismatch in the cache means a fresh
    download, a mismatch in the registry's own copy is refused.
    """
    info = resolve(name, tracking_uri)
    directory = _cache_dir(info)
    if not _verified(directory, info):
        directory.parent.mkdir(parents=True, exist_ok=True)
        _download(info, directory)
        if not _verified(directory, info):
            shutil.rmtree(directory, ignore_errors=True)
            raise SAERegistryError(
                f"the files of {info.family}/{info.version} do not match the checksums recorded when it was "
                "registered: they were changed or damaged. Refusing to load them."
            )
    sae = SparseAutoencoder.load(directory, device=device)
    lineage = {k: v for k, v in info.tags.items() if k.split(".")[0] in ("store", "source", "sweep", "git",
                                                                           "sae_registry", "import")}
    lineage["run_id"] = info.run_id or ""
    return Dictionary(name, info.family, info.version, info.aliases, sae, info.metrics, lineage, directory,
                      info.tags)
