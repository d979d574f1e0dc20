"""The tracking server as a value: where MLflow lives, how to reach it, what every run is tagged with.

A :class:`Tracking` is built once at the edge (the CLI, or a caller's ``tracking_uri=``) and handed
down; nothing in the package writes ``MLFLOW_TRACKING_URI`` or MLflow's global tracking URI, so one
call naming a server never changes where the next call goes.

- **Where**: an explicit URI, else ``$MLFLOW_TRACKING_URI`` (read when resolved), else the embedded
  default, a SQLite database ``mlflow.db`` in the working directory (artifacts in ``./mlruns``),
  which the stock ``mlflow ui`` opens from the same directory.
- **Reachability**: a server that does not accept connections is refused in seconds, once per
  server per process (MLflow itself would retry for minutes).
- **Retries**: :func:`retrying`, the one loop for calls that a busy or restarting server may fail.
- **Lineage**: the tags that trace a run or version to its data and code, and the checksums of
  the files registration records.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .._util.net import probe
from .._util.version import __version__
from ..errors import SAERegistryError

if TYPE_CHECKING:
    from ..store.source import ActivationSource

T = TypeVar("T")

# Tag prefixes that trace a dictionary to its data and code (on runs, versions and Dictionary.lineage).
LINEAGE_PREFIXES = ("store", "source", "sweep", "git", "sae_registry", "import")
# What registration copies from a run onto its version: the lineage, the files' checksums and the
# downstream metrics a sweep measured.
VERSION_TAG_PREFIXES = LINEAGE_PREFIXES + ("sha256", "downstream", "ray")  # ray: the node(s) it trained on


# what MLflow's tracking stores accept (a database URL may name its driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc")
_REACHED: set[str] = set()  # tracking servers this process has connected to


@dataclass(frozen=True)
class Tracking:
    """One MLflow tracking server (or SQLite database), passed down as a value."""

    uri: str

    @classmethod
    def resolve(cls, value: str | Tracking | None = None) -> Tracking:
        """``value`` when given, else ``$MLFLOW_TRACKING_URI`` (read now), else ``sqlite:///<cwd>/mlflow.db``."""
        if isinstance(value, Tracking):
            return value
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise SAERegistryError(f"tracking_uri must be a URI string, got {type(value).__name__}")
        uri = str(value or "") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        return cls(uri)

    def __str__(self) -> str:
        return self.uri

    @property
    def client(self):
        """An ``MlflowClient`` bound to this server (one per server per process), checked reachable."""
        self.check_reachable()
        return _client(self.uri)

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Refuse, in seconds and naming it, a tracking server that does not accept connections.

        MLflow would retry each request for minutes and then fail deep inside ``requests``. Checked once
        per server per process (a server seen once gets MLflow's own retries); skipped behind a proxy.
        """
        parts = urllib.parse.urlsplit(self.uri)
        self._check_scheme(parts.scheme)
        if parts.scheme not in ("http", "https") or self.uri in _REACHED:
            return
        if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname or ""):
            return
        try:
            probe(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), timeout)
        except OSError as e:
            raise SAERegistryError(
                f"cannot reach the MLflow tracking server at {self.uri} ({e}); start it, or point "
                "MLFLOW_TRACKING_URI (--tracking-uri) at one that runs (unset it for the embedded registry)"
            ) from None
        _REACHED.add(self.uri)

    def _check_scheme(self, scheme: str) -> None:
        """Refuse a URI MLflow has no store for, or an embedded database in a folder that does not exist
        (MLflow's own errors come from deep inside SQLAlchemy)."""
        if len(scheme) > 1 and scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise SAERegistryError(
                f"{self.uri!r} is not a tracking URI MLflow can use: give http(s)://HOST:PORT, sqlite:///PATH "
                "(or another database URL), or unset --tracking-uri / MLFLOW_TRACKING_URI for the embedded registry"
            )
        if scheme == "sqlite" and self.uri.startswith("sqlite:///") and "?" not in self.uri:
            folder = Path(self.uri[len("sqlite:///"):]).parent
            if not folder.is_dir():
                raise SAERegistryError(f"the registry database {self.uri} is in a folder that does not exist "
                                       f"({folder}); create it, or give another --tracking-uri")

    def open_in_background(self) -> Callable[[], None]:
        """Open the store in another thread, now (a new SQLite store makes its schema: seconds), while
        this one does something else (a sweep starts Ray); returns the call that waits for it. A failure
        is left to the next call made here, which raises it where it can be reported."""

        def touch() -> None:
            try:
                self.client.search_experiments(max_results=1)
            except Exception:  # noqa: BLE001 (raised again, in the caller's thread, by its next call)
                pass

        thread = threading.Thread(target=touch, name="mlflow-open", daemon=True)
        thread.start()
        return thread.join

    def assume_reachable(self) -> None:
        """Skip the check from now on (a Ray trial: the driver checked; MLflow's retries ride out a restart)."""
        _REACHED.add(self.uri)

    def ensure_experiment(self, name: str) -> str:
        """The id of the experiment ``name``, created if needed (call it in the driver: see STACK-NOTES)."""
        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


TrackingLike = str | Tracking | None


@cache
def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


# -- retries ----------------------------------------------------------------------------------------


def retry_seconds() -> float:
    """``$SAE_REGISTRY_RETRY_SECONDS`` (default 600), read when a retry starts."""
    raw = os.environ.get("SAE_REGISTRY_RETRY_SECONDS", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise SAERegistryError(
            f"SAE_REGISTRY_RETRY_SECONDS={raw!r} is not a number of seconds (>= 0); set it to e.g. 600, or unset it"
        )
    return seconds


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the server could not be reached (not that it answered with an error)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    return not isinstance(error, RestException) and isinstance(error, (MlflowException, requests.RequestException,
                                                                        OSError))


def retrying(call: Callable[[], T], what: str, *, transient: Callable[[BaseException], bool] = unreachable,
             landed: Callable[[], T | None] | None = None, seconds: float | None = None,
             first_wait: float = 1.0) -> T:
    """``call()``, again with jittered backoff while it fails with an error that ``transient`` accepts.

    MLflow's client retries each request a few times, but an asynchronous batch that still fails is
    only logged and dropped, and SQLite gives up on a lock after 20 s: a server restarted or busy in
    the middle of a sweep must lose nothing. Other errors (the server answered: a bad value, a name
    taken) are raised at once. ``landed()``, asked before each retry, returns the result when the
    failed call took effect after all (a version registered although its answer was lost).
    """
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    wait = first_wait
    while True:
        try:
            return call()
        except Exception as e:
            if not transient(e):
                raise
            if time.monotonic() + wait > deadline:
                raise SAERegistryError(f"{what}: the tracking server did not come back ({e})") from e
        if landed is not None and (done := landed()) is not None:
            return done
        time.sleep(wait * (0.5 + random.random()))
        wait = min(wait * 2, 30.0)


# -- lineage --------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """The commit of the package's checkout, when it runs from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def code_tags() -> dict[str, str]:
    """The code a run was made with: the package version and, from a checkout, its commit."""
    tags = {"sae_registry.version": __version__}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def lineage_tags(store: ActivationSource, sweep_id: str | None = None) -> dict[str, str]:
    """Tags that trace a dictionary to its data and code; on runs and versions.

    ``store.path`` is where the rows live: a store's folder or URL, or ``memory:<fingerprint>`` for an
    array trained on in memory (never written anywhere); ``store.fingerprint`` names the rows either way."""
    source = store.source
    tags = {
        "store.path": str(store.path),
        "store.fingerprint": store.fingerprint,
        "source.model": str(source.get("model", "")),
        "source.layer": str(source.get("layer", "")),
        "source.hook": str(source.get("hook", "")),
    }
    if sweep_id:
        tags["sweep.id"] = sweep_id
    return {**tags, **code_tags()}


def lineage_of(tags: dict[str, str]) -> dict[str, str]:
    """The lineage part of a run's or version's tags."""
    return {k: v for k, v in tags.items() if k.split(".")[0] in LINEAGE_PREFIXES}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (what registration records and ``load`` checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
