"""Shared fixtures: small real stores on disk, synthetic (known structure) and harvested from MiniLM."""

from __future__ import annotations

import os

import pytest
import torch

from sae_registry import ActivationStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One Ray authentication mode for every Ray this test process starts. Ray 2.60 cannot change it within a
# process: after a local Ray in token mode (what sae-registry and ray.init pick when it is unset), a later
# local Ray in another mode cancels every actor before it runs. Token mode is tested in child processes.
os.environ["RAY_AUTH_MODE"] = "disabled"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def sparse_dictionary_data(n: int, d: int = 32, n_true: int = 64, k_true: int = 3, seed: int = 0):
    """Rows that are sums of ``k_true`` of ``n_true`` unit directions with magnitudes in [0.5, 1.5).

    Returns ``(x [n, d], directions [n_true, d])``: a sparse autoencoder should find the directions.
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :k_true]
    magnitudes = torch.rand(n, k_true, generator=g) + 0.5
    codes = torch.zeros(n, n_true).scatter_(1, idx, magnitudes)
    return codes @ directions, directions


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test in its own working directory, with no registry, cluster or cache of the user's.

    The embedded registry lives in the working directory, so without this a test would write into
    the checkout's mlflow.db (or into a server that MLFLOW_TRACKING_URI names).
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("SAE_REGISTRY_CACHE", str(tmp_path / "sae-registry-cache"))
    yield
    _forget_mlflow_globals()


def _forget_mlflow_globals() -> None:
    """Drop a tracking/registry URI that a test set in MLflow's module state (``mlflow.set_tracking_uri``).

    MLflow prefers it over ``MLFLOW_TRACKING_URI``, so it would outlive the test's environment and point
    every later ``MlflowClient()`` at a server that test has since stopped.
    """
    import sys

    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """A 60k-token store of known sparse structure, plus the true directions."""
    x, directions = sparse_dictionary_data(60_000)
    path = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
    with ActivationStore.create(path, d=x.shape[1], chunk_tokens=4096, source={"model": "synthetic"}) as store:
        store.append(x)
    return ActivationStore.open(path), directions


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory):
    """Real activations: MiniLM-L6 layer 3 over Python's reference docs (the first ~40k tokens)."""
    from sae_registry.harvest.local import demo_texts, harvest

    path = tmp_path_factory.mktemp("stores") / "minilm.zarr"
    return harvest(path, demo_texts(), layer=3, max_tokens=40_000, chunk_tokens=4096, progress=False,
                   text_source="python:pydoc_data.topics")
