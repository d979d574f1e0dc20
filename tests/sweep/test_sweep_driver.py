"""The sweep's driver: a cluster that refuses our token, a driver that fails after its trials, and what
a sweep records about where it ran. Real local Ray; a real head with token authentication."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from procs import BIN, free_port

from sae_registry import SAERegistryError
from sae_registry.cli.commands import main
from sae_registry.config.sweep import SweepSpec
from sae_registry.registry.tracking import Tracking
from sae_registry.sweep.driver import run

pytestmark = pytest.mark.slow
TOKEN = "trust-test-token-0123456789abcdef0123456789"


def _spec(store, storage: Path, name: str) -> SweepSpec:
    return SweepSpec.from_dict({
        "name": name, "store": str(store.path), "storage": str(storage), "pack": 2,
        "grid": [{"sparsity": ["top_k"], "dict_size": [64], "k": [4, 8]}],
        # a checkpoint at every step: what made Tune warn about snapshotting at every step
        "train": {"tokens": 24 * 1024, "batch_size": 1024, "eval_every": 1, "checkpoint_every": 1},
        "resources": {"cpu": 1}, "max_concurrent_trials": 1,
    })


def test_a_driver_failing_after_its_trials_marks_the_sweep_failed_and_resume_registers_them(
        synthetic_store, tmp_path, monkeypatch, capfd):
    from ray import tune

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    store, _ = synthetic_store
    tracking = Tracking.resolve(f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = _spec(store, tmp_path / "ray_results", "driver-fails")
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    fit = tune.Tuner.fit

    def fit_then_lose_the_working_directory(self):
        results = fit(self)
        # What a `ray job submit --working-dir` driver met: its directory re-extracted under it.
        shutil.rmtree(driver_dir)
        os.getcwd()  # FileNotFoundError, as in Tune's result analysis
        return results

    monkeypatch.setattr(tune.Tuner, "fit", fit_then_lose_the_working_directory)
    with pytest.raises(SAERegistryError, match=r"failed in this process .*FileNotFoundError.*--resume") as e:
        run(spec, tracking_uri=tracking, verbose=1)
    assert "Traceback" not in str(e.value)
    client = tracking.client
    experiment = client.get_experiment_by_name("driver-fails")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    assert [p.info.status for p in parent] == ["FAILED"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert client.search_model_versions("name = 'driver-fails'") == []
    # Every attempt's node is kept (one attempt here); ray.node_id is the last one's.
    for r in children:
        assert r.data.tags["ray.node_ids"].split(",") == [r.data.tags["ray.node_id"]]
    # checkpoint_every: 1 does not make Tune warn about snapshotting at each step.
    out, err = capfd.readouterr()
    assert "snapshotting has been triggered" not in out + err

    monkeypatch.setattr(tune.Tuner, "fit", fit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run(spec, resume=True, tracking_uri=tracking, verbose=0)
    assert result.parent_run_id == parent[0].info.run_id and len(result.dictionaries) == 2
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    versions = client.search_model_versions("name = 'driver-fails'")
    assert len(versions) == len([r for r in result.dictionaries if r["version"]]) >= 1
    # `show` displays where it trained.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    shown = CliRunner().invoke(main, ["show", f"driver-fails/{versions[0].version}"], catch_exceptions=False).output
    assert "ray.node_ids" in shown and "ray.node_id " in shown


def _stop_processes_naming(marker: str) -> None:
    """Stop the processes whose command line names ``marker`` (our head's temp dir) and their children."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    family = {c for p in ours for c in [p, *p.children(recursive=True)]}
    for p in family:
        p.terminate()
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture
def token_head(tmp_path):
    """A one-node Ray head requiring a token, with a Ray Client server; ``(gcs_port, client_port)``."""
    ray_tmp = Path(f"/tmp/ray-trust-{os.getpid()}")
    port, client_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        f"--ray-client-server-port={client_port}", f"--temp-dir={ray_tmp}", "--num-cpus=1",
                        f"--memory={1 << 30}", f"--object-store-memory={100 << 20}", "--include-dashboard=false"],
                       check=True, capture_output=True, timeout=180, env=env)
        yield port, client_port
    finally:
        _stop_processes_naming(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


_CONNECT = """
import sys
from sae_registry import SAERegistryError
from sae_registry._util.cluster import connect
try:
    connect(sys.argv[1])
except SAERegistryError as e:
    print("REFUSED:", e)
"""


def test_a_cluster_refusing_our_token_is_told_apart_from_an_unreachable_one(token_head, tmp_path):
    port, client_port = token_head
    # The laptop snippet's mistake: a token exported, RAY_AUTH_MODE=token not.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    procs = {address: subprocess.Popen([sys.executable, "-c", _CONNECT, address], env=env, cwd=tmp_path,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}")}
    said = {address: p.communicate(timeout=300)[0] for address, p in procs.items()}
    direct = said[f"127.0.0.1:{port}"]
    assert "REFUSED: the Ray cluster at" in direct and "refused authentication" in direct, direct
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in direct and "RAY_AUTH_MODE is unset" in direct
    assert "cannot reach" not in direct
    client = said[f"ray://127.0.0.1:{client_port}"]
    assert "REFUSED: the Ray Client server at" in client and "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in client, client
    # Nothing listening is still said differently.
    nothing = subprocess.run([sys.executable, "-c", _CONNECT, f"127.0.0.1:{free_port()}"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120).stdout
    assert "REFUSED: no Ray cluster answers at" in nothing and "authentication" not in nothing


def test_a_ray_client_driver_gets_tunes_progress_table(monkeypatch):
    import ray
    from ray.tune.progress_reporter import RemoteReporterMixin, _prepare_progress_reporter_for_ray_client

    from sae_registry._util.cluster import client_progress

    assert client_progress(1) is None  # not on Ray Client: Tune's own output
    monkeypatch.setattr(ray.util.client.ray, "is_connected", lambda: True)
    assert client_progress(0) is None
    reporter = client_progress(1)
    # Tune hands a queue only to reporters of this kind; the others print on the cluster, unseen.
    assert isinstance(reporter, RemoteReporterMixin)
    shown = []
    reporter.display = shown.append
    reporter._progress_str = lambda trials, done, *info: f"{len(trials)} trials"

    class Queue(list):
        put = list.append

    reporter.output_queue = Queue()
    reporter.report([object(), object()], False)
    assert reporter.output_queue == ["2 trials"] and shown == []
    prepared, queue = _prepare_progress_reporter_for_ray_client(reporter, 1, string_queue=Queue())
    assert prepared is reporter and queue is reporter.output_queue
