"""Nothing lost: interrupted harvests and encodings resume to the same bytes, concurrent
registrations all land, and a tracking-server restart in the middle of a sweep loses no metric.

Faults are injected for real: an exception part way through a harvest or an encoding, two processes
registering at once, a tracking server stopped and started again on the same port and database.
(Killed trial processes: tests/test_sweep.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAERegistryError, SparseAutoencoder
from sae_registry.encode import encode_store, open_codes
from sae_registry.store import PROVENANCE


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
    from sae_registry.harvest import demo_texts, harvest

    texts = demo_texts()[:24]
    options = {"layer": 2, "batch_size": 4, "chunk_tokens": 256, "max_tokens": max_tokens, "seed": 3, "progress": False}
    whole = harvest(tmp_path / "whole.zarr", texts, **options)

    with monkeypatch.context() as m:
        _crash_after(m, ActivationStore, "append", 3)  # a few chunks on disk, some rows pending
        with pytest.raises(Crash):
            harvest(tmp_path / "cut.zarr", texts, **options)
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
    import sae_registry.harvest as H

    original = H._run

    def counted(*args, **kwargs):
        ran.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(H, "_run", counted)


@pytest.mark.slow
def test_resuming_a_harvest_with_other_options_is_refused(tmp_path, monkeypatch):
    from sae_registry.harvest import demo_texts, harvest

    texts = demo_texts()[:12]
    with monkeypatch.context() as m:
        _crash_after(m, ActivationStore, "append", 2)
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
