"""Nothing lost: interrupted harvests and encodings resume to the same bytes, concurrent
registrations all land, and a tracking-server restart in the middle of a sweep loses no metric.

Faults are injected for real: an exception part way through a harvest or an encoding, two processes
registering at once, a tracking server stopped and started again on the same port and database.
(Killed trial processes: tests/test_sweep.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import MLFLOW, free_port, start, stop, wait_for

from sae_registry import ActivationStore, SAERegistryError, SparseAutoencoder
from sae_registry.analysis.encode import encode_store, open_codes
from sae_registry.store.layout import PROVENANCE
from sae_registry.store.writer import StoreWriter


class Crash(Exception):
    """The injected fault: what a kill or a full disk would do, but catchable by the test."""


def _crash_after(monkeypatch, owner, name: str, calls: int) -> None:
    """Make ``owner.name`` raise :class:`Crash` on its ``calls + 1``-th call."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Crash(f"injected after {calls} calls of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert np.array_equal(a._array[:], b._array[:])
    for name in PROVENANCE:
        assert np.array_equal(a.provenance()[name], b.provenance()[name])
    for key in ("n_tokens", "fingerprint", "mean", "mean_norm", "total_variance", "source", "d", "dtype"):
        assert a.metadata[key] == b.metadata[key], key


# -- harvest ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("max_tokens", [None, 3000])
def test_an_interrupted_harvest_resumes_to_the_same_store(tmp_path, monkeypatch, max_tokens):
    from sae_registry.harvest.local import demo_texts, harvest

    texts = demo_texts()[:24]
    options = {"layer": 2, "batch_size": 4, "chunk_tokens": 256, "max_tokens": max_tokens, "seed": 3, "progress": False}
    whole = harvest(tmp_path / "whole.zarr", texts, **options)

    with monkeypatch.context() as m:
        _crash_after(m, StoreWriter, "append", 3)  # a few chunks on disk, some rows pending
        with pytest.raises(Crash):
            harvest(tmp_path / "cut.zarr", texts, reuse=False, **options)  # not the same-content whole.zarr
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open(tmp_path / "cut.zarr")
    kept = len(ActivationStore.reopen(tmp_path / "cut.zarr"))
    assert 0 < kept < len(whole) and kept % 256 == 0

    ran = []
    _count_forward_passes(monkeypatch, ran)
    resumed = harvest(tmp_path / "cut.zarr", texts, resume=True, **options)
    _same_store(resumed, whole)
    assert len(ran) < -(-len(texts) // 4)  # batches on disk were not run through the model again


def _count_forward_passes(monkeypatch, ran: list) -> None:
    from sae_registry.harvest import local as H

    original = H._run

    def counted(*args, **kwargs):
        ran.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(H, "_run", counted)


@pytest.mark.slow
def test_resuming_a_harvest_with_other_options_is_refused(tmp_path, monkeypatch):
    from sae_registry.harvest.local import demo_texts, harvest

    texts = demo_texts()[:12]
    with monkeypatch.context() as m:
        _crash_after(m, StoreWriter, "append", 2)
        with pytest.raises(Crash):
            harvest(tmp_path / "cut.zarr", texts, layer=2, batch_size=2, chunk_tokens=128, progress=False)
    with pytest.raises(SAERegistryError, match="other harvest options or texts.*source.layer"):
        harvest(tmp_path / "cut.zarr", texts, layer=3, batch_size=2, chunk_tokens=128, progress=False, resume=True)
    with pytest.raises(SAERegistryError, match="source.texts_sha256"):
        harvest(tmp_path / "cut.zarr", texts[::-1], layer=2, batch_size=2, chunk_tokens=128, progress=False,
                resume=True)


def test_a_store_reopened_after_a_crash_keeps_whole_chunks_and_finishes_identically(tmp_path):
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    whole = ActivationStore.create(tmp_path / "whole.zarr", d=8, chunk_tokens=64)
    for part in x.split(90):
        whole.append(part)
    whole.close()

    cut = ActivationStore.create(tmp_path / "cut.zarr", d=8, chunk_tokens=64)
    for part in x[:450].split(90):
        cut.append(part)  # 450 rows appended: 7 chunks (448) on disk, 2 pending, then the writer dies
    del cut
    store = ActivationStore.reopen(tmp_path / "cut.zarr")
    assert len(store) == 448
    # a writer carries on from row 448 with its own (different) batch boundaries
    for part in x[448:].split(77):
        store.append(part)
    store.close()
    a, b = ActivationStore.open(tmp_path / "whole.zarr"), ActivationStore.open(tmp_path / "cut.zarr")
    assert np.array_equal(a.read(), b.read())
    for key in ("n_tokens", "fingerprint", "mean", "mean_norm", "total_variance"):
        assert a.metadata[key] == b.metadata[key], key
    with pytest.raises(SAERegistryError, match="nothing to resume"):
        ActivationStore.reopen(tmp_path / "cut.zarr")


def test_a_store_reopened_after_a_crash_between_growing_and_writing_drops_the_missing_chunk(tmp_path):
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    cut = ActivationStore.create(tmp_path / "cut.zarr", d=8, chunk_tokens=64, provenance=False)
    cut.append(x[:200])  # 192 rows (3 chunks) on disk
    cut._array.resize((256, 8))  # the next flush grew the array, then the writer died before writing
    del cut
    store = ActivationStore.reopen(tmp_path / "cut.zarr")
    assert len(store) == 192
    store.append(x[192:])
    store.close()
    assert np.array_equal(ActivationStore.open(tmp_path / "cut.zarr").read(), x.numpy())


# -- encode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["top_k", "l1"])
def test_an_interrupted_encoding_resumes_to_the_same_codes(tmp_path, monkeypatch, sparsity):
    x = torch.randn(1037, 16, generator=torch.Generator().manual_seed(0))
    with ActivationStore.create(tmp_path / "acts.zarr", d=16, chunk_tokens=100) as s:
        s.append(x)
    store = ActivationStore.open(tmp_path / "acts.zarr")
    torch.manual_seed(1)
    sae = SparseAutoencoder.build(16, 64, sparsity=sparsity, **({"top_k": 4} if sparsity == "top_k" else {}))
    options = {"batch_size": 128, "progress": False, "attrs": {"dictionary": "toy/1"}}
    whole = encode_store(sae, store, tmp_path / "whole.zarr", **options)

    method = "encode_topk" if sparsity == "top_k" else "encode"
    with monkeypatch.context() as m:
        _crash_after(m, SparseAutoencoder, method, 3)
        with pytest.raises(Crash):
            encode_store(sae, store, tmp_path / "cut.zarr", **options)
    with pytest.raises(SAERegistryError, match="never finished"):
        open_codes(tmp_path / "cut.zarr")

    calls = []
    original = getattr(SparseAutoencoder, method)
    monkeypatch.setattr(SparseAutoencoder, method, lambda self, z: calls.append(1) or original(self, z))
    cut = encode_store(sae, store, tmp_path / "cut.zarr", resume=True, **options)
    assert len(calls) == -(-1037 // 128) - 3  # only the batches that were not on disk
    (_, a), (attrs, b) = open_codes(whole), open_codes(cut)
    assert attrs["status"] == "complete" and set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name][:], b[name][:]), name

    other = SparseAutoencoder.build(16, 64, sparsity=sparsity, **({"top_k": 4} if sparsity == "top_k" else {}))
    with monkeypatch.context() as m:
        _crash_after(m, SparseAutoencoder, method, 1)
        with pytest.raises(Crash):
            encode_store(sae, store, tmp_path / "again.zarr", **options)
    with pytest.raises(SAERegistryError, match="another dictionary.*sae_sha256"):
        encode_store(other, store, tmp_path / "again.zarr", resume=True, **options)


# -- the tracking server restarted; processes registering at once --------------------------------------


@contextlib.contextmanager
def restartable_server(root: Path):
    """An `mlflow server` on a fixed loopback port that a test may stop and start again (same port,
    same SQLite database, same artifact directory): ``down()``, ``up()``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    procs: list[subprocess.Popen] = []

    def up() -> None:
        log = root / f"server-{len(procs)}.log"
        procs.append(start(cmd, log))
        wait_for(f"{uri}/health", procs[-1], log)

    def down() -> None:
        stop(procs[-1])

    up()
    try:
        yield {"uri": uri, "up": up, "down": down}
    finally:
        for proc in procs:
            stop(proc)


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from sae_registry.registry.runs import MetricLogger

    # MLflow's own client gives up at once: only our retry can carry the batches across the outage
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with restartable_server(tmp_path) as server:
        client = MlflowClient(server["uri"])
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = MetricLogger(client, run_id)
        logger(0, {"step": 0, "eval/fvu": 1.0})
        logger.flush()
        server["down"]()
        for step in range(1, 6):
            logger(step, {"step": step, "eval/fvu": 1.0 / (step + 1), "eval/l0": float(step)})
        back = threading.Thread(target=server["up"])
        back.start()  # the server comes back (~10 s) while flush() waits
        logger.flush()
        back.join()
        assert sorted(m.step for m in client.get_metric_history(run_id, "eval/fvu")) == list(range(6))
        assert sorted(m.step for m in client.get_metric_history(run_id, "eval/l0")) == list(range(1, 6))


REGISTER = """
import sys, time
from pathlib import Path
from sae_registry.registry.versions import register_run
go = Path(sys.argv[1])
(go.parent / f"ready-{sys.argv[2]}").touch()
while not go.exists():
    time.sleep(0.01)
print(register_run(sys.argv[2], "at-once"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "server"])
def test_processes_registering_into_one_family_at_once_get_distinct_versions(tmp_path, synthetic_store, where):
    from mlflow import MlflowClient

    from sae_registry import SAEConfig
    from sae_registry.registry.runs import record_pack
    from sae_registry.registry.tracking import Tracking
    from sae_registry.registry.versions import register_run
    from sae_registry.training.loop import TrainConfig

    store, _ = synthetic_store
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if where == "server":
            server = stack.enter_context(restartable_server(tmp_path))
            env["MLFLOW_TRACKING_URI"] = server["uri"]
            os.environ["MLFLOW_TRACKING_URI"] = server["uri"]
            stack.callback(os.environ.pop, "MLFLOW_TRACKING_URI")
        cfg = TrainConfig(tokens=4096, batch_size=1024, eval_every=2, seed=0)
        members = [(SAEConfig(32, 64, k), cfg, tmp_path / f"d{k}") for k in (2, 3, 4, 5, 6, 7)]
        run_ids = [r.run_id for r in record_pack(store, members, family="at-once", progress=False)]

        go = tmp_path / "go"
        procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(go), run_id], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run_id in run_ids]
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
            time.sleep(0.2)  # every process imported and waiting
        go.touch()
        outputs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
        got = {run_id: out.split()[-1] for run_id, (out, _) in zip(run_ids, outputs)}
        assert sorted(got.values(), key=int) == [str(v) for v in range(1, len(run_ids) + 1)]
        client = MlflowClient(Tracking.resolve().uri)
        listed = {mv.run_id: str(mv.version) for mv in client.search_model_versions("name='at-once'")}
        assert listed == got  # none lost, none twice
        assert {register_run(run_id, "at-once") for run_id in run_ids} == set(got.values())  # idempotent


@pytest.mark.slow
def test_a_sweep_rides_out_a_tracking_server_restart(tmp_path, minilm_store, monkeypatch):
    import yaml
    from mlflow import MlflowClient
    from test_sweep import _children, _spec, _sweep_process, _wait_for_step

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    steps, every = 60, 5  # long enough that trials train through the outage
    spec = _spec(minilm_store, "restarted", grid=[{"dict_size": [1024], "k": [8, 16, 32, 64]}], register="all",
                 train={"tokens": steps * 2048, "batch_size": 2048, "eval_every": every, "checkpoint_every": every})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with restartable_server(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
        proc = _sweep_process(tmp_path / "s.yaml", tmp_path / "sweep.log")
        try:
            _wait_for_step("restarted", every, proc, tmp_path / "sweep.log")
            down_at = time.time() * 1000
            server["down"]()  # trials go on training and logging while it is away (~15 s)
            time.sleep(5)
            server["up"]()
            up_at = time.time() * 1000
            assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        client = MlflowClient(server["uri"])
        (parent,) = client.search_runs([client.get_experiment_by_name("restarted").experiment_id],
                                       "tags.`sweep.role` = 'parent'")
        children = _children("restarted", parent.data.tags["sweep.id"])
        assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
        logged_while_down = 0
        for child in children:  # every evaluation of every trial arrived
            for key in ("eval/fvu", "eval/l0"):
                history = client.get_metric_history(child.info.run_id, key)
                assert {m.step for m in history} == set(range(every, steps + 1, every)), child.data.tags["sweep.member"]
                logged_while_down += sum(down_at < m.timestamp < up_at for m in history)  # stamped when logged
        assert logged_while_down > 0
        versions = client.search_model_versions("name='restarted'")
        assert sorted(v.run_id for v in versions) == sorted(c.info.run_id for c in children)  # each once


@pytest.mark.slow
def test_sae_registry_harvest_resume_continues_an_interrupted_harvest(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.harvest.local import demo_texts

    (tmp_path / "text.txt").write_text("\n\n".join(demo_texts()[:100]))  # ~13k tokens: one whole 8192-row chunk
    args = ["harvest", "--text", str(tmp_path / "text.txt"), "--layer", "1", "--batch-size", "2"]
    whole = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "whole.zarr"), "--no-reuse"])
    assert whole.exit_code == 0, whole.output
    with monkeypatch.context() as m:
        _crash_after(m, StoreWriter, "_flush", 1)  # first chunk written, then dies in close()
        cut = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cut.zarr"), "--no-reuse"])
    assert isinstance(cut.exception, Crash)
    assert len(ActivationStore.reopen(tmp_path / "cut.zarr")) == 8192  # the chunk on disk is kept
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cut.zarr"), "--no-reuse"])
    assert again.exit_code != 0 and "already exists" in again.output  # no silent restart without --resume
    resumed = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cut.zarr"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    _same_store(ActivationStore.open(tmp_path / "cut.zarr"), ActivationStore.open(tmp_path / "whole.zarr"))
