"""The tracking server is a value: an explicit ``tracking_uri`` is used, and only for that call.

Two small SQLite registries, A and B, each hold a different ``same/1``; the environment
(``MLFLOW_TRACKING_URI``) names B, as a user's shell would, while calls name A explicitly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.artifacts
import pytest
import torch
from click.testing import CliRunner

import sae_registry
from sae_registry import ActivationStore, SAEConfig, SAERegistryError
from sae_registry.cli.commands import main
from sae_registry.registry.runs import train_and_register
from sae_registry.registry.versions import resolve
from sae_registry.training.loop import TrainConfig

D = 16
SIZES = {"a": 32, "b": 48}  # dict_size of same/1 in each registry: tells them apart


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Registries A and B: ``same/1`` in each (dict_size 32 in A, 48 in B), plus ``only-a`` / ``only-b``."""
    root = tmp_path_factory.mktemp("two-registries")
    g = torch.Generator().manual_seed(0)
    with ActivationStore.create(root / "tiny.zarr", d=D, chunk_tokens=1024, source={"model": "synthetic"}) as store:
        store.append(torch.randn(8192, D, generator=g))
    store = ActivationStore.open(root / "tiny.zarr")
    uris = {name: f"sqlite:///{root / name}.db" for name in SIZES}
    cfg = TrainConfig(tokens=2048, batch_size=512, eval_every=2, lr=3e-3, seed=0)
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, size in SIZES.items():
            made[name] = train_and_register(store, SAEConfig(D, size, 4), cfg, root / f"runs-{name}", family="same",
                                            tracking_uri=uris[name], progress=False)
            train_and_register(store, SAEConfig(D, 16, 2), cfg, root / f"runs-only-{name}", family=f"only-{name}",
                               tracking_uri=uris[name], progress=False)
    return {"uri": uris, "made": made, "store": store}


@pytest.fixture
def env_b(servers, monkeypatch):
    """The environment names B; returns a function that sets it again (as the user's shell holds it)."""
    def again() -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["uri"]["b"])
    again()
    return again


def test_unknown_family_error_names_the_families_of_the_server_asked(servers, env_b):
    a = servers["uri"]["a"]
    resolve("same/1", tracking_uri=a)  # an earlier call to A in the same process
    env_b()
    for call in (lambda: sae_registry.load("nope@champion", tracking_uri=a),
                 lambda: resolve("nope", tracking_uri=a)):
        with pytest.raises(SAERegistryError, match="no dictionary family 'nope'") as e:
            call()
        assert a in str(e.value) and "only-a" in str(e.value)
        assert "only-b" not in str(e.value)


def test_the_load_cache_is_keyed_on_the_server(servers, env_b):
    a, b = servers["uri"]["a"], servers["uri"]["b"]
    sae_registry.load("same/1", tracking_uri=a)
    env_b()
    from_a = sae_registry.load("same/1", tracking_uri=a)
    from_b = sae_registry.load("same/1", tracking_uri=b)
    assert from_a.path != from_b.path
    assert from_a.config.dict_size == SIZES["a"] and from_b.config.dict_size == SIZES["b"]
    again_a = sae_registry.load("same/1", tracking_uri=a)  # from its own cache entry, not B's
    assert again_a.path == from_a.path and again_a.config.dict_size == SIZES["a"]
    assert torch.equal(again_a.sae.W_dec, servers["made"]["a"].result.sae.W_dec.cpu())


def test_the_download_uses_the_explicit_server(servers, env_b, monkeypatch):
    a = servers["uri"]["a"]
    asked = []
    real = mlflow.artifacts.download_artifacts

    def spy(*args, **kwargs):
        asked.append(kwargs.get("tracking_uri"))
        return real(*args, **kwargs)

    def forbidden(uri):
        raise AssertionError(f"the package set MLflow's global tracking URI to {uri}")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", spy)
    monkeypatch.setattr(mlflow, "set_tracking_uri", forbidden)
    d = sae_registry.load("same/1", tracking_uri=a)
    assert d.config.dict_size == SIZES["a"]
    assert asked and all(uri == a for uri in asked)


def test_an_explicit_server_does_not_change_the_default(servers, env_b):
    a, b = servers["uri"]["a"], servers["uri"]["b"]
    assert sae_registry.load("same/1", tracking_uri=a).config.dict_size == SIZES["a"]
    assert os.environ["MLFLOW_TRACKING_URI"] == b
    assert sae_registry.load("same/1").config.dict_size == SIZES["b"]  # the environment's server, B
    assert [v.version for v in sae_registry.find("only-b")] == ["1"]


def test_the_cli_passes_its_server_down_without_writing_the_environment(servers, env_b):
    a, b = servers["uri"]["a"], servers["uri"]["b"]
    out = CliRunner().invoke(main, ["--tracking-uri", a, "list"])
    assert out.exit_code == 0, out.output
    assert "only-a" in out.output and "only-b" not in out.output
    assert os.environ["MLFLOW_TRACKING_URI"] == b
    shown = CliRunner().invoke(main, ["show", "same/1"])  # no option: the environment's server
    assert shown.exit_code == 0 and re.search(rf"dict_size\s+{SIZES['b']}\n", shown.output), shown.output


def test_families_and_versions_are_described_for_the_mlflow_ui(servers):
    a = servers["uri"]["a"]
    client = mlflow.MlflowClient(tracking_uri=a)
    made = servers["made"]["a"]
    store = servers["store"]
    family = client.get_registered_model("same").description
    assert "**same**" in family and f"{D} → {SIZES['a']} latents" in family and "k = 4" in family
    assert store.fingerprint in family and "`synthetic`" in family
    assert "plots/*.png" in family and "cards/index.html" in family
    version = client.get_model_version("same", made.version).description
    m = made.result.metrics
    for number in (m["fvu"], m["l0"], m["dead_fraction"]):
        assert f"{number:.4g}" in version
    assert "| FVU | explained variance | L0 | dead fraction | MSE |" in version  # the metrics table's order
    assert store.fingerprint in version and made.run_id in version
    artifact_uri = client.get_run(made.run_id).info.artifact_uri
    assert f"{artifact_uri}/plots/training_curves.png" in version
    assert f"{artifact_uri}/cards/index.html" in version


def test_importing_the_package_does_not_import_training_ray_or_matplotlib():
    code = ("import sys, sae_registry\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'matplotlib', 'mlflow'}),"
            " 'sae_registry.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"]


def test_a_bad_retry_setting_is_a_clear_error_when_used_not_at_import(monkeypatch):
    env = {**os.environ, "SAE_REGISTRY_RETRY_SECONDS": "abc"}
    imported = subprocess.run([sys.executable, "-c", "import sae_registry"], env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    from sae_registry.registry.tracking import retrying

    monkeypatch.setenv("SAE_REGISTRY_RETRY_SECONDS", "abc")
    with pytest.raises(SAERegistryError, match="SAE_REGISTRY_RETRY_SECONDS='abc' is not a number of seconds"):
        retrying(lambda: 1, "a call")
    monkeypatch.setenv("SAE_REGISTRY_RETRY_SECONDS", "0")
    assert retrying(lambda: 1, "a call") == 1


def test_tracking_resolves_explicit_then_environment_then_the_embedded_default(monkeypatch, tmp_path):
    from sae_registry.registry.tracking import Tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert Tracking.resolve().uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert Tracking.resolve().uri == "sqlite:///env.db"  # read when resolved, not at import
    assert Tracking.resolve("sqlite:///x.db").uri == "sqlite:///x.db"
    t = Tracking("sqlite:///y.db")
    assert Tracking.resolve(t) is t and t.client is t.client
    with pytest.raises(SAERegistryError, match="tracking_uri must be a URI string"):
        Tracking.resolve(3)
    with pytest.raises(SAERegistryError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        Tracking("http://127.0.0.1:9").client  # noqa: B018  (the property connects: the access is the test)
