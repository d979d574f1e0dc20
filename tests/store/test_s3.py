"""Stores on a real S3-compatible server: moto's standalone ``moto_server`` as a subprocess on loopback.

Harvest to it, train from it, resume an interrupted harvest on it, and find a missing or a cut chunk
exactly as on a local disk; no credentials or no server is an error in seconds. Outages: a TCP proxy
between the client and moto (moto keeps its data in memory, so it cannot itself be restarted) is cut
during a harvest and during a training: a short outage is waited out, a long one stops the work with
an error, and --resume then loses and duplicates no token.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from procs import TcpProxy, free_port, start_moto
from tiny_models import OPTIONS, same_store, tiny_bert  # noqa: F401  (tiny_bert: a fixture, used by name)

from sae_registry import ActivationStore, SAEConfig, SAERegistryError
from sae_registry.harvest.local import demo_texts, harvest
from sae_registry.store.writer import StoreWriter
from sae_registry.training.loop import TrainConfig, train

pytestmark = pytest.mark.slow
TEXTS = demo_texts()[:12]
_original_append, _original_rows = StoreWriter.append, ActivationStore._rows  # before any test patches them


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto S3 server started for this module (stopped by its pid), with one bucket."""
    import s3fs

    with start_moto(tmp_path_factory.mktemp("moto")) as env:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.mkdir("stores")
        yield env, fs


@pytest.fixture
def s3(moto, monkeypatch):
    env, fs = moto
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return fs


def test_harvest_to_s3_train_from_it_and_resume_an_interrupted_harvest(tiny_bert, tmp_path, s3, monkeypatch):
    local = harvest(tmp_path / "local.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    remote = harvest("s3://stores/acts.zarr", TEXTS, model_path=tiny_bert, reuse=False, **OPTIONS)
    # the same content beside an s3:// --out is found, as beside a local one
    assert harvest("s3://stores/again.zarr", TEXTS, model_path=tiny_bert, **OPTIONS).path == "s3://stores/acts.zarr"
    assert remote.path == "s3://stores/acts.zarr" and s3.exists("stores/acts.zarr/zarr.json")
    same_store(local, ActivationStore.open("s3://stores/acts.zarr"))
    result = train(remote, SAEConfig(32, 64, 4), TrainConfig(tokens=512, batch_size=64, eval_every=4),
                   tmp_path / "run", progress=False)
    assert np.isfinite(result.metrics["fvu"])
    # killed part way (after its first batch): the store on S3 stays unfinished, and --resume completes it
    original, calls = StoreWriter.append, {"n": 0}

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("harvest stopped")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "append", crash)
    with pytest.raises(KeyboardInterrupt):
        harvest("s3://stores/resumed.zarr", TEXTS, model_path=tiny_bert, reuse=False, **OPTIONS)
    monkeypatch.setattr(StoreWriter, "append", original)
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open("s3://stores/resumed.zarr")
    resumed = harvest("s3://stores/resumed.zarr", TEXTS, model_path=tiny_bert, resume=True, **OPTIONS)
    same_store(local, resumed)


def test_workers_write_to_s3_the_one_worker_store(tiny_bert, tmp_path, s3):
    local = harvest(tmp_path / "local.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    remote = harvest("s3://stores/workers.zarr", TEXTS, model_path=tiny_bert, workers=2, reuse=False, **OPTIONS)
    same_store(local, remote)
    assert not s3.exists("stores/workers.zarr.shards")  # the shard sub-stores (on S3 too) are deleted


def test_stores_are_found_by_content_key_under_a_store_root_on_s3(tiny_bert, tmp_path, s3, monkeypatch):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.config.options import HarvestSpec
    from sae_registry.harvest.local import ensure_store, resolve_store

    remote = harvest("s3://stores/root/a.zarr", TEXTS[:6], model_path=tiny_bert, **OPTIONS)
    key = remote.source["content_key"]
    monkeypatch.setenv("SAE_REGISTRY_STORE_ROOT", "s3://stores/root")
    monkeypatch.chdir(tmp_path)
    heard = []
    found = harvest(tmp_path / "b.zarr", TEXTS[:6], model_path=tiny_bert, say=heard.append, **OPTIONS)
    assert found.path == "s3://stores/root/a.zarr" and not (tmp_path / "b.zarr").exists() and key in heard[0]
    assert resolve_store(f"key:{key[:10]}") == "s3://stores/root/a.zarr"
    listed = CliRunner().invoke(main, ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "stores"])
    assert listed.exit_code == 0, listed.output
    assert f"{key}  {len(remote):>12,} tokens" in listed.output and "s3://stores/root/a.zarr" in listed.output
    # a sweep's key that is not there yet is harvested under the root, on S3
    from sae_registry.harvest.local import read_texts

    (tmp_path / "x").mkdir()  # not under the working directory, where keys are also looked up
    text = tmp_path / "x" / "texts.txt"
    text.write_text("\n%\n".join(TEXTS[:6]))
    spec = HarvestSpec(model_path=str(tiny_bert), layer=2, max_length=32, batch_size=4, chunk_tokens=64,
                       text=str(text), separator="^%$")
    made = harvest(tmp_path / "x" / "probe.zarr", read_texts(text, separator="^%$"), model_path=tiny_bert, reuse=False,
                   **{**OPTIONS, "layer": 2}).source["content_key"]
    where = resolve_store(f"key:{made}", spec)
    assert where == f"s3://stores/root/{made}.zarr"
    assert ensure_store(where, spec).source["content_key"] == made and s3.exists(f"stores/root/{made}.zarr/zarr.json")


def test_a_missing_or_cut_chunk_on_s3_is_found_as_on_disk(tmp_path, s3):
    path = tmp_path / "lz4.zarr"
    with ActivationStore.create(path, d=8, chunk_tokens=100, compressor="lz4") as store:
        store.append(torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)))
    for name in ("missing", "cut"):
        s3.put(str(path), f"stores/{name}.zarr", recursive=True)
    assert len(ActivationStore.open("s3://stores/missing.zarr")) == 1000
    s3.rm("stores/missing.zarr/activations/c/3/0")
    with pytest.raises(SAERegistryError, match="is damaged: 1 of the 10 chunk files of activations/ are missing"):
        ActivationStore.open("s3://stores/missing.zarr")
    blob = s3.cat_file("stores/cut.zarr/activations/c/5/0")
    s3.pipe_file("stores/cut.zarr/activations/c/5/0", blob[: len(blob) // 2])
    (path / "activations" / "c" / "5" / "0").write_bytes(blob[: len(blob) // 2])
    messages = []
    for where in ("s3://stores/cut.zarr", path):
        with pytest.raises(SAERegistryError, match=r"chunk 5 of activations/ \(rows 500-600\).*cut short") as e:
            ActivationStore.open(where)
        messages.append(str(e.value).split(" is damaged")[1])
    assert messages[0] == messages[1]  # the same words for a local store


def test_no_credentials_or_no_server_is_an_error_in_seconds(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SAERegistryError, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
        ActivationStore.open("s3://stores/acts.zarr")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(SAERegistryError, match="cannot reach the S3 endpoint http://127.0.0.1"):
        ActivationStore.create("s3://stores/acts.zarr", d=8)
    assert time.monotonic() - started < 60  # not minutes of retries (a bound, not a speed test)


@pytest.fixture
def proxied(moto, monkeypatch):
    """The moto server behind a TCP proxy that the test cuts and restores; the client goes through it
    (so not with the ``s3`` fixture, which points the client at moto itself)."""
    env, fs = moto
    proxy = TcpProxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def _cut_at(monkeypatch, cls, method: str, call: int, proxy: TcpProxy, restore_after: float | None) -> None:
    """Cut the proxy just before the ``call``-th call of ``cls.method``; restore it ``restore_after`` s later."""
    original, calls = getattr(cls, method), {"n": 0}

    def cutting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            proxy.cut()
            if restore_after is not None:
                threading.Timer(restore_after, proxy.restore).start()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, cutting)


def lost_and_duplicated(reference: ActivationStore, store: ActivationStore) -> tuple[int, int]:
    """Tokens of ``reference`` missing from ``store``, and rows of ``store`` that repeat a token (by window, position)."""
    tokens = lambda s: list(zip(s.provenance()["seq"].tolist(), s.provenance()["pos"].tolist()))  # noqa: E731
    want, have = tokens(reference), tokens(store)
    return len(set(want) - set(have)), len(have) - len(set(have))


def test_an_s3_outage_during_a_harvest_is_waited_out_or_stops_it_and_resume_loses_nothing(
        tiny_bert, tmp_path, proxied, monkeypatch):
    local = harvest(tmp_path / "local.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    # a short outage (1 s, within the wait): the harvest waits for the endpoint and goes on
    _cut_at(monkeypatch, StoreWriter, "append", 3, proxied, restore_after=1.0)
    waited = harvest("s3://stores/outage-short.zarr", TEXTS, model_path=tiny_bert, reuse=False, **OPTIONS)
    assert proxied.cuts == 1
    same_store(local, waited)
    assert lost_and_duplicated(local, waited) == (0, 0)
    # a long one (past the wait): a clear error, the store left unfinished, and --resume completes it
    monkeypatch.setattr(StoreWriter, "append", _original_append)
    monkeypatch.setenv("SAE_REGISTRY_S3_WAIT_SECONDS", "1")
    _cut_at(monkeypatch, StoreWriter, "append", 3, proxied, restore_after=None)
    started = time.monotonic()
    with pytest.raises(SAERegistryError, match=r"S3 endpoint .* stopped answering while writing rows .* --resume"):
        harvest("s3://stores/outage-long.zarr", TEXTS, model_path=tiny_bert, reuse=False, **OPTIONS)
    assert time.monotonic() - started < 60  # bounded waits, not minutes (a bound, not a speed test)
    proxied.restore()
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open("s3://stores/outage-long.zarr")
    monkeypatch.setattr(StoreWriter, "append", _original_append)
    resumed = harvest("s3://stores/outage-long.zarr", TEXTS, model_path=tiny_bert, resume=True, **OPTIONS)
    same_store(local, resumed)
    assert lost_and_duplicated(local, resumed) == (0, 0)



def test_an_s3_outage_during_a_training_is_waited_out_or_stops_it_and_resume_continues_exactly(
        tmp_path, moto, proxied, monkeypatch):
    local = tmp_path / "acts.zarr"
    with ActivationStore.create(local, d=16, chunk_tokens=128) as store:
        store.append(torch.randn(2048, 16, generator=torch.Generator().manual_seed(0)))
    moto[1].put(str(local), "stores/train.zarr", recursive=True)
    cfg = TrainConfig(tokens=3 * 1920, batch_size=128, eval_every=5, checkpoint_every=10, eval_tokens=64)
    sae_cfg = SAEConfig(16, 32, 4)
    whole = train(ActivationStore.open(local), sae_cfg, cfg, tmp_path / "whole", progress=False)
    chunks = -(-ActivationStore.open(local).num_tokens("train") // 128)
    during_epoch_2 = 2 * chunks + chunks // 2  # reads: the first batch's buffer, epoch 1, then half of epoch 2

    def same_training(result) -> None:
        for a, b in zip(whole.sae.state_tensors().values(), result.sae.state_tensors().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert [h["step"] for h in result.history] == [h["step"] for h in whole.history]

    # a short outage: the reader waits for the endpoint, and the training is the one without an outage
    _cut_at(monkeypatch, ActivationStore, "_rows", during_epoch_2, proxied, restore_after=1.0)
    same_training(train(ActivationStore.open("s3://stores/train.zarr"), sae_cfg, cfg, tmp_path / "short",
                        progress=False))
    assert proxied.cuts == 1
    # a long one: an error naming the rows it was reading; --resume continues from the last checkpoint
    monkeypatch.setattr(ActivationStore, "_rows", _original_rows)
    monkeypatch.setenv("SAE_REGISTRY_S3_WAIT_SECONDS", "1")
    _cut_at(monkeypatch, ActivationStore, "_rows", during_epoch_2, proxied, restore_after=None)
    with pytest.raises(SAERegistryError, match=r"stopped answering while reading rows \d+-\d+ .* --resume"):
        train(ActivationStore.open("s3://stores/train.zarr"), sae_cfg, cfg, tmp_path / "long", progress=False)
    proxied.restore()
    monkeypatch.setattr(ActivationStore, "_rows", _original_rows)
    steps = []
    resumed = train(ActivationStore.open("s3://stores/train.zarr"), sae_cfg, cfg, tmp_path / "long", resume=True,
                    progress=False, callback=lambda step, _m, _c: steps.append(step))
    assert steps[0] > 1  # continued from a checkpoint, not from the start
    same_training(resumed)



def test_an_endpoint_that_hangs_is_an_error_in_bounded_time(tmp_path, moto, proxied, monkeypatch):
    from sae_registry.store import zarr_files

    local = tmp_path / "acts.zarr"
    with ActivationStore.create(local, d=8, chunk_tokens=100) as store:
        store.append(torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)))
    moto[1].put(str(local), "stores/hangs.zarr", recursive=True)
    monkeypatch.setattr(zarr_files, "S3_READ_SECONDS", 1)  # the configured 15 s, shortened for the test
    monkeypatch.setenv("SAE_REGISTRY_S3_WAIT_SECONDS", "1")
    store = ActivationStore.open("s3://stores/hangs.zarr")
    proxied.stall()  # connections are accepted and never answered: only timeouts end a request
    started = time.monotonic()
    with pytest.raises(SAERegistryError, match=r"stopped answering while reading rows 0-100 .*ReadTimeoutError"):
        store.read(0, 100)
    # botocore's 3 attempts of 1 s, once (not s3fs's 5 times over), then the wait: seconds, not minutes
    assert time.monotonic() - started < 30
    proxied.restore()
    assert torch.equal(store.read(), ActivationStore.open(local).read())
