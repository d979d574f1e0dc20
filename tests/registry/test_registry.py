"""The registry against a real `mlflow server` on 127.0.0.1 and against the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from procs import MLFLOW, free_port, start, start_mlflow_server, stop, wait_for

import sae_registry
from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.cli.commands import main
from sae_registry.registry.runs import train_and_register
from sae_registry.registry.versions import remove_alias, resolve, set_alias, versions
from sae_registry.training.loop import TrainConfig

pytestmark = pytest.mark.slow
FAMILY = "synthetic-d32"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="module", params=["server", "embedded"])
def backend(request, tmp_path_factory):
    """Where the registry lives: a tracking server, or nothing configured (sqlite in the cwd)."""
    work = tmp_path_factory.mktemp(f"registry-{request.param}")
    if request.param == "server":
        server = request.getfixturevalue("mlflow_server")
        return {"kind": "server", "uri": server["uri"], "cwd": work, "artifacts": server["artifacts"]}
    return {"kind": "embedded", "uri": None, "cwd": work, "artifacts": work / "mlruns"}


@pytest.fixture
def registry(backend, monkeypatch):
    monkeypatch.chdir(backend["cwd"])
    monkeypatch.setenv("SAE_REGISTRY_CACHE", str(backend["cwd"] / "cache"))
    if backend["uri"]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", backend["uri"])
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return backend


def _train(store, family=FAMILY, k=4, dict_size=64, alias=None, callback=None, out=None, cwd=None):
    cfg = TrainConfig(tokens=12 * 1024, batch_size=1024, eval_every=4, lr=3e-3, seed=k + dict_size)
    return train_and_register(store, SAEConfig(32, dict_size, k), cfg, out or f"runs/{family}-{dict_size}-{k}",
                              family=family, alias=alias, callback=callback, progress=False)


@pytest.fixture(scope="module")
def first(backend, synthetic_store, tmp_path_factory):
    """One dictionary trained and registered as FAMILY@champion in this backend."""
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(backend["cwd"])
        if backend["uri"]:
            mp.setenv("MLFLOW_TRACKING_URI", backend["uri"])
        else:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        store, _ = synthetic_store
        return _train(store, alias="champion")
    finally:
        mp.undo()


def test_a_run_records_params_metrics_tags_and_artifacts(registry, first, synthetic_store):
    import mlflow

    store, _ = synthetic_store
    client = mlflow.MlflowClient()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == FAMILY
    params = run.data.params
    for key in ("input_size", "dict_size", "top_k", "sparsity", "lr", "batch_size", "tokens", "seed", "l1_coeff",
                "aux_coeff", "dead_after_tokens", "normalize_inputs", "unit_norm_decoder", "b_dec_init"):
        assert key in params, key
    assert params["dict_size"] == "64" and params["top_k"] == "4" and params["lr"] == "0.003"
    history = client.get_metric_history(first.run_id, "eval/fvu")
    assert [m.step for m in history] == [4, 8, 12]
    assert history[-1].value == pytest.approx(first.result.metrics["fvu"], rel=1e-6)
    for key in ("train/loss", "train/mse", "eval/l0", "eval/dead_fraction", "final/fvu", "final/l0",
                "final/dead_fraction", "final/explained_variance"):
        assert key in run.data.metrics, key
    tags = run.data.tags
    assert tags["store.fingerprint"] == store.fingerprint
    assert tags["store.path"] == str(store.path)
    assert tags["source.model"] == "synthetic"
    assert tags["sae_registry.version"] == sae_registry.__version__
    artifacts = {a.path for a in client.list_artifacts(first.run_id)} | {
        a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert {"metrics.json", "plots/training_curves.png", "plots/feature_density.png",
            "plots/l0_distribution.png"} <= artifacts

    version = client.get_model_version(FAMILY, first.version)
    vt = version.tags
    assert (vt["dict_size"], vt["k"], vt["sparsity"], vt["l1_coeff"]) == ("64", "4", "top_k", "0.0")
    assert float(vt["fvu"]) == pytest.approx(first.result.metrics["fvu"])
    assert vt["store.fingerprint"] == store.fingerprint
    assert len(vt["sha256.sae.safetensors"]) == 64 and len(vt["sha256.config.json"]) == 64
    assert version.run_id == first.run_id


def test_a_new_process_loads_by_alias_and_version_with_identical_codes(registry, first, synthetic_store, tmp_path):
    store, _ = synthetic_store
    x = store.read_split("eval")[:200]
    np.save(tmp_path / "x.npy", x.numpy())
    expected = first.result.sae.encode(x).detach().numpy()
    for name in (f"{FAMILY}@champion", f"{FAMILY}/{first.version}", f"models:/{FAMILY}/{first.version}"):
        script = (
            "import sys, numpy as np, sae_registry\n"
            "d = sae_registry.load(sys.argv[1])\n"
            "np.save(sys.argv[3], d.encode(np.load(sys.argv[2])).numpy())\n"
            "print(d.family, d.version, d.config.dict_size, d.metrics['fvu'], d.lineage['store.fingerprint'])\n"
        )
        out = subprocess.run([sys.executable, "-c", script, name, str(tmp_path / "x.npy"), str(tmp_path / "h.npy")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[:3] == [FAMILY, first.version, "64"]
        assert out.stdout.split()[4] == store.fingerprint
        assert np.array_equal(np.load(tmp_path / "h.npy"), expected)


def test_load_gives_a_dictionary(registry, first, synthetic_store):
    store, _ = synthetic_store
    d = sae_registry.load(f"{FAMILY}@champion")
    x = store.read_split("eval")[:50]
    assert d.version == first.version and "champion" in d.aliases
    values, indices = d.encode_topk(x.numpy())
    assert values.shape == indices.shape == (50, 4)
    torch.testing.assert_close(d.decode(d.encode(x)), d.reconstruct(x))
    assert d.metrics["fvu"] == pytest.approx(first.result.metrics["fvu"])
    assert d.device == torch.device("cpu")
    assert d.lineage["run_id"] == first.run_id


def test_find_filters_and_orders_best_first(registry, first, synthetic_store):
    store, _ = synthetic_store
    wide = _train(store, k=8, dict_size=128)
    found = sae_registry.find(FAMILY)
    fvus = [v.metrics["fvu"] for v in found]
    assert fvus == sorted(fvus) and len(found) >= 2
    assert [v.version for v in sae_registry.find(FAMILY, dict_size=128, k=8)] == [wide.version]
    assert first.version in [v.version for v in sae_registry.find(FAMILY, k=4)]
    assert all(v.tags["k"] == "4" for v in sae_registry.find(FAMILY, k=4))
    assert sae_registry.find(FAMILY, dict_size=999) == []


def test_aliases_move_and_are_removed(registry, first, synthetic_store):
    store, _ = synthetic_store
    other = _train(store, family="alias-family", k=2)
    newer = _train(store, family="alias-family", k=3)
    set_alias("alias-family", "champion", other.version)
    assert sae_registry.load("alias-family@champion").version == other.version
    set_alias("alias-family", "champion", newer.version)
    assert resolve("alias-family@champion").version == newer.version
    assert resolve("alias-family").version == newer.version  # bare family: newest
    remove_alias("alias-family", "champion")
    with pytest.raises(SAERegistryError, match="no alias 'champion'"):
        sae_registry.load("alias-family@champion")
    with pytest.raises(SAERegistryError, match="versions: 1, 2"):
        set_alias("alias-family", "champion", 7)


def test_a_failed_run_is_marked_and_never_registered(registry, first, synthetic_store):
    import mlflow

    store, _ = synthetic_store
    before = len(versions(FAMILY))

    def crash(step, _metrics, _checkpoint):
        if step == 8:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        _train(store, k=5, callback=crash)
    assert len(versions(FAMILY)) == before
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(FAMILY)
    failed = client.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
    assert any(r.data.params.get("top_k") == "5" for r in failed)


def test_unknown_names_say_what_exists(registry, first):
    with pytest.raises(SAERegistryError, match=rf"no dictionary family 'nope'.*families: .*{FAMILY}"):
        sae_registry.load("nope@champion")
    with pytest.raises(SAERegistryError, match=r"has no version 99; versions: 1"):
        sae_registry.load(f"{FAMILY}/99")
    with pytest.raises(SAERegistryError, match=r"has no alias 'gold'; aliases: champion \(v1\)"):
        sae_registry.load(f"{FAMILY}@gold")
    with pytest.raises(SAERegistryError, match="cannot read dictionary name"):
        sae_registry.load("a/b/c")


def test_tampered_weights_are_refused(registry, first):
    import shutil

    d = sae_registry.load(f"{FAMILY}/{first.version}")
    cached = d.path / "sae.safetensors"
    # a damaged cache is healed from the registry
    cached.write_bytes(cached.read_bytes()[:-4] + b"\0\0\0\0")
    assert sae_registry.load(f"{FAMILY}/{first.version}").version == first.version
    # a damaged registry copy is refused
    import mlflow

    mv = mlflow.MlflowClient().get_model_version(FAMILY, first.version)
    model_id = mlflow.MlflowClient().get_run(mv.run_id).data.tags["sae.model_uri"].rsplit("/", 1)[-1]  # its logged model
    stored = [p for p in registry["artifacts"].rglob("sae.safetensors") if model_id in str(p)]
    assert len(stored) == 1, stored
    original = stored[0].read_bytes()
    try:
        data = bytearray(original)
        data[-1] ^= 0xFF
        stored[0].write_bytes(bytes(data))
        shutil.rmtree(d.path)
        with pytest.raises(SAERegistryError, match="do not match the checksums"):
            sae_registry.load(f"{FAMILY}/{first.version}")
    finally:
        stored[0].write_bytes(original)


def test_pyfunc_model_predicts_codes(registry, first, synthetic_store):
    import mlflow

    store, _ = synthetic_store
    x = store.read_split("eval")[:20]
    model = mlflow.pyfunc.load_model(f"models:/{FAMILY}@champion")
    codes = model.predict(x.numpy())
    assert np.array_equal(codes, first.result.sae.encode(x).detach().numpy())


def test_mlflow_models_serve_answers_encode_requests(registry, first, synthetic_store, tmp_path):
    if registry["kind"] != "server":
        pytest.skip("served once, from the tracking server")
    store, _ = synthetic_store
    port = free_port()
    proc = start([MLFLOW, "models", "serve", "-m", f"models:/{FAMILY}@champion", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], tmp_path / "serve.log",
                 env={"MLFLOW_TRACKING_URI": registry["uri"]})
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log")
        x = store.read_split("eval")[:16]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            predictions = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
        assert np.array_equal(predictions, first.result.sae.encode(x).detach().numpy())
    finally:
        stop(proc)


def test_cli_list_show_promote_and_encode(registry, first, synthetic_store, tmp_path):
    from sae_registry.analysis.encode import dense_codes

    store, _ = synthetic_store
    runner = CliRunner()
    r = runner.invoke(main, ["list", FAMILY])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["version", "aliases", "architecture", "dict_size", "k", "l1_coeff",
                                                "FVU", "L0", "dead", "created"]
    row = next(line.split() for line in r.output.splitlines()[1:] if "champion" in line)
    assert row[:5] == [first.version, "champion", "top_k", "64", "4"]
    assert float(row[6]) == pytest.approx(first.result.metrics["fvu"], abs=1e-4)
    r = runner.invoke(main, ["list"])
    assert FAMILY in r.output and "champion=v1" in r.output
    r = runner.invoke(main, ["show", f"{FAMILY}@champion"])
    assert r.exit_code == 0 and "store.fingerprint" in r.output and first.run_id in r.output
    r = runner.invoke(main, ["promote", FAMILY, first.version, "--alias", "staging"])
    assert r.exit_code == 0 and resolve(f"{FAMILY}@staging").version == first.version
    r = runner.invoke(main, ["promote", FAMILY, "--alias", "staging", "--remove"])
    assert r.exit_code == 0 and "staging" not in resolve(FAMILY + "/1").aliases
    r = runner.invoke(main, ["encode", f"{FAMILY}@champion", "--store", str(store.path), "--out",
                             str(tmp_path / "codes.zarr"), "--split", "eval", "--batch-size", "1000"])
    assert r.exit_code == 0, r.output
    x = store.read_split("eval")
    torch.testing.assert_close(dense_codes(tmp_path / "codes.zarr"), first.result.sae.encode(x).detach())
    r = runner.invoke(main, ["show", "nope/1"])
    assert r.exit_code == 1 and "no dictionary family 'nope'" in r.output


def test_train_command_records_and_registers(registry, synthetic_store):
    store, _ = synthetic_store
    r = CliRunner().invoke(main, ["train", "--store", str(store.path), "--out", "runs/cli", "--dict-size", "64",
                                  "--k", "6", "--tokens", "8192", "--batch-size", "1024", "--name", "cli-family",
                                  "--alias", "champion"])
    assert r.exit_code == 0, r.output
    assert "registered cli-family/1" in r.output
    assert sae_registry.load("cli-family@champion").config.top_k == 6


def test_ui_serves_the_embedded_registry(registry, first, tmp_path):
    if registry["kind"] != "embedded":
        pytest.skip("the UI command is for the embedded default")
    port = free_port()
    proc = start([str(Path(sys.executable).with_name("sae-registry")), "ui", "--port", str(port)],
                 tmp_path / "ui.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, tmp_path / "ui.log")
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow"
        with urllib.request.urlopen(f"{api}/registered-models/search?filter=name%3D%27{FAMILY}%27", timeout=10) as r:
            assert FAMILY in r.read().decode()
        # the UI's artifact viewer can list and fetch the run's plots
        with urllib.request.urlopen(f"{api}/artifacts/list?run_id={first.run_id}&path=plots", timeout=10) as r:
            assert "plots/training_curves.png" in r.read().decode()
        png = f"http://127.0.0.1:{port}/get-artifact?path=plots/feature_density.png&run_uuid={first.run_id}"
        with urllib.request.urlopen(png, timeout=10) as r:
            assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"http://127.0.0.1:{port}" in (tmp_path / "ui.log").read_text()
    finally:
        stop(proc)


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_weight_files_respect_the_umask(registry, first):
    """Teammates sharing a registry read the weights as they read config.json (not owner-only 0600)."""
    expected = 0o666 & ~_umask()
    out = first.result.out_dir
    weights = [out / "sae.safetensors", *registry["artifacts"].rglob("sae.safetensors")]
    assert len(weights) >= 2
    for path in weights:
        assert path.stat().st_mode & 0o777 == expected, path
        assert path.stat().st_mode & 0o777 == (path.parent / "config.json").stat().st_mode & 0o777, path


def test_train_refuses_to_replace_a_dictionary_unless_asked(synthetic_store, tmp_path):
    store, _ = synthetic_store
    args = ["train", "--store", str(store.path), "--out", str(tmp_path / "d"), "--dict-size", "32", "--k", "4",
            "--tokens", "4096", "--batch-size", "1024", "--no-registry"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    (tmp_path / "d" / "notes.txt").write_text("mine")
    first_weights = (tmp_path / "d" / "sae.safetensors").read_bytes()
    r = CliRunner().invoke(main, args + ["--k", "2"])
    assert r.exit_code == 1 and "already holds a dictionary" in r.output and "--overwrite" in r.output, r.output
    assert (tmp_path / "d" / "sae.safetensors").read_bytes() == first_weights
    r = CliRunner().invoke(main, args + ["--k", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert SparseAutoencoder.load(tmp_path / "d").cfg.top_k == 2
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"  # only what a training wrote is replaced
    r = CliRunner().invoke(main, args + ["--k", "2", "--resume"])  # the finished checkpoint: continued, as before
    assert r.exit_code == 0, r.output
    with pytest.raises(SAERegistryError, match="already holds a dictionary"):
        train_and_register(store, SAEConfig(32, 32, 4), TrainConfig(tokens=4096, batch_size=1024), tmp_path / "d",
                           family="refused", progress=False)


def test_the_served_model_is_typed_without_mlflow_warnings():
    """Defining the pyfunc (as `train`, `import` and serving do) draws no 'Add type hints' advice from MLflow."""
    import runpy
    import warnings

    from sae_registry.registry.runs import SERVING_CODE

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(SERVING_CODE))
    assert [str(w.message) for w in caught if "type hint" in str(w.message).lower()] == []


def test_pyfunc_predict_checks_its_input(registry, first, synthetic_store):
    import mlflow
    from mlflow.exceptions import MlflowException

    store, _ = synthetic_store
    x = store.read_split("eval")[:4].numpy()
    model = mlflow.pyfunc.load_model(f"models:/{FAMILY}@champion")
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(MlflowException, match="NaN or Inf"):
        model.predict(bad)
    with pytest.raises(MlflowException, match=r"shape"):
        model.predict(x[:, :16])
    python_model = model.unwrap_python_model()  # what the signature's own checks let through, ours refuse
    with pytest.raises(MlflowException, match=r"input must have shape \[n, 32\].*got \[32\]"):
        python_model.predict(None, x[0])
    assert python_model.predict(None, x.tolist()).shape == (4, 64)  # a list of rows is an array too
