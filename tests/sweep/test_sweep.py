"""Sweeps on a real local Ray (and a two-node loopback cluster) against a real MLflow server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from procs import BIN, free_port, start_mlflow_server, start_moto

import sae_registry
from sae_registry import SAERegistryError
from sae_registry.cli.commands import main
from sae_registry.config.sweep import SweepSpec
from sae_registry.sweep.driver import pareto_frontier, run, summary_table

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-sweeps")) as server:
        yield server


@pytest.fixture
def env(mlflow_server, tmp_path, monkeypatch):
    """A fresh working directory, the tracking server, Ray settings shared by every process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    monkeypatch.setenv("SAE_REGISTRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _children(family: str, sweep_id: str) -> list:
    client = _client()
    experiment = client.get_experiment_by_name(family)
    runs = client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{sweep_id}'", max_results=1000)
    return [r for r in runs if r.data.tags.get("sweep.role") != "parent"]


def _spec(store, name: str, **overrides) -> dict:
    spec = {
        "name": name,
        "store": str(store.path),
        "grid": [{"sparsity": ["top_k"], "dict_size": [256], "k": [8, 16]}],
        "train": {"tokens": 24 * 1024, "batch_size": 1024, "eval_every": 4, "checkpoint_every": 4},
        "resources": {"cpu": 1},
        "max_concurrent_trials": 2,
    }
    spec.update(overrides)
    return spec


def test_the_demo_spec_runs_registers_the_frontier_and_the_champion_loads(env, minilm_store):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    assert len(SweepSpec.from_dict(spec).configurations()) == 8  # 2 sparsities x 2 dict sizes x 2 (k or l1)
    spec.update(store=str(minilm_store.path), harvest=None, evaluate_tokens=512)  # the spec's own, smaller
    spec["train"].update(tokens=8 * 2048, eval_every=4, checkpoint_every=4)
    spec = SweepSpec.from_dict(spec)
    result = run(spec, verbose=0)

    assert result.failed_trials == 0 and len(result.dictionaries) == 8
    children = _children("demo", result.sweep_id)
    assert len(children) == 8
    client = _client()
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert child.data.tags["store.fingerprint"] == minilm_store.fingerprint
        assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/fvu")] == [4, 8]
        assert {"metrics.json", "plots"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert 0.0 < child.data.metrics["downstream/fidelity"] < 1.0  # the demo spec asks for it
    on_frontier = [r for r in result.dictionaries if r["frontier"]]
    assert on_frontier
    for r in result.dictionaries:  # everything off the frontier is beaten on both counts by a frontier point
        assert r["frontier"] or any(o["dict_size"] == r["dict_size"] and o["fvu"] <= r["fvu"] and o["l0"] <= r["l0"]
                                    for o in on_frontier)
    versions = sae_registry.find("demo")  # the demo registers all, marking the frontier
    assert sorted(v.run_id for v in versions) == sorted(r["run_id"] for r in result.dictionaries)
    assert sorted(v.run_id for v in versions if v.tags["sweep.frontier"] == "true") == sorted(
        r["run_id"] for r in on_frontier)
    champion = sae_registry.load("demo@champion")
    assert champion.version == result.champion
    eligible = [r for r in on_frontier if r["l0"] <= 64]
    assert champion.metrics["fvu"] == pytest.approx(min(r["fvu"] for r in eligible))
    codes = champion.encode(minilm_store.read_split("eval", max_tokens=10))
    assert codes.shape == (10, champion.config.dict_size)
    parent = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sweep_summary.json", "sweep_spec.json", "plots"} <= parent
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    listing = CliRunner().invoke(main, ["list", "demo"])
    assert listing.exit_code == 0 and len(listing.output.strip().splitlines()) == 1 + 8  # the whole grid
    # where the wall time went: the driver's phases add up to it; the trials' sums are theirs
    phases = {k: v for k, v in result.seconds.items() if not k.startswith("trials/")}
    assert {"ray_start", "fit", "registration", "ray_shutdown"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(result.wall_seconds, abs=0.5)
    assert result.seconds["trials/train_loop"] > 0


def test_a_grid_over_lr_gives_each_member_its_own_run_and_name(env, synthetic_store):
    """lr is in no rule's name: the members are told apart by it, in their runs' names and tags."""
    store, _ = synthetic_store
    spec = SweepSpec.from_dict(_spec(store, "lrgrid", pack=1, register="all",
                                     grid=[{"sparsity": ["top_k"], "dict_size": [256], "k": [8], "lr": [1e-3, 3e-3]}]))
    result = run(spec, verbose=0)
    assert result.failed_trials == 0 and len(result.dictionaries) == 2
    children = _children("lrgrid", result.sweep_id)
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"topk-d256-k8-lr0.001", "topk-d256-k8-lr0.003"}
    assert {c.data.tags["sweep.member"] for c in children} == {"topk-d256-k8-lr0.001-s0", "topk-d256-k8-lr0.003-s0"}
    assert {name: float(c.data.params["lr"]) for name, c in by_name.items()} == {
        "topk-d256-k8-lr0.001": 1e-3, "topk-d256-k8-lr0.003": 3e-3}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(r["name"] for r in result.dictionaries) == sorted(by_name)


def test_downstream_fidelity_is_logged_tagged_and_chooses_the_champion(env, minilm_store):
    spec = SweepSpec.from_dict(_spec(minilm_store, "downstream", pack=2, register="all", evaluate="downstream",
                                     evaluate_tokens=512, champion_by="downstream"))
    result = run(spec, verbose=0)
    assert result.failed_trials == 0 and len(result.dictionaries) == 2
    client = _client()
    for row in result.dictionaries:
        m = client.get_run(row["run_id"]).data.metrics
        assert 0.0 < m["downstream/fidelity"] == row["fidelity"] < 1.0
        assert m["downstream/cosine_zero"] < m["downstream/cosine_spliced"] < 1.0 and m["downstream/tokens"] >= 512
        version = sae_registry.registry.versions.resolve(f"downstream/{row['version']}")
        assert float(version.tags["downstream.fidelity"]) == pytest.approx(row["fidelity"])
    best = max(result.dictionaries, key=lambda r: r["fidelity"])
    assert result.champion == best["version"] == sae_registry.load("downstream@champion").version
    assert "fidelity" in summary_table(result, "champion")
    r = CliRunner().invoke(main, ["evaluate", "downstream@champion", "--tokens", "512"])
    assert r.exit_code == 0, r.output
    assert f"fidelity {best['fidelity']:.4f}" in r.output


def test_cli_sweep_and_no_duplicates_when_run_twice(env, synthetic_store, tmp_path):
    store, _ = synthetic_store
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(store, "cli-sweep", register="all", pack=2)))
    r = CliRunner().invoke(main, ["sweep", str(spec_path)])
    assert r.exit_code == 0, r.output
    assert "2 dictionaries in 1 trial(s)" in r.output and "(champion)" in r.output
    # the live table: one row per dictionary of the pack, each with its own numbers
    live = [line.split() for line in r.output.splitlines() if line.startswith(("topk-d256-k8-s", "topk-d256-k16-s"))]
    assert {row[0] for row in live} == {"topk-d256-k8-s0", "topk-d256-k16-s0"}, r.output
    again = CliRunner().invoke(main, ["sweep", str(spec_path)])
    assert again.exit_code == 1 and "already ran" in again.output and "--resume" in again.output
    resumed = CliRunner().invoke(main, ["sweep", str(spec_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "nothing to do: sweep cli-sweep" in resumed.output and "(champion)" in resumed.output
    assert sum("topk-d256-k" in line for line in resumed.output.splitlines()) == 2  # the table, no trial ran
    assert len(sae_registry.find("cli-sweep")) == 2


def _ray_node(tmp: Path, port: int | None, head_port: int) -> None:
    cmd = [str(BIN / "ray"), "start", "--num-cpus=1", "--num-gpus=0", f"--memory={1 << 30}",
           f"--object-store-memory={200 << 20}", "--disable-usage-stats"]
    if port is None:
        cmd += [f"--address=127.0.0.1:{head_port}"]
    else:
        cmd += ["--head", f"--port={head_port}", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
                "--include-dashboard=false"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _stop_ray_started_under(tmp: Path) -> None:
    """Stop the Ray processes of our test cluster, TERM then KILL: those that name its temp dir (the
    GCS, raylets, agents) and their descendants (the workers, whose titles name no path). Another Ray
    on this machine is left alone."""
    import psutil

    ours = {}  # found once, before any is stopped: a worker whose raylet is gone names no parent of ours
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(tmp) in " ".join(p.info["cmdline"] or []):
                ours.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for p in ours.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(list(ours.values()), timeout=15)
    for p in alive:
        p.kill()


def test_a_two_node_cluster_runs_trials_on_both_nodes(env, synthetic_store, tmp_path):
    store, _ = synthetic_store
    ray_tmp = Path(f"/tmp/ray-sae-{os.getpid()}")
    head_port = free_port()
    try:
        _ray_node(ray_tmp, head_port, head_port)
        _ray_node(ray_tmp, None, head_port)
        spec = SweepSpec.from_dict(_spec(store, "two-nodes", grid=[{"dict_size": [128, 256], "k": [4, 8]}],
                                         register="none"))
        result = run(spec, address=f"127.0.0.1:{head_port}", verbose=0)
    finally:
        _stop_ray_started_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.failed_trials == 0 and len(result.dictionaries) == 4
    nodes = Counter(r.data.tags["ray.node_id"] for r in _children("two-nodes", result.sweep_id))
    assert len(nodes) == 2, nodes


def _sweep_process(spec_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "sae-registry"), "sweep", str(spec_path), *extra], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_step(family: str, step: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    """Wait until some run of ``family`` has logged ``eval/fvu`` at ``step``; its run id."""
    client = _client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        experiment = client.get_experiment_by_name(family)
        if experiment is not None:
            for r in client.search_runs([experiment.experiment_id]):
                if any(m.step >= step for m in client.get_metric_history(r.info.run_id, "eval/fvu")):
                    return r.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no run reached step {step}:\n{log.read_text()[-3000:]}")


def test_a_killed_trial_resumes_from_its_checkpoint(env, minilm_store, tmp_path):
    import psutil

    spec = _spec(minilm_store, "killed", grid=[{"dict_size": [2048], "k": [32]}],
                 train={"tokens": 60 * 2048, "batch_size": 2048, "eval_every": 5, "checkpoint_every": 5})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    proc = _sweep_process(tmp_path / "s.yaml", tmp_path / "sweep.log")
    try:
        run_id = _wait_for_step("killed", 15, proc, tmp_path / "sweep.log")
        # this sweep's trial worker only (Ray's workers descend from the driver), not another on the machine
        trials = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ImplicitFunc" in " ".join(p.cmdline())]
        assert len(trials) == 1
        trials[0].kill()  # the trial's worker process dies mid-way, as on a lost machine
        assert proc.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    client = _client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = Counter(m.step for m in client.get_metric_history(run_id, "eval/fvu"))
    # resumed from a checkpoint, not from step 0: the first evaluation is logged once. Steps after the last
    # Tune checkpoint (at most one per TUNE_CHECKPOINT_SECONDS) are trained and logged again by the retry.
    assert steps[5] == 1 and max(steps.values()) <= 2
    assert max(steps) == 60 and set(steps) == set(range(5, 61, 5))
    assert len(_children("killed", run.data.tags["sweep.id"])) == 1
    assert [v.run_id for v in sae_registry.find("killed")] == [run_id]
    assert len(run.data.tags["ray.node_ids"].split(",")) == 2  # two attempts of the trial, in the same run


def test_an_interrupted_sweep_resumes_without_duplicates(env, minilm_store, tmp_path):
    spec = _spec(minilm_store, "interrupted", grid=[{"dict_size": [1024], "k": [16, 32]}], max_concurrent_trials=1,
                 register="all", train={"tokens": 40 * 2048, "batch_size": 2048, "eval_every": 5,
                                        "checkpoint_every": 5})
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = _sweep_process(spec_path, tmp_path / "first.log")
    try:
        _wait_for_step("interrupted", 10, proc, tmp_path / "first.log")
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "--resume" in (tmp_path / "first.log").read_text()
    assert sae_registry.find("interrupted") == [] if _has_family("interrupted") else True

    resumed = CliRunner().invoke(main, ["sweep", str(spec_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    experiment = _client().get_experiment_by_name("interrupted")
    (parent,) = _client().search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    state = {"sweep_id": parent.data.tags["sweep.id"]}
    children = _children("interrupted", state["sweep_id"])
    assert sorted(c.data.tags["sweep.member"] for c in children) == ["topk-d1024-k16-s0", "topk-d1024-k32-s0"]
    assert all(c.info.status == "FINISHED" for c in children)
    versions = sae_registry.find("interrupted")
    assert sorted(v.run_id for v in versions) == sorted(c.info.run_id for c in children)
    # resuming a finished sweep again changes nothing
    assert CliRunner().invoke(main, ["sweep", str(spec_path), "--resume"]).exit_code == 0
    assert len(sae_registry.find("interrupted")) == 2 and len(_children("interrupted", state["sweep_id"])) == 2


def _has_family(name: str) -> bool:
    return any(m.name == name for m in _client().search_registered_models())


def test_a_store_on_s3_and_artifacts_on_s3(synthetic_store, tmp_path, monkeypatch):
    import s3fs

    store, _ = synthetic_store
    with start_moto(tmp_path) as aws:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": aws["AWS_ENDPOINT_URL"]})
        fs.mkdir("stores")
        fs.mkdir("mlflow-artifacts")
        fs.put(str(store.path), "stores/synthetic.zarr", recursive=True)
        remote = sae_registry.ActivationStore.open("s3://stores/synthetic.zarr")
        assert remote.fingerprint == store.fingerprint and len(remote) == len(store)
        torch.testing.assert_close(torch.cat(list(remote.batches(4096, shuffle=False))),
                                   store.read_split("train"))
        with pytest.raises(SAERegistryError, match="no readable activation store"):
            sae_registry.ActivationStore.open("s3://stores/missing.zarr")

        with start_mlflow_server(tmp_path, artifacts="s3://mlflow-artifacts/", env=aws) as server:
            monkeypatch.chdir(tmp_path)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
            monkeypatch.setenv("SAE_REGISTRY_CACHE", str(tmp_path / "cache"))
            monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
            spec = SweepSpec.from_dict(_spec(remote, "on-s3", grid=[{"dict_size": [128], "k": [4]}]))
            assert spec.store == "s3://stores/synthetic.zarr"
            result = run(spec, verbose=0)
            assert result.failed_trials == 0
            stored = fs.find("mlflow-artifacts")
            assert any(p.endswith("sae.safetensors") for p in stored)
            assert any(p.endswith("plots/frontier.png") for p in stored)
            d = sae_registry.load("on-s3@champion")
            assert d.lineage["store.path"] == "s3://stores/synthetic.zarr"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": []}, "grid: is empty"),
        ({"grid": {"dict_sise": [64]}}, "unknown key 'dict_sise'"),
        ({"grid": {"k": 8}}, "grid.k: must be a non-empty list"),
        ({"grid": {"k": [0]}}, "top_k must be a positive integer"),
        ({"grid": {"dict_size": [8], "k": [16]}}, r"top_k \(16\) cannot exceed dict_size \(8\)"),
        ({"train": {"tokenz": 5}}, "train: unknown options"),
        ({"train": {"l1_coeff": -1}}, "l1_coeff must be >= 0, got -1"),
        ({"registr": "all"}, r"unknown spec fields \['registr'\]"),
        ({"register": "best"}, "register must be one of all, pareto, none, got .best."),
        ({"resources": {"gpus": 1}}, "resources: unknown keys"),
        ({"resources": {"cpu": 0}}, "a trial needs some cpu or gpu"),
        ({"pack": 0}, "pack must be a positive integer"),
        ({"name": "bad/name"}, "family name"),
        ({"seeds": []}, "seeds: must be a non-empty list"),
        ({"evaluate": "yes"}, "evaluate must be one of none, downstream"),
        ({"evaluate": "downstream", "evaluate_tokens": 0}, "evaluate_tokens must be a positive integer"),
        ({"champion_by": "l0"}, "champion_by must be one of fvu, downstream"),
        ({"champion_by": "downstream"}, "champion_by: downstream needs evaluate: downstream"),
        ({"harvest": {"layr": 3}}, "harvest.layr: unknown harvest option; the options are text, model_path, layer"),
        ({"harvest": {"layer": -1}}, "harvest.layer must be >= 0, got -1"),
        ({"harvest": {"dtype": "fp8"}}, "harvest.dtype must be one of float32, float16, bfloat16"),
        ({"harvest": {"max_tokens": "many"}}, "harvest.max_tokens must be a positive integer, got 'many'"),
        ({"harvest": [3]}, "harvest: must be a mapping"),
        ({"resources": {"cpu": "two"}}, "resources.cpu must be a finite number, got 'two'"),
        ({"resources": {"gpu": -0.5}}, "resources.gpu must be >= 0, got -0.5"),
        ({"seeds": [0, "1"]}, "seeds must be an integer, got '1'"),
        ({"max_failures": -1}, "max_failures must be >= 0, got -1"),
        ({"champion_max_l0": 0}, "champion_max_l0 must be > 0, got 0"),
    ],
)
def test_bad_specs_name_the_field(change, message):
    spec = {"name": "ok", "store": "x.zarr", "grid": {"dict_size": [64], "k": [4]}}
    spec.update(change)
    with pytest.raises(SAERegistryError, match=message):
        SweepSpec.from_dict(spec)


def test_a_missing_store_is_harvested_when_the_spec_says_how(tmp_path, monkeypatch):
    from sae_registry.sweep.driver import _ensure_store

    monkeypatch.chdir(tmp_path)
    spec = SweepSpec.from_dict({"name": "h", "store": "data/s.zarr", "grid": {"k": [4]},
                                "harvest": {"layer": 1, "max_tokens": 2000}})
    path = _ensure_store(spec)
    store = sae_registry.ActivationStore.open(path)
    assert path == str(tmp_path / "data" / "s.zarr") and len(store) == 2000 and store.source["layer"] == 1
    assert _ensure_store(spec) == path  # there now: opened, not harvested again
    with pytest.raises(SAERegistryError, match="no activation store at"):
        _ensure_store(SweepSpec.from_dict({"name": "h", "store": "data/none.zarr", "grid": {"k": [4]}}))


def test_an_unfinished_store_is_refused_or_harvested_again_when_asked(tmp_path):
    """A sweep never overwrites a store it was given; the demo (replace_unreadable) harvests its own again."""
    from sae_registry.config.options import HarvestSpec
    from sae_registry.harvest.local import ensure_store

    path = tmp_path / "half.zarr"
    sae_registry.ActivationStore.create(path, d=8, chunk_tokens=100).append(torch.randn(450, 8))  # never closed
    spec = HarvestSpec(layer=1, max_tokens=1000)
    with pytest.raises(SAERegistryError, match="never finished"):
        ensure_store(path, spec)
    said = []
    store = ensure_store(path, spec, replace_unreadable=True, say=said.append)
    assert len(store) == 1000 and store.d == 384 and store.source["layer"] == 1
    assert "harvesting it again" in said[0] and said[1].startswith("harvesting")
    said.clear()
    assert len(ensure_store(path, spec, replace_unreadable=True, say=said.append)) == 1000
    assert said == [f"using {path} (1,000 tokens)"]  # finished now: opened, not harvested again


def test_the_specs_typed_parts_round_trip():
    from sae_registry.config.options import HarvestSpec
    from sae_registry.config.sweep import Resources

    spec = SweepSpec.from_dict({"name": "t", "store": "s.zarr", "grid": {"k": [4]}, "resources": {"gpu": 0.25},
                                "harvest": {"layer": 1, "max_tokens": 2000}})
    assert spec.resources == Resources(cpu=0, gpu=0.25) and spec.resources.device == "cuda"
    assert spec.harvest == HarvestSpec(layer=1, max_tokens=2000)
    assert SweepSpec.from_dict(spec.to_dict()) == spec  # what a trial rebuilds from its config
    assert SweepSpec.from_dict({"name": "t", "store": "s.zarr", "grid": {"k": [4]}}).resources == Resources(1, 0)


def test_spec_files_and_missing_fields(tmp_path):
    with pytest.raises(SAERegistryError, match="no sweep spec at"):
        SweepSpec.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SAERegistryError, match="not valid YAML"):
        SweepSpec.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(SAERegistryError, match="missing grid, store"):
        SweepSpec.from_dict({"name": "x"})
    for path in (REPO / "jobs").glob("*.yaml"):
        assert SweepSpec.from_yaml(path).configurations()


def test_equivalent_combinations_are_trained_once():
    spec = SweepSpec.from_dict({"name": "x", "store": "s.zarr", "seeds": [0, 1], "pack": 3,
                                "grid": [{"sparsity": ["l1"], "k": [8, 16, 32], "dict_size": [64]},
                                         {"sparsity": ["top_k"], "k": [8, 16], "dict_size": [64]},
                                         {"sparsity": ["top_k"], "k": [8], "dict_size": [64]}]})
    configs = spec.configurations()
    assert len(configs) == 2 * (1 + 2)  # l1 ignores k; the third grid repeats the second
    packs = spec.packs()
    assert [len(p) for p in packs] == [3, 3]  # packs never mix seeds (they share one batch stream)
    assert all(len({t.seed for _, t in p}) == 1 for p in packs)


def test_gpu_trials_on_a_cluster_without_gpus_are_refused(env, synthetic_store):
    store, _ = synthetic_store
    spec = SweepSpec.from_dict(_spec(store, "gpu-less", resources={"cpu": 1, "gpu": 0.25}))
    with pytest.raises(SAERegistryError, match="no node of the Ray cluster can run a trial needing 1 CPU and 0.25 GPU"):
        run(spec, verbose=0)


def test_pareto_frontier_is_per_dict_size():
    rows = [{"dict_size": 64, "fvu": 0.5, "l0": 8}, {"dict_size": 64, "fvu": 0.4, "l0": 16},
            {"dict_size": 64, "fvu": 0.6, "l0": 16}, {"dict_size": 128, "fvu": 0.9, "l0": 32}]
    assert pareto_frontier(rows) == [True, True, False, True]


def test_a_local_sweep_logs_where_it_is_told_not_where_the_environment_points(env, mlflow_server, synthetic_store,
                                                                               tmp_path):
    """A driver's environment may still name another tracking server (mlflow.set_tracking_uri sets
    it, e.g. for an earlier sweep in the same notebook); a local Ray's trials inherit that
    environment, yet must log to the URI this sweep was given."""
    import mlflow

    store, _ = synthetic_store
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    result = run(SweepSpec.from_dict(_spec(store, "told-uri", pack=2, register="none")), tracking_uri=elsewhere,
                 verbose=0)
    assert result.failed_trials == 0
    here = mlflow.MlflowClient(tracking_uri=elsewhere)
    experiment = here.get_experiment_by_name("told-uri")
    children = [r for r in here.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{result.sweep_id}'")
                if r.data.tags.get("sweep.role") != "parent"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert mlflow.MlflowClient(tracking_uri=mlflow_server["uri"]).get_experiment_by_name("told-uri") is None


def test_a_reused_worker_prepares_the_downstream_evaluation_once_per_store(minilm_store, monkeypatch):
    """A worker that Tune reuses for the next trial keeps the model and the clean pass; other options redo them."""
    from sae_registry.metrics import downstream
    from sae_registry.sweep import trial

    made = []
    real = downstream.prepare
    monkeypatch.setattr(downstream, "prepare", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    monkeypatch.setattr(trial, "_PREPARED", {})
    first = trial._prepared(minilm_store, 256, "cpu")
    assert trial._prepared(minilm_store, 256, "cpu") is first and len(made) == 1
    other = trial._prepared(minilm_store, 128, "cpu")
    assert other is not first and len(made) == 2 and other.tokens < first.tokens
    assert list(trial._PREPARED.values()) == [other]  # one model held at a time


def test_a_pack_reports_each_member_with_its_own_numbers():
    from sae_registry.sweep.progress import LiveTable, report

    r = report(8, {"a": (0.30, 5.0), "b": (0.20, 40.0)})
    assert (r["best"], r["fvu"], r["l0"]) == ("b", 0.20, 40.0)  # one member's pair, never min FVU with min L0
    assert (r["a/fvu"], r["a/l0"], r["b/fvu"], r["b/l0"]) == (0.30, 5.0, 0.20, 40.0)
    table = LiveTable(every_seconds=60)
    assert table.update("t1", r, now=0.0)  # the first report is shown
    assert not table.update("t1", report(12, {"a": (0.25, 6.0), "b": (0.15, 41.0)}), now=1.0)  # not every step
    assert table.update("t2", {**report(12, {"c": (0.5, 2.0)}), "done": 1}, now=2.0)  # a trial's end is shown
    rows = {line.split()[0]: line.split() for line in table.text().splitlines()[1:]}
    assert rows["a"][1:] == ["t1", "RUNNING", "12", "0.2500", "6.0"]
    assert rows["b"][1:] == ["t1", "RUNNING", "12", "0.1500", "41.0"]
    assert rows["c"][3:] == ["12", "0.5000", "2.0"]


def test_a_local_ray_starts_without_the_token_notice(tmp_path):
    """Ray's token-authentication default, kept, without its warning at every start (in a fresh process)."""
    code = ("import ray; from sae_registry._util.cluster import connect; connect(None); "
            "print('ok', ray.get(ray.remote(lambda: 1).remote())); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    p = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}, cwd=tmp_path)
    assert p.returncode == 0 and "ok 1" in p.stdout, p.stderr
    assert "Token authentication is" not in p.stderr, p.stderr


# -- packing by estimated cost (pure: no Ray, no MLflow) ----------------------------------------------------

DEMO_GRID = [{"sparsity": ["top_k"], "dict_size": [1024, 2048], "k": [16, 32]},
             {"sparsity": ["l1"], "dict_size": [1024, 2048], "l1_coeff": [0.003, 0.01]}]


def _demo(**overrides) -> SweepSpec:
    return SweepSpec.from_dict({"name": "x", "store": "s.zarr", "grid": DEMO_GRID, "train": {"tokens": 300_000},
                                **overrides})


def test_balanced_bins_are_longest_first_and_respect_capacity():
    from sae_registry.config.sweep import balanced_bins

    costs = [7, 5, 4, 3, 3, 2]  # total 24: 12 + 12 is possible
    bins = balanced_bins(costs, 2)
    assert sorted(sum(costs[i] for i in b) for b in bins) == [12, 12]
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert [len(b) for b in balanced_bins([9, 1, 1, 1], 2, capacity=2)] == [2, 2]  # room, not load, decides
    assert balanced_bins([1.0, 1.0], 5) == [[0], [1]]  # never an empty pack
    with pytest.raises(ValueError):
        balanced_bins([1, 1, 1], 1, capacity=2)


def test_demo_packs_mix_rules_so_concurrent_trials_end_together():
    from sae_registry.config.sweep import estimated_cost

    spec = _demo(pack=4)
    configs = spec.configurations(384)
    plan = spec.pack_plan(384)
    assert sorted(len(p) for p in plan) == [4, 4]
    loads = [sum(estimated_cost(*configs[i], 384) for i in p) for p in plan]
    assert max(loads) / min(loads) < 1.1  # the old split (4 top_k | 4 l1) is far apart
    by_rule = [sum(estimated_cost(s, t, 384) for s, t in configs if s.sparsity == r) for r in ("top_k", "l1")]
    assert max(by_rule) / min(by_rule) > 1.2
    assert loads == sorted(loads, reverse=True)  # the costliest pack starts first
    assert spec.pack_plan(384) == plan == _demo(pack=4).pack_plan(384)  # a trial finds its members again


def test_auto_pack_makes_one_pack_per_concurrent_slot():
    spec = _demo(pack="auto")
    assert [len(p) for p in spec.pack_plan(384, slots=1)] == [8]
    assert sorted(len(p) for p in spec.pack_plan(384, slots=2)) == [4, 4]
    assert [len(p) for p in spec.pack_plan(384, slots=8)] == [1] * 8
    assert len(spec.pack_plan(384, slots=64)) == 8  # more slots than dictionaries: one each
    two_seeds = _demo(pack="auto", seeds=[0, 1])  # seeds never share a stream: at least a pack per seed
    plan = two_seeds.pack_plan(384, slots=1)
    configs = two_seeds.configurations(384)
    assert len(plan) == 2 and all(len({configs[i][1].seed for i in p}) == 1 for p in plan)
    with pytest.raises(SAERegistryError, match="pack must be a positive integer or auto, got 'atuo'"):
        _demo(pack="atuo")


def test_cost_grows_with_tokens_width_and_dictionary():
    from sae_registry.config.options import SAEConfig, TrainConfig
    from sae_registry.config.sweep import estimated_cost

    def cost(tokens=1000, d=384, **sae):
        return estimated_cost(SAEConfig(input_size=d, **sae), TrainConfig(tokens=tokens), d)

    assert cost(tokens=2000, dict_size=1024) == pytest.approx(2 * cost(dict_size=1024))
    assert cost(d=768, dict_size=1024) == pytest.approx(2 * cost(dict_size=1024))
    assert cost(dict_size=2048) > cost(dict_size=1024)
    assert cost(dict_size=1024, top_k=64) > cost(dict_size=1024, top_k=16)
    assert cost(dict_size=1024, sparsity="l1") > cost(dict_size=1024, top_k=32)  # dense l1 costs more

    def l1(coeff):
        sae = SAEConfig(input_size=384, dict_size=1024, sparsity="l1")
        return estimated_cost(sae, TrainConfig(tokens=1000, l1_coeff=coeff), 384)

    # a coefficient that thins the codes under the sparse step's threshold: dense for half the run only
    assert l1(0.003) == pytest.approx(cost(dict_size=1024, sparsity="l1"))  # stays dense: one price
    assert cost(dict_size=1024, top_k=32) < l1(0.01) < 0.8 * l1(0.003)


def test_concurrent_slots_count_whole_trials_per_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0, "GPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert _demo(resources={"cpu": 2}).concurrent_slots(nodes) == 2  # 1 + 1: a node's 3 CPUs hold one 2-CPU trial
    assert _demo(resources={"cpu": 1}).concurrent_slots(nodes) == 5
    assert _demo(resources={"cpu": 1}, max_concurrent_trials=2).concurrent_slots(nodes) == 2
    assert _demo(resources={"cpu": 0.5, "gpu": 0.25}).concurrent_slots(nodes) == 6  # CPUs bound the GPU node: 3 / 0.5
    assert _demo(resources={"cpu": 0, "gpu": 0.5}).concurrent_slots(nodes) == 8  # only the GPU node, 4 / 0.5
    assert _demo(resources={"cpu": 0.1}).concurrent_slots([{"Alive": True, "Resources": {"CPU": 3.0}}]) == 30


def test_the_summary_table_stays_aligned_with_long_names():
    from sae_registry.sweep.driver import SweepResult

    rows = [dict(name=name, frontier=True, dict_size=1024, k=32, l1_coeff=0.0, fvu=0.2, l0=29.3, dead_fraction=0.0,
                 version=str(i)) for i, name in enumerate(["matryoshka-d1024-k32-p64.256.1024", "topk-d1024-k32"])]
    lines = summary_table(SweepResult("s", "p", rows, "1", 0, 1.0, {}, False), "champion").splitlines()
    end = lines[0].index("dict_size") + len("dict_size")
    assert [line[end - 4:end] for line in lines[1:3]] == ["1024", "1024"], lines  # the column lines up
