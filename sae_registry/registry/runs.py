"""Recording a training or an import as MLflow runs, ready for registration.

One MLflow run per dictionary, in an experiment named after its family: every parameter, metrics
over steps (one batched, asynchronous call per evaluation, see :class:`MetricLogger`), final
held-out metrics, lineage tags, ``metrics.json`` and plots as artifacts, and the dictionary itself
logged as a models-from-code pyfunc (``serving.py``) whose artifacts are ``sae.safetensors`` +
``config.json``. A run that raises ends FAILED (KILLED on Ctrl-C, see :func:`run_guard`); only a
FINISHED one can be registered (``registry.register_run``). The only module of the registry that imports ``training/``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cache, partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from .._util.version import __version__
from ..architectures.catalogue import rule_of
from ..config.options import SAEConfig
from ..errors import SAERegistryError, check_family_name
from ..interchange.formats import read
from ..metrics import plots
from ..model.files import CONFIG_FILE, WEIGHTS_FILE, prepare_out
from ..model.sae import SparseAutoencoder
from ..store.source import ActivationSource, SourceLike, open_source
from ..training import loop
from ..training.loop import METRICS_FILE, TrainConfig, TrainResult, check_pack, train_pack
from .tracking import Tracking, TrackingLike, code_tags, lineage_tags, retrying, sha256
from .versions import check_alias, register_run, set_alias

__all__ = ["Imported", "MetricLogger", "Recorded", "import_dictionary", "log_files", "record_downstream",
           "record_pack", "run_guard", "set_tags",
           "run_name", "default_run_name", "start_runs", "train", "train_and_register"]

MODEL_ARTIFACT = "sae"  # name of the logged pyfunc model
SERVING_CODE = Path(__file__).with_name("serving.py")
# What serving.py needs to rebuild a dictionary, shipped in each model folder (see shipped_code).
SHIPPED_PACKAGE = "sae_registry_code"
SERVING_REQUIREMENTS = ["torch", "safetensors", "numpy"]


class MetricLogger:
    """Training callback: each evaluation's numbers as one asynchronous ``log_batch`` call.

    :meth:`flush` waits for them all and sends again, synchronously, any that failed.
    """

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.pending: list = []  # (MLflow's handle of an asynchronous batch, its metrics)

    def __call__(self, step: int, entry: dict, _checkpoint=None) -> None:
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
                retrying(partial(self.client.log_batch, self.run_id, metrics=metrics),
                         f"logging metrics of run {self.run_id}")
        self.pending.clear()


@contextmanager
def run_guard(client, run_ids: list[str]) -> Iterator[None]:
    """Runs that the block leaves by an exception end FAILED (KILLED on Ctrl-C); the exception goes on."""
    try:
        yield
    except BaseException as e:
        import mlflow

        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for run_id in run_ids:
            try:
                mlflow.flush_async_logging()  # metrics still queued land before the run ends
                client.set_terminated(run_id, status)
            except Exception:  # the original error matters more than a failed status update
                pass
        raise


def run_name(cfg: SAEConfig, train_cfg: TrainConfig | None = None) -> str:
    """One name style for trained and imported dictionaries, the rule's (:meth:`Rule.run_name
    <sae_registry.architectures.base.Rule.run_name>`): ``topk-d4096-k32``, ``l1-d4096-l1c0.005``,
    ``jumprelu-d4096-l0c0.0026``, ``matryoshka-d4096-k32-p256.1024.4096``; an import has no coefficient."""
    return rule_of(cfg.sparsity).run_name(cfg, train_cfg.resolved(cfg) if train_cfg is not None else None)


default_run_name = run_name  # the name of a training of ``sae_cfg`` with ``train_cfg``


@dataclass
class Recorded:
    """What :func:`train_and_register` (or :func:`train`) made: the run, and the version when one was
    registered (``None`` when nothing was recorded), and the training's result."""

    run_id: str | None
    version: str | None
    result: TrainResult

    @property
    def sae(self) -> SparseAutoencoder:
        """The trained dictionary (``result.sae``)."""
        return self.result.sae

    @property
    def metrics(self) -> dict[str, float]:
        """Its final held-out metrics (``result.metrics``)."""
        return self.result.metrics


def train(
    acts: SourceLike,
    sae_cfg: SAEConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    family: str | None = None,
    alias: str | None = None,
    tracking_uri: TrackingLike = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: object,
) -> Recorded:
    """Train one dictionary on ``acts``; with ``family``, record and register it like any run.

    >>> r = sae_registry.train(acts, dict_size=4096, top_k=32, tokens=2_000_000)   # acts: [n, d] floats
    >>> r.sae.encode(acts[:8])
    >>> sae_registry.train(acts, family="mine", alias="champion", tracking_uri="sqlite:///mlflow.db")

    ``acts`` is a torch tensor or numpy array ``[n, d]`` of floats (the last 5% of rows held out for
    evaluation; an :class:`~sae_registry.store.source.ArraySource` for another fraction or to name
    its ``source``), a store path or URL, or any :class:`~sae_registry.store.source.ActivationSource`
    (see :func:`~sae_registry.store.source.open_source`). ``options`` are fields of
    :class:`SAEConfig` and :class:`TrainConfig` (``dict_size``, ``top_k``, ``sparsity``, ``tokens``,
    ``lr``, ...); they replace those of ``sae_cfg`` / ``train_cfg``, and ``input_size`` defaults to
    the activations' width. ``out_dir`` receives ``sae.safetensors`` + ``config.json`` (default: a
    new temporary directory, ``result.out_dir``).

    With ``family``, the training is an MLflow run in ``tracking_uri`` (see :func:`train_and_register`),
    registered as the next version of ``family`` (given ``alias`` when set); its lineage records the
    data's fingerprint, and ``store.path`` is ``memory:<fingerprint>`` for an in-memory array.
    Without it nothing is recorded, and MLflow is not imported. Every argument is checked, and the
    array read once (refusing NaN, Inf, a wrong shape or dtype), before any run starts.
    """
    if family is None and (alias is not None or tracking_uri is not None):
        raise SAERegistryError("alias and tracking_uri say where to register a dictionary: give family= too "
                               "(the registered model's name), or leave them out to train without recording")
    if family is not None:
        check_family_name(family)
        if alias is not None:
            check_alias(alias)
    sae_options, train_options = _split_options(options)
    train_cfg = _with_options("train_cfg", TrainConfig, train_cfg, train_options)
    if sae_cfg is not None and not isinstance(sae_cfg, SAEConfig):
        raise SAERegistryError(f"sae_cfg must be an SAEConfig (or None), got {type(sae_cfg).__name__}")
    source = open_source(acts)
    if sae_cfg is None:
        sae_options.setdefault("input_size", source.d)
    sae_cfg = _with_options("sae_cfg", SAEConfig, sae_cfg, sae_options)
    if sae_cfg.input_size != source.d:
        raise SAERegistryError(f"input_size ({sae_cfg.input_size}) differs from the width of the activations "
                               f"({source.d}); leave input_size out to take theirs")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="sae-train-"))
    try:
        if family is not None:
            return train_and_register(source, sae_cfg, train_cfg, out, family=family, alias=alias,
                                      tracking_uri=tracking_uri, resume=resume, overwrite=overwrite, progress=progress)
        prepare_out(out, overwrite=overwrite, resume=resume)
        return Recorded(None, None, loop.train(source, sae_cfg, train_cfg, out, resume=resume, progress=progress))
    except BaseException:
        if out_dir is None:  # a directory of ours that nobody could name to resume from
            shutil.rmtree(out, ignore_errors=True)
        raise


def _split_options(options: dict) -> tuple[dict, dict]:
    """``options`` as (SAEConfig fields, TrainConfig fields); a key of neither is refused, naming both lists."""
    sae_names = {f.name for f in fields(SAEConfig)}
    train_names = {f.name for f in fields(TrainConfig)}
    if unknown := sorted(set(options) - sae_names - train_names):
        raise SAERegistryError(f"unknown options {unknown}; SAE options: {sorted(sae_names)}; training options: "
                               f"{sorted(train_names)}")
    return ({k: v for k, v in options.items() if k in sae_names},
            {k: v for k, v in options.items() if k in train_names})


Config = TypeVar("Config", SAEConfig, TrainConfig)


def _with_options(name: str, cls: type[Config], given: object, options: dict) -> Config:
    """``given`` (a ``cls``, or None for the defaults) with ``options`` replacing its fields, checked."""
    if given is None:
        return cls(**options)
    if not isinstance(given, cls):
        raise SAERegistryError(f"{name} must be a {cls.__name__} (or None), got {type(given).__name__}")
    return replace(given, **options)


def train_and_register(
    store: ActivationSource,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    family: str,
    register: bool = True,
    alias: str | None = None,
    tracking_uri: TrackingLike = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback=None,
) -> Recorded:
    """Train one dictionary as an MLflow run and (when ``register``) register it in ``family``.

    ``tracking_uri``: a URI or a :class:`~sae_registry.registry.tracking.Tracking` (default
    ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` here). A run that raises is marked FAILED (KILLED on
    Ctrl-C) and nothing is registered. An ``out_dir`` that already holds a dictionary is refused
    unless ``resume`` (continue its checkpoint) or ``overwrite`` (see ``sae_files.prepare_out``).
    """
    check_family_name(family)  # names are checked before the run: a bad one must not cost a training
    if alias is not None:
        check_alias(alias)
    prepare_out(out_dir, overwrite=overwrite, resume=resume)  # before any run exists
    tracking = Tracking.resolve(tracking_uri)
    (recorded,) = record_pack(store, [(sae_cfg, train_cfg, out_dir)], family=family, tracking_uri=tracking,
                              resume=resume, progress=progress, callbacks=[callback])
    if register:
        assert recorded.run_id is not None  # record_pack made the run
        recorded.version = register_run(recorded.run_id, family, tracking_uri=tracking)
        if alias:
            set_alias(family, alias, recorded.version, tracking_uri=tracking)
    return recorded


def start_runs(
    store: ActivationSource,
    members: list[tuple[SAEConfig, TrainConfig, str | Path]],
    *,
    family: str,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: TrackingLike = None,
    member_tags: list[dict] | None = None,
    run_names: list[str] | None = None,
) -> list[str]:
    """Create one MLflow run per configuration, with its parameters and lineage tags; their ids.
    ``run_names`` (a sweep's, which tell apart members the rule's own names do not) replace :func:`run_name`'s."""
    from mlflow.entities import Param

    check_family_name(family)
    tracking = Tracking.resolve(tracking_uri)
    client = tracking.client
    experiment_id = tracking.ensure_experiment(family)
    tags = lineage_tags(store, sweep_id)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_ids = []
    names = run_names or [default_run_name(s, t) for s, t, _ in members]
    for (sae_cfg, train_cfg, _), extra, name in zip(members, member_tags or [{}] * len(members), names):
        run = client.create_run(experiment_id, run_name=name, tags={**tags, **extra})
        params = {**sae_cfg.to_dict(), **train_cfg.resolved(sae_cfg).to_dict(), "store_tokens": len(store)}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        run_ids.append(run.info.run_id)
    return run_ids


def record_pack(
    store: ActivationSource,
    members: list[tuple[SAEConfig, TrainConfig, str | Path]],
    *,
    family: str,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    run_ids: list[str] | None = None,
    tracking_uri: TrackingLike = None,
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
    new ones. Nothing is registered here: see ``registry.register_run``. If training raises, every run
    of the pack is marked FAILED (KILLED on Ctrl-C).
    """
    check_pack(store, members)  # a pack that cannot train is refused before any run exists
    tracking = Tracking.resolve(tracking_uri)
    client = tracking.client
    if run_ids is None:
        run_ids = start_runs(store, members, family=family, sweep_id=sweep_id, parent_run_id=parent_run_id,
                             tracking_uri=tracking)
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
    with run_guard(client, run_ids):
        results = train_pack(store, members, resume=resume, progress=progress,
                             callbacks=[on_eval(lg, cb) for lg, cb in zip(loggers, user_callbacks)],
                             extras=[{"lineage": tags}] * len(members))
        more = finish(results) if finish is not None else [{}] * len(results)
        for logger in loggers:  # a run ends only once all its step metrics are on the server
            logger.flush()
        for run_id, result, extra in zip(run_ids, results, more):
            _log_outputs(client, run_id, result, extra)
    return [Recorded(run_id, None, result) for run_id, result in zip(run_ids, results)]


def _log_outputs(client, run_id: str, result: TrainResult, extra: dict[str, float] | None = None) -> None:
    """Final metrics (and ``extra`` ones, also as tags), artifacts, plots, the logged model; the run ends FINISHED.

    Few calls: the files (``metrics.json``, the plots) go up as one folder, and the final metrics
    travel in the logged model's own ``log_batch``.
    """
    from mlflow.entities import Metric, RunTag

    step = result.history[-1]["step"] if result.history else 0
    with tempfile.TemporaryDirectory(prefix="sae-outputs-") as tmp:
        shutil.copyfile(result.out_dir / METRICS_FILE, Path(tmp) / METRICS_FILE)
        (Path(tmp) / "plots").mkdir()
        for name, fig in (
            ("training_curves", plots.training_curves(result.history)),
            ("feature_density", plots.density_histogram(result.evaluation.density)),
            ("l0_distribution", plots.l0_histogram(result.evaluation.l0_per_row)),
        ):
            fig.savefig(Path(tmp) / "plots" / f"{name}.png")
        client.log_artifacts(run_id, tmp)
    _log_model(client, run_id, result.out_dir, result.sae.cfg,
               metrics=[Metric(f"final/{k}", v, 0, step) for k, v in result.metrics.items()]
               + [Metric("final/tokens_per_second", result.tokens_per_second, 0, step)]
               + [Metric(k, v, 0, step) for k, v in (extra or {}).items()],
               tags=[RunTag(k.replace("/", "."), repr(float(v))) for k, v in (extra or {}).items()])


def _log_model(client, run_id: str, out: Path, cfg: SAEConfig, metrics: list | None = None,
               tags: list | None = None) -> None:
    """Log the dictionary in ``out`` as the run's pyfunc model, with the tags registration needs; ends the run FINISHED.

    Through the client bound to the run's server (MLflow's ``pyfunc.log_model`` would use its global
    tracking URI): a logged model is created, the pyfunc is saved locally and uploaded to it.
    ``metrics`` and ``tags`` (the final numbers) are sent with the model's tags, in one call.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.input_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.dict_size))]),
    )
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id,
                                       params=dict(run.data.params), tags={"mlflow.modelFlavor": "python_function"})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory(prefix="sae-model-") as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(SERVING_CODE),
            artifacts={WEIGHTS_FILE: str(out / WEIGHTS_FILE), CONFIG_FILE: str(out / CONFIG_FILE)},
            signature=signature,
            code_paths=[str(shipped_code(Path(tmp) / "code"))],
            pip_requirements=SERVING_REQUIREMENTS,
            mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                               model_id=model.model_id),
        )
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, "READY")
    # What registration needs, kept on the run so that any process can register it later.
    client.log_batch(run_id, metrics=metrics or [], tags=[*(tags or []), *_tags({
        "sae.model_uri": f"models:/{model.model_id}",
        f"sha256.{WEIGHTS_FILE}": sha256(out / WEIGHTS_FILE),
        f"sha256.{CONFIG_FILE}": sha256(out / CONFIG_FILE),
    })])
    client.set_terminated(run_id, "FINISHED")


def shipped_code(directory: Path) -> Path:
    """Copy the modules serving needs into ``directory/sae_registry_code`` (a package); returns it.

    Logged as the model's ``code_paths``: MLflow puts the model's ``code/`` folder first on
    ``sys.path`` when loading it, so the model runs the code it was trained with, and its pip
    requirements need not name ``sae-registry`` (an index could serve anyone's package under it).
    A private name, so that loading a model never replaces an installed ``sae_registry``. The
    subpackages keep their layout (``sae_registry_code/model/sae.py``), with empty ``__init__.py``s.
    """
    package = Path(directory) / SHIPPED_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'"""sae-registry {__version__}: the modules a logged dictionary loads with."""\n')
    root = Path(__file__).parents[1]
    for name in shipped_modules():
        target = package / name
        for folder in reversed(target.relative_to(package).parents[:-1]):
            (package / folder).mkdir(exist_ok=True)
            (package / folder / "__init__.py").touch()
        shutil.copyfile(root / name, target)
    return package


@cache
def shipped_modules(root: str = "model/sae.py") -> tuple[str, ...]:
    """The package's own modules that ``root`` imports, directly or not, as paths under the package
    (``model/sae.py``: what serving loads), and every built-in architecture (the catalogue imports
    a rule by name when a dictionary of it is loaded).

    Read from the code, not listed by hand, so that a module the model starts to use is shipped too
    (once per process: every dictionary a trial logs ships the same code). Imports under ``if
    TYPE_CHECKING:`` are not followed: they never run.
    """
    import ast

    here = Path(__file__).parents[1]
    todo = [root, *(str(p.relative_to(here)) for p in sorted((here / "architectures").glob("[!_]*.py")))]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((here / name).read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level == 0 or id(node) in typing_only:
                continue
            package = Path(name).parent
            for _ in range(node.level - 1):
                package = package.parent
            base = package / node.module.replace(".", "/") if node.module else package
            for alias in node.names:  # `from . import files` names a module; `from .x import y` a name in x
                module = base / alias.name
                todo.append(str(module) + ".py" if (here / f"{module}.py").is_file() else str(base) + ".py")
    return tuple(sorted(seen))


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Set several tags of a run in one call."""
    client.log_batch(run_id, tags=_tags(tags))


def log_files(run_id: str, files: list[Path], artifact_path: str, tracking_uri: TrackingLike = None) -> str:
    """Log ``files`` on a run under ``artifact_path`` (e.g. feature cards); returns that folder's URI."""
    client = Tracking.resolve(tracking_uri).client
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"


def record_downstream(family: str, version: str, metrics: dict[str, float], *, about: dict[str, str] | None = None,
                      tracking_uri: TrackingLike = None) -> None:
    """Record a registered version's downstream metrics as a sweep does: on its run and as ``downstream.*`` tags.

    ``metrics`` are ``downstream.evaluate``'s (``downstream/fidelity``, ...): logged on the version's
    run, and as tags (``downstream.fidelity``) on the run and the version, which ``list`` and
    ``find`` read. ``about`` adds tags saying what it was measured on (``downstream.text``, ...).
    A later evaluation replaces an earlier one's numbers.
    """
    from mlflow.entities import Metric

    client = Tracking.resolve(tracking_uri).client
    run_id = client.get_model_version(family, version).run_id
    now = int(time.time() * 1000)
    tags = {k.replace("/", "."): repr(float(v)) for k, v in metrics.items()} | dict(about or {})
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=_tags(tags))
    for key, value in tags.items():
        client.set_model_version_tag(family, version, key, value)


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
    tracking_uri: TrackingLike = None,
) -> Imported:
    """Register a SAELens or dictionary_learning dictionary saved in ``directory`` as the next version of ``family``.

    ``fmt`` None detects the format from the files; the weights are mapped exactly or refused (see
    ``interchange/formats.py``). One MLflow run records it like a trained dictionary, without training
    metrics: params (the shape, ``import.format``, ``import.architecture``, ``import.origin``), tags
    (``import.*`` incl. the SHA-256 of the weights read, ``source.*`` where their config names the
    model and hook, ``sae_registry.version``), their config file as the artifact ``import/``, and the
    dictionary logged as trained ones are (``sae.safetensors`` + ``config.json``), so that
    ``load``, its checksums and serving work. A failure marks the run FAILED and registers nothing.
    """
    from mlflow.entities import Param

    check_family_name(family)
    if alias is not None:
        check_alias(alias)
    tracking = Tracking.resolve(tracking_uri)
    foreign = read(directory, fmt)  # refuses what cannot be mapped before any run exists
    cfg = foreign.sae.cfg
    origin = str(foreign.origin.resolve())
    tags = {
        "import.format": foreign.format,
        "import.architecture": foreign.architecture,
        "import.origin": origin,
        f"import.sha256.{foreign.weights_file.name}": sha256(foreign.weights_file),
        **foreign.source,
        **code_tags(),
    }
    if foreign.conversions:
        tags["import.conversions"] = "; ".join(foreign.conversions)
    client = tracking.client
    experiment_id = tracking.ensure_experiment(family)
    run_id = client.create_run(experiment_id, run_name=f"import-{foreign.format}-{run_name(cfg)}",
                               tags=tags).info.run_id
    with run_guard(client, [run_id]):
        params = {**cfg.to_dict(), "import.format": foreign.format, "import.architecture": foreign.architecture,
                  "import.origin": origin}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.log_artifact(run_id, str(foreign.config_file), "import")
        with tempfile.TemporaryDirectory(prefix="sae-import-") as tmp:
            foreign.sae.save(tmp, extra={"lineage": tags, "imported_from": {
                "format": foreign.format, "architecture": foreign.architecture, "origin": origin,
                "conversions": foreign.conversions, "config": foreign.config}})
            _log_model(client, run_id, Path(tmp), cfg)
    version = register_run(run_id, family, tracking_uri=tracking)
    if alias:
        set_alias(family, alias, version, tracking_uri=tracking)
    return Imported(run_id, version, foreign.format, foreign.architecture)
