"""Harvest on Ray and stores found by content: a tiny random BERT, a few hundred tokens, a local Ray.

What a user relies on: any number of workers writes the same store, bit for bit, as one worker; a
killed worker or a killed driver loses and duplicates nothing; a harvest whose content already
exists returns the existing store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae_registry import ActivationStore, SAERegistryError
from sae_registry.harvest import demo_texts, harvest
from sae_registry.harvest_ray import shard_bounds
from sae_registry.store import PROVENANCE

TEXTS = demo_texts()[:24]
OPTIONS = dict(layer=1, max_length=32, batch_size=4, chunk_tokens=64, progress=False, device="cpu")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sae_registry.harvest import default_model_path

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(path)
    return path


def same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert np.array_equal(a._array[:], b._array[:])
    for name in PROVENANCE:
        assert np.array_equal(a.provenance()[name], b.provenance()[name]), name
    for key in ("n_tokens", "fingerprint", "mean", "mean_norm", "total_variance", "source", "d", "dtype"):
        assert a.metadata[key] == b.metadata[key], key


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
def test_two_workers_write_the_one_worker_store_bit_for_bit(tiny_bert, tmp_path):
    one = harvest(tmp_path / "one.zarr", TEXTS, model_path=tiny_bert, **OPTIONS)
    two = harvest(tmp_path / "two.zarr", TEXTS, model_path=tiny_bert, workers=2, reuse=False, **OPTIONS)
    same_store(one, two)
    assert not (tmp_path / "two.zarr.shards").exists()
    capped = harvest(tmp_path / "cap.zarr", TEXTS, model_path=tiny_bert, workers=3, reuse=False,
                     **{**OPTIONS, "max_tokens": 300})
    same_store(harvest(tmp_path / "cap1.zarr", TEXTS, model_path=tiny_bert, reuse=False,
                       **{**OPTIONS, "max_tokens": 300}), capped)


def test_bad_worker_counts_are_refused_before_any_work(tiny_bert, tmp_path):
    with pytest.raises(SAERegistryError, match="workers must be a positive integer"):
        harvest(tmp_path / "w.zarr", TEXTS, model_path=tiny_bert, workers=0, **OPTIONS)
    with pytest.raises(SAERegistryError, match="only 3 documents"):
        harvest(tmp_path / "w.zarr", TEXTS[:3], model_path=tiny_bert, workers=4, **OPTIONS)
    assert not (tmp_path / "w.zarr").exists()
