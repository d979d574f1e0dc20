"""The activation-source protocol: the zarr store and an in-memory array read alike, and open_source picks one."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.analysis.cards import latent_stats
from sae_registry.analysis.encode import dense_codes, encode_store
from sae_registry.store.source import ActivationSource, ArraySource, open_source


def _rows(n: int = 1000, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _store(path, rows: torch.Tensor, **kw) -> ActivationStore:
    with ActivationStore.create(path, d=rows.shape[1], chunk_tokens=64, **kw) as writer:
        writer.append(rows)
    return ActivationStore.open(path)


@pytest.fixture
def pair(tmp_path):
    """The same rows as a zarr store and as an ArraySource."""
    rows = _rows()
    return _store(tmp_path / "s.zarr", rows), ArraySource(rows), rows


def _protocol_members() -> dict[str, object]:
    return {name: value for name, value in vars(ActivationSource).items()
            if not name.startswith("_") or name == "__len__"}


@pytest.mark.parametrize("which", ["zarr store", "array"])
def test_both_backends_satisfy_the_protocol_with_its_signatures(pair, which):
    source = pair[0] if which == "zarr store" else pair[1]
    assert isinstance(source, ActivationSource)
    members = _protocol_members()
    assert {"path", "fingerprint", "source", "d", "mean_norm", "__len__", "split_range", "read", "batches"} \
        <= set(members)
    for name, wanted in members.items():
        if isinstance(wanted, property):
            getattr(source, name)  # readable
            continue
        if not callable(wanted):
            continue
        have = inspect.signature(getattr(type(source), name)).parameters
        for param in inspect.signature(wanted).parameters.values():
            assert param.name in have, f"{type(source).__name__}.{name} lacks {param.name}"
            got = have[param.name]
            assert got.kind == param.kind, f"{type(source).__name__}.{name}({param.name}) is {got.kind}"
            assert got.default == param.default, f"{type(source).__name__}.{name}({param.name}) defaults differently"
        extra = [p for p in have.values() if p.name not in inspect.signature(wanted).parameters]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}: extra required {extra}"


def test_an_array_and_a_store_of_the_same_rows_agree(pair):
    store, array, rows = pair
    assert array.fingerprint == store.fingerprint  # the same rows, the same data: one fingerprint
    assert array.path == f"memory:{array.fingerprint}"
    assert (len(array), array.d) == (len(store), store.d)
    assert array.mean_norm == pytest.approx(store.mean_norm, rel=1e-12)
    for split in ("train", "eval", "all"):
        assert array.split_range(split) == store.split_range(split)
    torch.testing.assert_close(array.read(100, 300), store.read(100, 300))
    torch.testing.assert_close(array.read(-5), store.read(-5))
    in_order = [torch.cat(list(s.batches(100, split="eval", shuffle=False))) for s in (array, store)]
    torch.testing.assert_close(*in_order)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rows_are_kept_and_fingerprinted_as_a_store_keeps_them(tmp_path, dtype):
    rows = _rows().to(dtype)
    name = str(dtype).removeprefix("torch.")
    store = _store(tmp_path / "s.zarr", rows, dtype=name)
    array = ArraySource(rows)
    assert array.dtype == name and array.fingerprint == store.fingerprint
    torch.testing.assert_close(array.read(), store.read())
    assert array.read().dtype == torch.float32


def test_other_floats_become_float32_and_numpy_float32_is_shared():
    rows = _rows().numpy()
    assert ArraySource(rows.astype(np.float64)).fingerprint == ArraySource(rows).fingerprint
    assert ArraySource(rows[:, ::-1].copy()).d == 8
    shared = ArraySource(rows)
    assert np.shares_memory(shared._data.numpy(), rows)  # no copy of a big array
    out = shared.read(0, 2)
    out += 1  # reads are the caller's to change
    assert np.array_equal(shared.read(0, 2).numpy(), rows[:2])


def test_batches_cover_each_split_once_and_repeat_by_seed():
    source = ArraySource(torch.arange(200.0).repeat(3, 1).T.contiguous(), eval_fraction=0.1)  # row i is [i, i, i]
    assert source.split_range("eval") == (180, 200)
    for split, (lo, hi) in (("train", (0, 180)), ("eval", (180, 200))):
        seen = torch.cat(list(source.batches(32, split=split, seed=3)))[:, 0].long()
        assert sorted(seen.tolist()) == list(range(lo, hi))
    first = [b[:, 0].tolist() for b in source.batches(32, seed=1)]
    assert first == [b[:, 0].tolist() for b in source.batches(32, seed=1)]
    assert first != [b[:, 0].tolist() for b in source.batches(32, seed=2)]
    assert first[0] != list(range(32))  # shuffled
    sizes = [len(b) for b in source.batches(32, drop_last=True)]
    assert sizes == [32] * (180 // 32)
    assert [len(b) for b in source.batches(32, shuffle=False)][-1] == 180 % 32
    assert all(b.dtype == torch.float32 for b in source.batches(64))


BAD_ARRAYS = {
    "1-d": (torch.zeros(8), "2-d"),
    "3-d": (torch.zeros(2, 3, 4), "2-d"),
    "0-d": (torch.tensor(1.0), "2-d"),
    "ints": (torch.zeros(4, 3, dtype=torch.int64), "floats"),
    "bools": (np.zeros((4, 3), dtype=bool), "floats"),
    "complex": (torch.zeros(4, 3, dtype=torch.complex64), "floats"),
    "list": ([[1.0, 2.0], [3.0, 4.0]], "torch tensor or a numpy array"),
    "one row": (torch.zeros(1, 3), "at least 2 rows"),
    "no rows": (np.zeros((0, 3), dtype=np.float32), "at least 2 rows"),
    "no columns": (torch.zeros(5, 0), "1 column"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays_are_refused_naming_what_is_wrong(case):
    acts, words = BAD_ARRAYS[case]
    with pytest.raises(SAERegistryError, match=words):
        ArraySource(acts)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_refused_naming_the_first_row(bad):
    rows = _rows().numpy()
    rows[700, 3] = bad
    rows[900, 0] = bad
    with pytest.raises(SAERegistryError, match="NaN or Inf .row 700 is the first"):
        ArraySource(rows)


@pytest.mark.parametrize("kw, words", [
    ({"eval_fraction": 0}, "eval_fraction must be > 0"),
    ({"eval_fraction": 1}, "eval_fraction must be < 1"),
    ({"eval_fraction": math.nan}, "eval_fraction must be a finite number"),
    ({"source": "minilm"}, "source must be a dict"),
    ({"source": {"model": object()}}, "source must hold JSON data"),
])
def test_bad_options_are_refused(kw, words):
    with pytest.raises(SAERegistryError, match=words):
        ArraySource(_rows(), **kw)


def test_bad_reads_and_batches_are_refused():
    source = ArraySource(_rows())
    with pytest.raises(SAERegistryError, match="stop is before start"):
        source.read(10, 5)
    with pytest.raises(SAERegistryError, match="split must be one of"):
        source.batches(8, split="test")  # when called, not at the first batch
    with pytest.raises(SAERegistryError, match="batch_size must be a positive integer"):
        source.batches(0)


def test_open_source_picks_the_backend(pair, tmp_path):
    store, array, rows = pair
    assert isinstance(open_source(store.path), ActivationStore)
    assert isinstance(open_source(str(store.path)), ActivationStore)
    assert open_source(store) is store and open_source(array) is array
    assert open_source(rows).fingerprint == store.fingerprint
    assert isinstance(open_source(rows.numpy()), ArraySource)
    with pytest.raises(SAERegistryError, match="held in memory .* never written anywhere"):
        open_source(array.path)
    with pytest.raises(SAERegistryError, match="not a place sae-registry reads stores from"):
        open_source("http://example.com/acts.zarr")
    with pytest.raises(SAERegistryError, match="no activation store at"):
        open_source(tmp_path / "missing.zarr")
    with pytest.raises(SAERegistryError, match="got list"):
        open_source([[1.0, 2.0]])


def test_encode_and_feature_statistics_read_an_array_as_they_read_a_store(pair, tmp_path):
    store, array, _ = pair
    sae = SparseAutoencoder(SAEConfig(8, 16, 2)).eval()
    a = encode_store(sae, array, tmp_path / "a.zarr", split="eval", batch_size=64, progress=False)
    b = encode_store(sae, store, tmp_path / "b.zarr", split="eval", batch_size=64, progress=False)
    torch.testing.assert_close(dense_codes(a), dense_codes(b))
    mine, theirs = latent_stats(sae, array, n_top=3), latent_stats(sae, store, n_top=3)
    assert np.array_equal(mine.count, theirs.count) and np.array_equal(mine.top_rows, theirs.top_rows)
