"""Stores on a real S3-compatible server: moto's standalone ``moto_server`` as a subprocess on loopback.

Harvest to it, train from it, resume an interrupted harvest on it, and find a missing or a cut chunk
exactly as on a local disk; no credentials or no server is an error in seconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAEConfig, SAERegistryError
from sae_registry.harvest import demo_texts, harvest
from sae_registry.store_writer import StoreWriter
from sae_registry.train import TrainConfig, train

from procs import free_port, start_moto
from test_harvest_ray import OPTIONS, same_store, tiny_bert  # noqa: F401  (the tiny model fixture)

pytestmark = pytest.mark.slow
TEXTS = demo_texts()[:12]


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
    remote = harvest("s3://stores/acts.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
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
        harvest("s3://stores/resumed.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    monkeypatch.setattr(StoreWriter, "append", original)
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open("s3://stores/resumed.zarr")
    resumed = harvest("s3://stores/resumed.zarr", TEXTS, model_path=tiny_bert, resume=True, **OPTIONS)
    same_store(local, resumed)


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
