"""Harvest on Ray and stores found by content: a tiny random BERT, a few hundred tokens, a local Ray.

What a user relies on: any number of workers writes the same store, bit for bit, as one worker; a
killed worker or a killed driver loses and duplicates nothing; a harvest whose content already
exists returns the existing store.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from tiny_models import OPTIONS, same_store, tiny_bert  # noqa: F401  (tiny_bert: a fixture, used by name)

from sae_registry import ActivationStore, SAERegistryError
from sae_registry.harvest.local import demo_texts, harvest
from sae_registry.harvest.on_ray import shard_bounds

TEXTS = demo_texts()[:24]
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's harvests (starting one takes a while on a loaded machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_shards_are_whole_batches_in_order():
    assert shard_bounds(10, 4, 2) == [(0, 4), (4, 10)]
    assert shard_bounds(24, 4, 3) == [(0, 8), (8, 16), (16, 24)]
    assert shard_bounds(5, 4, 3) == [(0, 4), (4, 5)]  # two batches: two shards


def test_a_harvest_with_the_same_content_returns_the_store_there(tiny_bert, tmp_path, monkeypatch):
    first = harvest(tmp_path / "a.zarr", TEXTS[:6], model_path=tiny_bert, **OPTIONS)
    heard = []
    again = harvest(tmp_path / "b.zarr", TEXTS[:6], model_path=tiny_bert, say=heard.append, **OPTIONS)
    assert Path(again.path) == Path(first.path) and not (tmp_path / "b.zarr").exists()
    assert first.source["content_key"] in heard[0]
    other = harvest(tmp_path / "c.zarr", TEXTS[:6], model_path=tiny_bert, **{**OPTIONS, "layer": 2})
    assert other.source["content_key"] != first.source["content_key"]
    # under a store root, read when harvest is called
    monkeypatch.setenv("SAE_REGISTRY_STORE_ROOT", str(tmp_path))
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    found = harvest(elsewhere / "d.zarr", TEXTS[:6], model_path=tiny_bert, **{**OPTIONS, "layer": 2})
    assert Path(found.path) == Path(other.path)


@pytest.mark.slow
def test_two_workers_write_the_one_worker_store_bit_for_bit(tiny_bert, tmp_path, local_ray):
    one = harvest(tmp_path / "one.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    two = harvest(tmp_path / "two.zarr", TEXTS, model_path=tiny_bert, workers=2, reuse=False, **OPTIONS)
    same_store(one, two)
    assert not (tmp_path / "two.zarr.shards").exists()
    capped = harvest(tmp_path / "cap.zarr", TEXTS, model_path=tiny_bert, workers=3, reuse=False,
                     **{**OPTIONS, "max_tokens": 300})
    same_store(harvest(tmp_path / "cap1.zarr", TEXTS, model_path=tiny_bert, reuse=False,
                       **{**OPTIONS, "max_tokens": 300}), capped)


@pytest.mark.slow
def test_workers_with_several_hooks_and_packed_windows_write_the_one_worker_stores(tiny_bert, tmp_path, local_ray):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    options = {**OPTIONS, "pack": True}
    options.pop("layer")
    one = harvest(tmp_path / "one", TEXTS, model_path=tiny_bert, hooks=hooks, **options)
    two = harvest(tmp_path / "two", TEXTS, model_path=tiny_bert, hooks=hooks, workers=2, reuse=False, **options)
    assert sorted(two) == sorted(hooks) and not (tmp_path / "two.shards").exists()
    for hook in hooks:
        same_store(one[hook], two[hook])
    assert one[hooks[0]].source["pack"] is True
    # packing joins documents across batches: the shards are cut on batches, never inside a window
    packed = harvest(tmp_path / "p1.zarr", TEXTS, model_path=tiny_bert, reuse=False, **{**OPTIONS, "pack": True})
    same_store(packed, harvest(tmp_path / "p3.zarr", TEXTS, model_path=tiny_bert, workers=3, reuse=False,
                               **{**OPTIONS, "pack": True}))


def test_bad_worker_counts_are_refused_before_any_work(tiny_bert, tmp_path):
    with pytest.raises(SAERegistryError, match="workers must be a positive integer"):
        harvest(tmp_path / "w.zarr", TEXTS, model_path=tiny_bert, workers=0, **OPTIONS)
    with pytest.raises(SAERegistryError, match="only 3 documents"):
        harvest(tmp_path / "w.zarr", TEXTS[:3], model_path=tiny_bert, workers=4, **OPTIONS)
    assert not (tmp_path / "w.zarr").exists()


def _kill_a_worker_mid_shard(shard_dir: Path, done) -> dict:
    """SIGKILL the Ray worker running a shard once its sub-store has a whole chunk but is unfinished."""
    import json

    import psutil

    while not done.is_set():
        for store in sorted(shard_dir.glob("shard-*.zarr")):
            chunks = list((store / "activations" / "c").glob("*/*"))
            try:
                status = json.loads((store / "zarr.json").read_text())["attributes"]["status"]
            except (OSError, ValueError, KeyError):
                continue
            if chunks and status == "writing":
                for proc in psutil.process_iter(["cmdline"]):
                    if "ray::_harvest_shard" in " ".join(proc.info["cmdline"] or []):
                        proc.send_signal(signal.SIGKILL)  # a worker this test's harvest started
                        return {"chunks": len(chunks), "pid": proc.pid}
        time.sleep(0.02)
    return {}


@pytest.mark.slow
def test_a_killed_worker_and_a_crashed_driver_lose_and_duplicate_nothing(tiny_bert, tmp_path, monkeypatch, local_ray):
    import threading

    from sae_registry.harvest import on_ray as harvest_ray

    texts = demo_texts()[:160]
    one = harvest(tmp_path / "one.zarr", texts, model_path=tiny_bert, **OPTIONS)
    # a worker killed part way: Ray starts it again and its shard resumes from its last whole chunk
    done, killed = threading.Event(), {}
    killer = threading.Thread(target=lambda: killed.update(_kill_a_worker_mid_shard(tmp_path / "two.zarr.shards", done)))
    killer.start()
    try:
        two = harvest(tmp_path / "two.zarr", texts, model_path=tiny_bert, workers=2, reuse=False, **OPTIONS)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught part way through its shard"
    same_store(one, two)
    # the driver dies while joining the shards: --resume continues from its last whole chunk
    calls = {"n": 0}
    original = harvest_ray._ShardRows.__call__

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("driver stopped")
        return original(self, *args)

    monkeypatch.setattr(harvest_ray._ShardRows, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        harvest(tmp_path / "three.zarr", texts, model_path=tiny_bert, workers=2, reuse=False, **OPTIONS)
    monkeypatch.setattr(harvest_ray._ShardRows, "__call__", original)
    assert ActivationStore.reopen(tmp_path / "three.zarr").metadata["status"] == "writing"
    three = harvest(tmp_path / "three.zarr", texts, model_path=tiny_bert, workers=2, resume=True, **OPTIONS)
    same_store(one, three)


def test_stores_lists_content_keys_and_what_was_trained_on_each_and_sweeps_name_a_key(tiny_bert, tmp_path,
                                                                                      monkeypatch):
    from click.testing import CliRunner

    from sae_registry import SAEConfig
    from sae_registry.cli.commands import main
    from sae_registry.config.options import HarvestSpec
    from sae_registry.harvest.local import resolve_store
    from sae_registry.registry.runs import train_and_register
    from sae_registry.training.loop import TrainConfig

    store = harvest(tmp_path / "a.zarr", TEXTS[:8], model_path=tiny_bert, **OPTIONS)
    harvest(tmp_path / "b.zarr", TEXTS[:8], model_path=tiny_bert, **{**OPTIONS, "layer": 2})
    key = store.source["content_key"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    train_and_register(store, SAEConfig(32, 64, 4), TrainConfig(tokens=512, batch_size=64, eval_every=4),
                       tmp_path / "run", family="tiny", tracking_uri=uri, progress=False)
    result = CliRunner().invoke(main, ["--tracking-uri", uri, "stores", "--store-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    mine = next(i for i, line in enumerate(lines) if line.startswith(key))
    assert f"{len(store):,} tokens" in lines[mine] and "blocks.1.hook_resid_pre" in lines[mine]
    assert "tiny/1" in lines[mine + 1]
    other = next(i for i, line in enumerate(lines) if "b.zarr" in line)
    assert "nothing registered" in lines[other + 1]
    # a sweep names a store by its key; a key whose store was made with other options is refused
    assert resolve_store(f"key:{key[:10]}") == str(tmp_path / "a.zarr")
    spec = HarvestSpec(model_path=str(tiny_bert), layer=1, max_length=32, batch_size=4, chunk_tokens=64)
    assert resolve_store(f"key:{key}", spec) == str(tmp_path / "a.zarr")
    with pytest.raises(SAERegistryError, match=r"made with other options .*layer: 1 there, 2 here"):
        resolve_store(f"key:{key}", HarvestSpec(model_path=str(tiny_bert), layer=2, max_length=32, batch_size=4))
    with pytest.raises(SAERegistryError, match="no store with content key 0123456789"):
        resolve_store("key:0123456789")
