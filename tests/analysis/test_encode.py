import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAERegistryError, SparseAutoencoder
from sae_registry.analysis.encode import dense_codes, encode_store, open_codes

N = 1037  # no batch size below divides it, so every run ends on a short batch


@pytest.fixture
def store(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(N, 16)
    with ActivationStore.create(tmp_path / "acts.zarr", d=16, chunk_tokens=100) as s:
        for part in x.split(333):
            s.append(part)
    return ActivationStore.open(tmp_path / "acts.zarr")


def _sae(**kw) -> SparseAutoencoder:
    torch.manual_seed(1)
    return SparseAutoencoder.build(16, 64, **kw)


def _check_codes(got: torch.Tensor, sae: SparseAutoencoder, x: torch.Tensor, batch_size: int) -> None:
    """Bit-exact against ``encode`` over the same batches; close to one ``encode`` of everything.

    CPU matmul kernels may round a 7-row batch a few ulps differently from a 1000-row one, so
    exactness is only promised batch for batch.
    """
    with torch.no_grad():
        assert torch.equal(got, torch.cat([sae.encode(b) for b in x.split(batch_size)]))
        torch.testing.assert_close(got, sae.encode(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [128, 300])
def test_top_k_codes_match_encode(tmp_path, store, batch_size):
    sae = _sae(top_k=4)
    out = encode_store(
        sae, store, tmp_path / "codes.zarr", batch_size=batch_size, progress=False,
        attrs={"dictionary": "toy", "version": 3},
    )
    attrs, arrays = open_codes(out)
    assert set(arrays) == {"values", "indices"}
    assert arrays["values"].shape == (N, 4) and arrays["values"].dtype == np.float32
    assert arrays["indices"].shape == (N, 4) and arrays["indices"].dtype == np.int32
    assert arrays["values"].chunks == (batch_size, 4)
    indices = arrays["indices"][:]
    assert (np.diff(indices, axis=1) > 0).all()  # sorted ascending, no repeats
    got = dense_codes(out)
    _check_codes(got, sae, store.read(), batch_size)
    assert torch.equal(dense_codes(out, 250, 700), got[250:700])
    assert attrs["format"] == "sae-registry/codes" and attrs["status"] == "complete"
    assert (attrs["sparsity"], attrs["dict_size"], attrs["top_k"]) == ("top_k", 64, 4)
    assert (attrs["n_tokens"], attrs["split"]) == (N, "all")
    assert attrs["store_fingerprint"] == store.fingerprint
    assert attrs["store_path"] == str(store.path)
    assert (attrs["dictionary"], attrs["version"]) == ("toy", 3)


def test_l1_codes_are_dense_and_match_encode(tmp_path, store):
    sae = _sae(sparsity="l1")
    out = encode_store(sae, store, tmp_path / "codes.zarr", batch_size=200, progress=False)
    attrs, arrays = open_codes(out)
    assert set(arrays) == {"codes"} and attrs["sparsity"] == "l1"
    assert arrays["codes"].shape == (N, 64) and arrays["codes"].dtype == np.float32
    _check_codes(dense_codes(out), sae, store.read(), 200)


def test_eval_split_encodes_only_eval_tokens(tmp_path, store):
    sae = _sae(top_k=4)
    out = encode_store(sae, store, tmp_path / "codes.zarr", split="eval", batch_size=7, progress=False)
    attrs, arrays = open_codes(out)
    n_eval = store.num_tokens("eval")
    assert attrs["n_tokens"] == n_eval and attrs["split"] == "eval" and arrays["values"].shape == (n_eval, 4)
    _check_codes(dense_codes(out), sae, store.read_split("eval"), 7)


def test_existing_output_needs_overwrite(tmp_path, store):
    sae = _sae(top_k=4)
    out = encode_store(sae, store, tmp_path / "codes.zarr", split="eval", progress=False)
    with pytest.raises(SAERegistryError, match="already exists; pass overwrite=True"):
        encode_store(sae, store, out, progress=False)
    encode_store(sae, store, out, overwrite=True, progress=False)
    assert open_codes(out)[0]["n_tokens"] == N


def test_width_mismatch_and_bad_options_are_refused(tmp_path, store):
    with pytest.raises(SAERegistryError, match=r"16-wide.*input_size=32"):
        encode_store(SparseAutoencoder.build(32, 64, top_k=4), store, tmp_path / "c.zarr")
    with pytest.raises(SAERegistryError, match="split must be"):
        encode_store(_sae(top_k=4), store, tmp_path / "c.zarr", split="test")
    with pytest.raises(SAERegistryError, match=r"attrs may not set \['split'\]"):
        encode_store(_sae(top_k=4), store, tmp_path / "c.zarr", attrs={"split": "x"})
    assert not (tmp_path / "c.zarr").exists()  # nothing is written before the checks pass


def test_unfinished_codes_are_refused(tmp_path, store, monkeypatch):
    sae = _sae(top_k=4)
    real, calls = sae.encode_topk, []

    def dies_on_third_batch(x):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("encoder died")
        return real(x)

    monkeypatch.setattr(sae, "encode_topk", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="encoder died"):
        encode_store(sae, store, tmp_path / "codes.zarr", batch_size=100, progress=False)
    with pytest.raises(SAERegistryError, match="never finished"):
        open_codes(tmp_path / "codes.zarr")
    with pytest.raises(SAERegistryError, match="no codes at"):
        open_codes(tmp_path / "missing.zarr")


def test_sae_sha256_is_the_checksum_of_the_weights_file(tmp_path, store):
    import hashlib

    from sae_registry.model.files import WEIGHTS_FILE

    _sae(top_k=4).save(tmp_path / "d")
    sae = SparseAutoencoder.load(tmp_path / "d")  # as the registry hands it out
    attrs, _ = open_codes(encode_store(sae, store, tmp_path / "codes.zarr", progress=False))
    # the registry records the same digest for a version as its sha256.sae.safetensors tag
    assert attrs["sae_sha256"] == hashlib.sha256((tmp_path / "d" / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert attrs["format_version"] == 2


@pytest.mark.parametrize("sparsity", ["top_k", "l1"])
def test_read_codes_gives_the_stored_arrays(tmp_path, store, sparsity):
    import sae_registry
    from sae_registry.analysis.encode import read_codes

    assert sae_registry.read_codes is read_codes  # the package's public reader

    sae = _sae(top_k=4) if sparsity == "top_k" else _sae(sparsity="l1")
    out = encode_store(sae, store, tmp_path / "codes.zarr", batch_size=128, progress=False)
    _, arrays = open_codes(out)
    got = read_codes(out, 100, 300)
    assert set(got) == set(arrays)
    for name, tensor in got.items():
        assert tensor.shape[0] == 200 and np.array_equal(tensor.numpy(), arrays[name][100:300])
    if sparsity == "top_k":
        assert got["indices"].dtype == torch.int64 and got["values"].dtype == torch.float32
        dense = torch.zeros(200, 64).scatter_(-1, got["indices"], got["values"])
        assert torch.equal(dense, dense_codes(out, 100, 300))
    else:
        assert torch.equal(got["codes"], dense_codes(out)[100:300])
    assert all(len(t) == N for t in read_codes(out).values())
    for bad in ({"start": -1}, {"start": 10, "stop": 5}, {"stop": N + 1}, {"start": 1.5}):
        with pytest.raises(SAERegistryError, match="start|stop"):
            read_codes(out, **bad)


def test_codes_written_by_someone_else_are_checked(tmp_path, store):
    import json

    import zarr

    out = encode_store(_sae(top_k=4), store, tmp_path / "codes.zarr", batch_size=128, progress=False)
    # an index past dict_size: dense_codes would fail inside torch's scatter
    indices = zarr.open_array(str(out / "indices"), mode="r+")
    indices[5, 0] = 64
    with pytest.raises(SAERegistryError, match=r"damaged: indices/ outside \[0, 64\) in rows 0-1037"):
        dense_codes(out)
    # chunks far larger than the file: one row read would decode them whole
    meta = out / "values" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**26
    meta.write_text(json.dumps(doc))
    with pytest.raises(SAERegistryError, match=r"damaged or not ours: values/ is \(1037, 4\) in chunks \(67108864, 4\)"):
        open_codes(out)


def test_overwrite_replaces_only_codes(tmp_path, store):
    sae = _sae(top_k=4)
    # an activation store is ours too, but not codes: encoding over it would lose the activations
    with pytest.raises(SAERegistryError, match="not made by sae-registry as 'sae-registry/codes'"):
        encode_store(sae, store, store.path, overwrite=True, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for path in (tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(SAERegistryError, match="refusing to delete it"):
            encode_store(sae, store, path, overwrite=True, progress=False)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert len(ActivationStore.open(store.path)) == N
