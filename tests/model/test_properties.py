"""Properties of the model and the store, over random shapes and options (hypothesis).

Deterministic (``derandomize``: the same examples every run) and small, so they run in seconds.
"""

from __future__ import annotations

import tempfile
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_registry import ActivationStore, SAERegistryError, SparseAutoencoder

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@st.composite
def saes(draw):
    """A random small SAE (either sparsity) and an input with 0-3 leading (batch) dimensions."""
    input_size = draw(st.integers(1, 24))
    dict_size = draw(st.integers(1, 64))
    sparsity = draw(st.sampled_from(["top_k", "l1"]))
    top_k = draw(st.integers(1, dict_size))
    lead = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    sae = SparseAutoencoder.build(input_size, dict_size, top_k, sparsity)
    with torch.no_grad():
        sae.encoder.encoder.bias.normal_()  # some latents negative before the ReLU, some not
        sae.b_dec.normal_()
        sae.encoder.input_scale.fill_(draw(st.floats(0.1, 10.0)))
    x = torch.randn(*lead, input_size) * draw(st.floats(0.01, 100.0))
    return sae, x


@SETTINGS
@given(saes())
def test_codes_have_at_most_k_nonzeros_and_every_shape_holds(example):
    sae, x = example
    cfg = sae.cfg
    with torch.no_grad():
        codes = sae.encode(x)
        assert codes.shape == (*x.shape[:-1], cfg.dict_size)
        assert (codes >= 0).all()
        rows = codes.reshape(-1, cfg.dict_size)
        if cfg.sparsity == "top_k":
            assert ((rows != 0).sum(-1) <= cfg.top_k).all()
        recon = sae.decode(codes)
        assert recon.shape == x.shape
        torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-4)
        if cfg.sparsity == "top_k":
            values, indices = sae.encode_topk(x)
            flat = x.reshape(-1, cfg.input_size)
            assert values.shape == indices.shape == (len(flat), cfg.top_k)
            assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct latents per row
            dense = torch.zeros(len(flat), cfg.dict_size).scatter_(-1, indices, values)
            torch.testing.assert_close(dense, rows)
            torch.testing.assert_close(sae.decode_topk(values, indices), recon.reshape(-1, cfg.input_size),
                                       rtol=1e-4, atol=1e-4)
            # the k kept are the k largest: nothing dropped beats the smallest one kept
            pre = sae.encoder.pre_acts(flat * sae.input_scale)
            kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, indices, True)
            smallest_kept = pre.masked_fill(~kept, float("inf")).min(-1).values
            largest_dropped = pre.masked_fill(kept, float("-inf")).max(-1).values
            assert (largest_dropped <= smallest_kept + 1e-5).all()


@st.composite
def stores(draw):
    """Rows (whose column 0 is the row number), how they are appended, and how the store is chunked."""
    chunk_tokens = draw(st.integers(1, 160))
    n = draw(st.integers(2, min(400, 25 * chunk_tokens)))  # at most 25 chunks: few files, fast
    d = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=6, unique=True)))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    if dtype != "float32":  # values the dtype holds exactly, so that what comes back is what went in
        x[:, 1:] = x[:, 1:].to(getattr(torch, dtype)).float()
    return x, [0, *cuts, n], dtype, chunk_tokens, draw(st.sampled_from(["lz4", "zstd", "none"]))


def _write(x, bounds, dtype, chunk_tokens, compressor, directory: Path) -> ActivationStore:
    with ActivationStore.create(directory / "s.zarr", d=x.shape[1], dtype=dtype, chunk_tokens=chunk_tokens,
                                compressor=compressor) as store:
        for lo, hi in pairwise(bounds):
            store.append(x[lo:hi])
    return ActivationStore.open(directory / "s.zarr")


@SETTINGS
@given(stores(), st.data())
def test_the_store_returns_exactly_what_was_appended(example, data):
    x, bounds, dtype, chunk_tokens, compressor = example
    if dtype != "float32":  # row numbers above the dtype's exact integers are not kept exactly
        x = x[: 256 if dtype == "bfloat16" else 2048]
        bounds = [b for b in bounds if b < len(x)] + [len(x)]
    if len(x) < 2:
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = _write(x, bounds, dtype, chunk_tokens, compressor, Path(tmp))
        assert len(store) == len(x) and store.d == x.shape[1]
        assert torch.equal(store.read(), x)
        lo = data.draw(st.integers(0, len(x) - 1))
        hi = data.draw(st.integers(lo, len(x)))
        assert torch.equal(store.read(lo, hi), x[lo:hi])
        assert torch.equal(torch.cat([store.read_split("train"), store.read_split("eval")]), x)


@SETTINGS
@given(stores(), st.integers(1, 300), st.integers(1, 2000), st.integers(0, 1000), st.booleans(),
       st.sampled_from(["train", "eval", "all"]), st.booleans())
def test_shuffled_batches_are_a_permutation_of_the_split(example, batch_size, shuffle_tokens, seed, shuffle, split,
                                                         drop_last):
    x, bounds, _, chunk_tokens, compressor = example
    with tempfile.TemporaryDirectory() as tmp:
        store = _write(x, bounds, "float32", chunk_tokens, compressor, Path(tmp))
        lo, hi = store.split_range(split)
        batches = list(store.batches(batch_size, split=split, shuffle=shuffle, seed=seed,
                                     shuffle_tokens=shuffle_tokens, drop_last=drop_last))
        if drop_last:  # only the epoch's last, short batch is dropped
            assert all(len(b) == batch_size for b in batches)
            assert len(batches) == (hi - lo) // batch_size
        else:
            assert all(len(b) == batch_size for b in batches[:-1])
        rows = torch.cat(batches) if batches else torch.zeros(0, x.shape[1])
        ids = rows[:, 0].long().tolist()
        assert len(set(ids)) == len(ids) and set(ids) <= set(range(lo, hi))  # each row at most once
        if not drop_last:
            assert sorted(ids) == list(range(lo, hi))  # ... and every row of the split exactly once
        torch.testing.assert_close(rows, x[rows[:, 0].long()], rtol=0, atol=0)  # whole rows, unchanged
        if not shuffle:
            assert ids == sorted(ids)
        again = list(store.batches(batch_size, split=split, shuffle=shuffle, seed=seed, shuffle_tokens=shuffle_tokens,
                                   drop_last=drop_last))
        assert len(again) == len(batches) and all(torch.equal(a, b) for a, b in zip(again, batches))



@SETTINGS
@given(stores())
def test_every_store_the_writer_makes_opens_within_a_budget_of_one_chunk_and_can_be_replaced(example):
    x, bounds, dtype, chunk_tokens, compressor = example
    with tempfile.TemporaryDirectory() as tmp:
        store = _write(x, bounds, dtype, chunk_tokens, compressor, Path(tmp))
        chunk_bytes = chunk_tokens * x.shape[1] * (4 if dtype == "float32" else 2)
        assert len(ActivationStore.open(store.path, max_chunk_bytes=chunk_bytes)) == len(x)
        with pytest.raises(SAERegistryError, match="over the budget"):
            ActivationStore.open(store.path, max_chunk_bytes=chunk_bytes - 1)
        with ActivationStore.create(store.path, d=x.shape[1], chunk_tokens=chunk_tokens, overwrite=True) as again:
            again.append(x[:2])  # --overwrite deletes a store: it is one of ours
        assert len(ActivationStore.open(store.path)) == 2
