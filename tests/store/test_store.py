import json

import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAERegistryError


def _rows(n: int, d: int = 8) -> torch.Tensor:
    """Row i starts with the value i, so a row tells which token it is."""
    x = torch.randn(n, d)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x


def _make(path, x, **kw):
    with ActivationStore.create(path, d=x.shape[1], **kw) as store:
        for part in x.split(333):  # appends that do not line up with chunks
            store.append(part)
    return ActivationStore.open(path)


def test_round_trip_and_metadata(tmp_path):
    x = _rows(5000)
    store = _make(tmp_path / "s.zarr", x, chunk_tokens=1024, source={"model": "m", "layer": 2})
    assert len(store) == 5000 and store.d == 8
    torch.testing.assert_close(store.read(), x)
    torch.testing.assert_close(store.mean, x.double().mean(0).float())
    assert store.mean_norm == pytest.approx(float(x.double().norm(dim=1).mean()), rel=1e-9)
    assert store.source == {"model": "m", "layer": 2}
    meta = store.metadata
    assert meta["status"] == "complete" and meta["dtype"] == "float32" and meta["n_tokens"] == 5000
    assert len(store.fingerprint) == 16
    assert "created_at" in meta and "finished_at" in meta


def test_fingerprint_depends_on_content_only(tmp_path):
    x = _rows(3000)
    a = _make(tmp_path / "a.zarr", x, chunk_tokens=512)
    b = _make(tmp_path / "b.zarr", x, chunk_tokens=700)
    y = x.clone()
    y[1234, 5] += 1e-3
    c = _make(tmp_path / "c.zarr", y, chunk_tokens=512)
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_half_precision_stores(tmp_path, dtype, tol):
    x = torch.randn(2000, 8)
    store = _make(tmp_path / "s.zarr", x, chunk_tokens=512, dtype=dtype)
    back = store.read()
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    batch = next(store.batches(100, shuffle=False))
    torch.testing.assert_close(batch, back[:100])


@pytest.mark.parametrize("compressor", ["lz4", "zstd", "none"])
def test_compressors(tmp_path, compressor):
    x = _rows(1500)
    torch.testing.assert_close(_make(tmp_path / "s.zarr", x, chunk_tokens=256, compressor=compressor).read(), x)


def test_splits_are_disjoint_and_cover_the_store(tmp_path):
    store = _make(tmp_path / "s.zarr", _rows(4000), chunk_tokens=512, eval_fraction=0.1)
    assert store.num_tokens("train") == 3600 and store.num_tokens("eval") == 400
    ids = store.read_split("eval")[:, 0].long()
    assert torch.equal(ids, torch.arange(3600, 4000))
    assert len(store.read_split("eval", max_tokens=50)) == 50


@pytest.mark.parametrize("batch_size", [100, 512, 777])
def test_shuffled_batches_cover_every_token_exactly_once_per_epoch(tmp_path, batch_size):
    store = _make(tmp_path / "s.zarr", _rows(5000), chunk_tokens=512, eval_fraction=0.1)
    batches = list(store.batches(batch_size, seed=3, shuffle_tokens=1500))
    assert all(len(b) == batch_size for b in batches[:-1])
    ids = torch.cat(batches)[:, 0].long()
    assert sorted(ids.tolist()) == list(range(store.num_tokens("train")))
    assert not torch.equal(ids, torch.sort(ids).values)  # it is shuffled
    eval_ids = torch.cat(list(store.batches(batch_size, split="eval", seed=3)))[:, 0].long()
    assert sorted(eval_ids.tolist()) == list(range(4500, 5000))


def test_the_shuffle_window_grows_with_the_store_up_to_its_budget(tmp_path, monkeypatch):
    from sae_registry.store import reader as S

    store = _make(tmp_path / "s.zarr", _rows(5000), chunk_tokens=256, eval_fraction=0.1)
    assert store.shuffle_window(100) == 4500  # the whole training split fits the default budget

    def chunks_per_batch(**options):
        return [len(set((b[:, 0].long() // 256).tolist())) for b in store.batches(100, seed=0, **options)]

    # a window of two chunks: the first batch draws from the two chunks the buffer holds, and later
    # batches from few more (rows stay in the buffer until drawn)
    assert store.shuffle_window(100, shuffle_tokens=512) == 512
    small = chunks_per_batch(shuffle_tokens=512)
    assert small[0] <= 2
    # the whole split in the buffer: every batch draws from across the store (a full shuffle)
    full = chunks_per_batch()
    assert min(full) >= 12 and np.mean(full) > 2 * np.mean(small)
    # the budget is in bytes: 8 columns of float32 are 32 bytes a row
    monkeypatch.setattr(S, "SHUFFLE_BYTES", 32 * 1000)
    assert store.shuffle_window(100) == 1000 and store.shuffle_window(1000) == 1256  # at least a chunk and a batch
    assert chunks_per_batch()[0] <= 3


def test_batches_are_reproducible_per_seed_and_differ_across_seeds(tmp_path):
    store = _make(tmp_path / "s.zarr", _rows(3000), chunk_tokens=256)
    first = [b[:, 0] for b in store.batches(256, seed=1)]
    again = [b[:, 0] for b in store.batches(256, seed=1)]
    other = [b[:, 0] for b in store.batches(256, seed=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    ordered = torch.cat(list(store.batches(256, shuffle=False)))[:, 0]
    assert torch.equal(ordered, torch.arange(store.num_tokens("train"), dtype=torch.float32))


def test_drop_last_and_early_stop(tmp_path):
    store = _make(tmp_path / "s.zarr", _rows(3000), chunk_tokens=256)
    assert all(len(b) == 1000 for b in store.batches(1000, drop_last=True))
    gen = store.batches(10)
    next(gen)
    gen.close()  # stopping early ends the background reader without hanging


def test_interrupted_store_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="harvest died"):
        with ActivationStore.create(path, d=8, chunk_tokens=100) as store:
            store.append(_rows(450))
            raise RuntimeError("harvest died")
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open(path)
    # a writer that was killed (never closed at all) is refused the same way
    store = ActivationStore.create(tmp_path / "t.zarr", d=8, chunk_tokens=100)
    store.append(_rows(450))
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open(tmp_path / "t.zarr")


def test_damaged_store_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    _make(path, _rows(1000), chunk_tokens=100)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["n_tokens"] = 2000
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SAERegistryError, match="damaged"):
        ActivationStore.open(path)


def test_missing_and_foreign_stores_are_refused(tmp_path):
    with pytest.raises(SAERegistryError, match="no activation store"):
        ActivationStore.open(tmp_path / "nothing.zarr")
    import zarr

    zarr.create_group(store=str(tmp_path / "other.zarr"), zarr_format=3).create_array("activations", shape=(4, 2), dtype="float32")
    with pytest.raises(SAERegistryError, match="not an sae-registry activation store"):
        ActivationStore.open(tmp_path / "other.zarr")


def test_bad_appends_and_options(tmp_path):
    store = ActivationStore.create(tmp_path / "s.zarr", d=8)
    with pytest.raises(SAERegistryError, match=r"shape \[n, 8\]"):
        store.append(torch.zeros(4, 7))
    bad = torch.zeros(4, 8)
    bad[1, 1] = float("nan")
    with pytest.raises(SAERegistryError, match="NaN or Inf"):
        store.append(bad)
    with pytest.raises(SAERegistryError, match="NaN or Inf"):
        ActivationStore.create(tmp_path / "h.zarr", d=8, dtype="float16").append(np.full((2, 8), 1e6))
    with pytest.raises(SAERegistryError, match="already exists"):
        ActivationStore.create(tmp_path / "s.zarr", d=8)
    with pytest.raises(SAERegistryError, match="d must be a positive integer"):
        ActivationStore.create(tmp_path / "x.zarr", d=0)
    with pytest.raises(SAERegistryError, match="dtype must be one of"):
        ActivationStore.create(tmp_path / "x.zarr", d=8, dtype="int8")
    with pytest.raises(SAERegistryError, match="at least 2 tokens"):
        ActivationStore.create(tmp_path / "e.zarr", d=8).close()
    done = _make(tmp_path / "ok.zarr", _rows(100))
    with pytest.raises(SAERegistryError, match="open for reading"):
        done.append(_rows(3))
    with pytest.raises(SAERegistryError, match="batch_size"):
        next(done.batches(0))
    with pytest.raises(SAERegistryError, match="split must be"):
        done.read_split("test")


def test_overwrite_replaces(tmp_path):
    _make(tmp_path / "s.zarr", _rows(100))
    store = _make(tmp_path / "s.zarr", _rows(200), overwrite=True)
    assert len(store) == 200


def _provenance(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    i = np.arange(offset, offset + n)
    return {"token_id": 1000 + i, "seq": i // 7, "pos": i % 7 + 1}


def test_provenance_stays_aligned_with_rows_across_chunks(tmp_path):
    x = _rows(2500)
    path = tmp_path / "p.zarr"
    with ActivationStore.create(path, d=8, chunk_tokens=512, provenance=True) as store:
        for start in range(0, 2500, 333):  # appends that do not line up with chunks
            part = x[start : start + 333]
            store.append(part, _provenance(len(part), start))
    store = ActivationStore.open(path)
    assert store.has_provenance
    want = _provenance(2500)
    prov = store.provenance()
    assert {k: v.dtype.name for k, v in prov.items()} == {"token_id": "int32", "seq": "int64", "pos": "int32"}
    for name in ("token_id", "seq", "pos"):
        np.testing.assert_array_equal(prov[name], want[name])
    # row i holds the value i in column 0 and token 1000 + i: aligned, chunk by chunk
    np.testing.assert_array_equal(store.provenance(900, 1100)["token_id"] - 1000, store.read(900, 1100)[:, 0].numpy())
    plain = _make(tmp_path / "plain.zarr", x, chunk_tokens=512)
    # the fingerprint is the activations': a re-harvest with provenance matches dictionaries trained before
    assert store.fingerprint == plain.fingerprint


def test_stores_without_provenance_open_and_say_so(tmp_path):
    import hashlib

    x = _rows(1000)
    store = _make(tmp_path / "s.zarr", x, chunk_tokens=256)
    assert not store.has_provenance
    expected = hashlib.sha256(b"8:float32:" + x.numpy().tobytes()).hexdigest()[:16]
    assert store.fingerprint == expected  # unchanged by the provenance feature
    with pytest.raises(SAERegistryError, match="without token provenance.*re-harvest"):
        store.provenance()
    # a store written before provenance existed has no "provenance" attribute at all
    meta = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["provenance"]
    meta.write_text(json.dumps(doc))
    old = ActivationStore.open(tmp_path / "s.zarr")
    assert not old.has_provenance and len(old) == 1000 and old.fingerprint == expected
    torch.testing.assert_close(old.read(), x)
    assert sum(len(b) for b in old.batches(300)) == old.num_tokens("train")
    with pytest.raises(SAERegistryError, match="without token provenance"):
        old.provenance(0, 10)


def test_provenance_appends_are_checked(tmp_path):
    x = _rows(10)
    with ActivationStore.create(tmp_path / "a.zarr", d=8, provenance=True) as store:
        with pytest.raises(SAERegistryError, match="keeps token provenance.*got nothing"):
            store.append(x)
        with pytest.raises(SAERegistryError, match="must be 10 integers"):
            store.append(x, {**_provenance(10), "pos": np.zeros(9, dtype=np.int64)})
        with pytest.raises(SAERegistryError, match="must be 10 integers"):
            store.append(x, {**_provenance(10), "seq": np.zeros(10)})
        store.append(x, _provenance(10))
    assert len(ActivationStore.open(tmp_path / "a.zarr")) == 10
    with ActivationStore.create(tmp_path / "b.zarr", d=8) as store:
        with pytest.raises(SAERegistryError, match="created without token provenance"):
            store.append(x, _provenance(10))
        store.append(x)


def test_store_with_a_missing_provenance_array_is_refused(tmp_path):
    import shutil

    with ActivationStore.create(tmp_path / "s.zarr", d=8, provenance=True) as store:
        store.append(_rows(10), _provenance(10))
    shutil.rmtree(tmp_path / "s.zarr" / "pos")
    with pytest.raises(SAERegistryError, match="'pos' array is missing"):
        ActivationStore.open(tmp_path / "s.zarr")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_chunk_check_finds_nan_and_inf_in_every_dtype(dtype):
    from sae_registry.store.layout import finite, to_numpy

    fine = to_numpy(torch.tensor([[1.0, -2.0], [65000.0, 0.0]]), dtype)
    assert finite(fine, dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not finite(to_numpy(torch.tensor([[1.0, bad]]), dtype), dtype)


def test_stores_are_uncompressed_by_default(tmp_path):
    """Measured default (benchmarks/store_speed.py): compression saves 6-8% on real activations
    and costs 20-40% of read speed."""
    store = _make(tmp_path / "s.zarr", _rows(1000), chunk_tokens=256)
    assert store.metadata["compressor"] == "none"
    assert store._array.compressors == ()


# -- stores written by someone else ---------------------------------------------------------------


def _set_chunk_rows(path, rows: int) -> None:
    """Rewrite a store's metadata as another tool could: its activations in chunks of ``rows`` rows."""
    meta = path / "activations" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = rows
    meta.write_text(json.dumps(doc))
    group = json.loads((path / "zarr.json").read_text())
    group["attributes"]["chunk_tokens"] = rows
    (path / "zarr.json").write_text(json.dumps(group))


def test_a_chunk_far_larger_than_the_store_is_refused_before_any_read(tmp_path):
    # a few KB on disk whose single 2^25-row chunk would cost 2 GiB to decode for a two-row read
    path = tmp_path / "bomb.zarr"
    _make(path, _rows(8, d=16), chunk_tokens=8)
    _set_chunk_rows(path, 2**25)
    with pytest.raises(SAERegistryError, match=r"refusing its chunk shape \(33554432, 16\).*more rows than the whole store"):
        ActivationStore.open(path)


def test_chunks_are_bounded_by_a_memory_budget_and_must_match_the_metadata(tmp_path):
    path = tmp_path / "s.zarr"
    _make(path, _rows(3000), chunk_tokens=1024)  # 32 KiB per chunk
    assert len(ActivationStore.open(path, max_chunk_bytes=32 * 1024)) == 3000
    with pytest.raises(SAERegistryError, match=r"chunk shape \(1024, 8\).*over the budget"):
        ActivationStore.open(path, max_chunk_bytes=32 * 1024 - 1)
    group = json.loads((path / "zarr.json").read_text())
    group["attributes"]["chunk_tokens"] = 512  # the reader would cut batches at the wrong rows
    (path / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(SAERegistryError, match=r"chunk shape \(1024, 8\).*metadata says chunks of \(512, 8\)"):
        ActivationStore.open(path)


def test_a_small_store_in_default_chunks_still_opens(tmp_path):
    # the default chunk holds more rows than a small store: allowed up to the default's size
    store = _make(tmp_path / "s.zarr", _rows(100, d=384))
    assert store._array.chunks == (8192, 384) and len(store) == 100


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/acts.zarr", "memory://acts.zarr", "file:///tmp/acts.zarr",
                                 "simplecache::s3://b/acts.zarr", "ftp://host/acts.zarr"])
def test_only_local_paths_and_object_stores_are_read(url):
    with pytest.raises(SAERegistryError, match=r"is not a place sae-registry reads stores from"):
        ActivationStore.open(url)


def test_a_store_behind_a_refused_url_is_never_fetched(tmp_path):
    """A store a registry tag points at over plain HTTP (or fsspec's memory://) is refused, not read."""
    import http.server
    import threading

    import fsspec

    path = tmp_path / "s.zarr"
    _make(path, _rows(100))
    memory = fsspec.filesystem("memory")
    memory.put(str(path), "/there.zarr", recursive=True)
    with pytest.raises(SAERegistryError, match="memory:// is not a place"):
        ActivationStore.open("memory://there.zarr")

    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            requests.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SAERegistryError, match="http:// is not a place"):
            ActivationStore.open(f"http://127.0.0.1:{server.server_address[1]}/s.zarr")
    finally:
        server.shutdown()
    assert requests == []
    with pytest.raises(SAERegistryError, match=r"give a plain path"):
        ActivationStore.open(f"file://{path}")


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 in this process, on a free loopback port; yields an s3fs filesystem on it."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    try:
        yield s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}, skip_instance_cache=True)
    finally:
        server.stop()


def test_a_store_on_s3_with_a_missing_chunk_is_refused(tmp_path, s3):
    path = tmp_path / "s.zarr"
    _make(path, _rows(1000), chunk_tokens=100)
    s3.mkdir("stores")
    s3.put(str(path), "stores/whole.zarr", recursive=True)
    assert len(ActivationStore.open("s3://stores/whole.zarr")) == 1000
    (path / "activations" / "c" / "3" / "0").unlink()  # lost in the copy
    s3.put(str(path), "stores/cut.zarr", recursive=True)
    with pytest.raises(SAERegistryError, match=r"cut.zarr is damaged: 1 of the 10 chunk files of activations/ are missing"):
        ActivationStore.open("s3://stores/cut.zarr")


# -- --overwrite deletes only what our tools made -------------------------------------------------


def test_overwrite_refuses_folders_that_are_not_stores(tmp_path):
    import zarr

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    foreign = tmp_path / "foreign.zarr"
    zarr.create_group(store=str(foreign), zarr_format=3).create_array("activations", shape=(4, 2), dtype="float32")
    mixed = tmp_path / "mixed.zarr"
    _make(mixed, _rows(100))
    (mixed / "thesis.tex").write_text("put here by hand")
    (tmp_path / "file.zarr").write_text("a file")
    for path, why in [(notes, "does not mark it"), (foreign, "does not mark it"), (mixed, "also holds thesis.tex"),
                      (tmp_path / "file.zarr", "not a folder")]:
        with pytest.raises(SAERegistryError, match=f"was not made by sae-registry.*{why}.*refusing to delete"):
            ActivationStore.create(path, d=8, overwrite=True)
    assert (notes / "thesis.tex").read_text() == "years of work" and (mixed / "thesis.tex").exists()
    assert (foreign / "zarr.json").exists() and (tmp_path / "file.zarr").read_text() == "a file"


def test_overwrite_replaces_an_unfinished_store(tmp_path):
    ActivationStore.create(tmp_path / "s.zarr", d=8, chunk_tokens=100, provenance=True).append(
        _rows(250), _provenance(250))  # a harvest that died
    assert len(_make(tmp_path / "s.zarr", _rows(300), overwrite=True)) == 300


def test_the_writer_is_a_separate_object_from_the_reader(tmp_path):
    from sae_registry.store.writer import StoreWriter

    with ActivationStore.create(tmp_path / "s.zarr", d=8, chunk_tokens=100) as writer:
        assert isinstance(writer, StoreWriter) and not isinstance(writer, ActivationStore)
        writer.append(_rows(250))
        assert len(writer) == 200  # whole chunks on disk; 50 rows pending
    assert len(writer) == 250 and writer.metadata["status"] == "complete"
    with pytest.raises(SAERegistryError, match="finished"):
        writer.append(_rows(3))
    reader = ActivationStore.open(tmp_path / "s.zarr")
    assert reader.fingerprint == writer.metadata["fingerprint"]


@pytest.mark.parametrize("made", [[], ["activations"], ["activations", "token_id"]])
def test_a_writer_killed_inside_create_leaves_a_store_that_resumes(tmp_path, made):
    """Killed between writing the group and its arrays: reopen() makes the missing ones, nothing is lost."""
    import shutil

    cut = tmp_path / "cut.zarr"
    ActivationStore.create(cut, d=8, chunk_tokens=16, provenance=True)  # never closed: still "writing"
    for name in ("activations", "token_id", "seq", "pos"):
        if name not in made:
            shutil.rmtree(cut / name)
    x, prov = _rows(40), _provenance(40)
    with ActivationStore.reopen(cut) as store:
        assert len(store) == 0
        store.append(x, prov)
    resumed = ActivationStore.open(cut)
    assert np.array_equal(resumed.read(0, 40).numpy(), x.numpy())
    for name, values in prov.items():
        assert np.array_equal(resumed.provenance()[name], values), name
