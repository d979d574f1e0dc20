import json

import pytest
import torch

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder, SparseEncoder
from sae_registry.architectures.base import auxk_loss


def test_top_k_shapes_and_at_most_k_nonzeros_per_row():
    sae = SparseAutoencoder.build(input_size=16, dict_size=64, top_k=5)
    x = torch.randn(32, 16)
    h = sae.encode(x)
    assert h.shape == (32, 64)
    assert ((h != 0).sum(-1) <= 5).all()
    assert (h >= 0).all()
    assert sae(x).shape == (32, 16)
    assert SparseAutoencoder.output_size(input_size=16, dict_size=64) == 16


def test_top_k_keeps_the_largest_activations():
    sae = SparseAutoencoder.build(8, 32, top_k=4)
    x = torch.randn(10, 8)
    pre = sae.encoder.pre_acts(x * sae.input_scale)
    h = sae.encode(x)
    kth_largest = pre.topk(4, dim=-1).values[:, -1:]
    assert torch.equal(h != 0, (pre >= kth_largest) & (pre > 0))


def test_forward_is_decode_of_encode_and_compact_form_agrees():
    sae = SparseAutoencoder.build(16, 64, top_k=8)
    with torch.no_grad():
        sae.encoder.input_scale.fill_(0.5)
        sae.b_dec.normal_()
    x = torch.randn(7, 16)
    h = sae.encode(x)
    torch.testing.assert_close(sae(x), sae.decode(h))
    values, indices = sae.encode_topk(x)
    assert values.shape == indices.shape == (7, 8)
    torch.testing.assert_close(sae.decode_topk(values, indices), sae.decode(h))
    torch.testing.assert_close(torch.zeros(7, 64).scatter(-1, indices, values), h)


def test_leading_batch_dimensions_are_kept():
    sae = SparseAutoencoder.build(16, 32, top_k=4)
    x = torch.randn(2, 3, 16)
    assert sae.encode(x).shape == (2, 3, 32)
    assert sae(x).shape == (2, 3, 16)


def test_l1_mode_is_dense_relu():
    sae = SparseAutoencoder.build(16, 64, top_k=4, sparsity="l1")
    x = torch.randn(50, 16)
    h = sae.encode(x)
    torch.testing.assert_close(h, torch.relu(sae.encoder.encoder(x - sae.b_dec)))
    assert ((h != 0).sum(-1) > 4).any()  # no hard sparsity
    with pytest.raises(SAERegistryError, match="top_k"):
        sae.encode_topk(x)


def test_build_encoder_returns_sparse_codes_only():
    enc = SparseAutoencoder.build_encoder(input_size=16, dict_size=64, top_k=3)
    assert isinstance(enc, SparseEncoder)
    h = enc(torch.randn(9, 16))
    assert h.shape == (9, 64)
    assert ((h != 0).sum(-1) <= 3).all()
    assert not any("W_dec" in name for name, _ in enc.named_parameters())


def test_loss_equals_its_definition():
    x, recon = torch.randn(6, 10), torch.randn(6, 10)
    h = torch.relu(torch.randn(6, 40))
    expected = ((recon - x) ** 2).mean() + 0.01 * h.abs().sum(-1).mean()
    torch.testing.assert_close(SparseAutoencoder.loss(x, recon, h, l1_coeff=0.01), expected)
    torch.testing.assert_close(SparseAutoencoder.loss(x, recon, h), ((recon - x) ** 2).mean() + 1e-3 * h.sum(-1).mean())
    torch.testing.assert_close(SparseAutoencoder.loss(x, recon, h, l1_coeff=0), ((recon - x) ** 2).mean())
    # the compact top-k values give the same L1 as the dense codes
    sae = SparseAutoencoder.build(10, 40, top_k=5)
    values, _ = sae.encode_topk(x)
    torch.testing.assert_close(
        SparseAutoencoder.loss(x, recon, values, 0.1), SparseAutoencoder.loss(x, recon, sae.encode(x), 0.1)
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(input_size=0), "input_size must be a positive integer"),
        (dict(input_size=-3), "input_size must be a positive integer"),
        (dict(input_size=2.5), "input_size must be a positive integer"),
        (dict(input_size=True), "input_size must be a positive integer"),
        (dict(input_size=8, dict_size=0), "dict_size must be a positive integer"),
        (dict(input_size=8, dict_size="64"), "dict_size must be a positive integer"),
        (dict(input_size=8, top_k=0), "top_k must be a positive integer"),
        (dict(input_size=8, dict_size=16, top_k=17), r"top_k \(17\) cannot exceed dict_size \(16\)"),
        (dict(input_size=8, sparsity="l2"), "sparsity must be one of top_k, l1"),
    ],
)
def test_bad_options_raise_our_error(options, message):
    with pytest.raises(SAERegistryError, match=message):
        SparseAutoencoder.build(**options)
    with pytest.raises(SAERegistryError, match=message):
        SparseAutoencoder.build_encoder(**options)


def test_l1_mode_allows_top_k_above_dict_size():
    # k is meaningless without hard sparsity, so it is not checked against dict_size
    assert SparseAutoencoder.build(8, 16, top_k=32, sparsity="l1").cfg.sparsity == "l1"


def test_output_size_validates():
    with pytest.raises(SAERegistryError, match="input_size"):
        SparseAutoencoder.output_size(input_size=0)
    with pytest.raises(SAERegistryError, match="input_size must be <= 65536"):
        SparseAutoencoder.output_size(input_size=2**20)


def test_the_seed_api_refuses_absurd_shapes_before_allocating():
    with pytest.raises(SAERegistryError, match="dict_size must be <= 16777216"):
        SparseAutoencoder.build(8, dict_size=10**12, top_k=4)
    with pytest.raises(SAERegistryError, match="input_size must be <= 65536"):
        SparseAutoencoder.build_encoder(10**9, dict_size=16, top_k=4)


@pytest.mark.parametrize("l1_coeff, message", [(-1.0, "l1_coeff must be >= 0"), (float("nan"), "finite number"),
                                               ("0.1", "finite number")])
def test_loss_checks_its_coefficient(l1_coeff, message):
    x = torch.randn(4, 8)
    with pytest.raises(SAERegistryError, match=message):
        SparseAutoencoder.loss(x, x, torch.zeros(4, 16), l1_coeff=l1_coeff)
    with pytest.raises(SAERegistryError, match="hidden_acts must be a torch.Tensor"):
        SparseAutoencoder.loss(x, x, [0.0])


@pytest.mark.parametrize("method", ["encode", "forward", "encode_topk"])
def test_bad_inputs_raise_our_error(method):
    sae = SparseAutoencoder.build(8, 32, top_k=4)
    call = getattr(sae, method)
    with pytest.raises(SAERegistryError, match="last dimension 8"):
        call(torch.randn(4, 9))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 8)
        x[2, 3] = bad
        with pytest.raises(SAERegistryError, match="NaN or Inf"):
            call(x)
    with pytest.raises(SAERegistryError, match="torch.Tensor"):
        call([[0.0] * 8])


def test_decode_checks_code_width():
    sae = SparseAutoencoder.build(8, 32, top_k=4)
    with pytest.raises(SAERegistryError, match="last dimension 32"):
        sae.decode(torch.zeros(3, 31))


def test_loss_checks_shapes():
    with pytest.raises(SAERegistryError, match="same shape"):
        SparseAutoencoder.loss(torch.zeros(4, 8), torch.zeros(4, 7), torch.zeros(4, 16))
    with pytest.raises(SAERegistryError, match="batch shape"):
        SparseAutoencoder.loss(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(5, 16))


def test_init_is_unit_norm_decoder_with_encoder_its_transpose():
    sae = SparseAutoencoder.build(16, 64, top_k=4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.encoder.encoder.weight, sae.W_dec)


def test_parallel_gradient_removal_and_renormalisation_keep_unit_norm():
    sae = SparseAutoencoder.build(16, 64, top_k=4)
    x = torch.randn(32, 16)
    SparseAutoencoder.loss(x, sae(x), sae.encode(x)).backward()
    sae.remove_parallel_grads_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_loss_only_trains_dead_latents():
    sae = SparseAutoencoder.build(16, 64, top_k=4)
    x = torch.randn(32, 16)
    out = sae.forward_train(x)
    no_dead = torch.zeros(64, dtype=torch.bool)
    assert auxk_loss(sae, x, out, no_dead, k_aux=8) == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    loss = auxk_loss(sae, x, out, dead, k_aux=8)
    assert loss > 0
    loss.backward()
    grad_rows = sae.W_dec.grad.abs().sum(-1) > 0
    assert grad_rows[:20].any() and not grad_rows[20:].any()


def test_save_and_load_round_trip(tmp_path):
    sae = SparseAutoencoder.build(16, 64, top_k=4)
    with torch.no_grad():
        sae.encoder.input_scale.fill_(1.7)
        sae.b_dec.normal_()
    sae.save(tmp_path / "d", extra={"note": "hello"})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "sae.safetensors"]
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["sae"] == {"input_size": 16, "dict_size": 64, "top_k": 4, "sparsity": "top_k"}
    assert config["note"] == "hello"
    loaded = SparseAutoencoder.load(tmp_path / "d")
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x), sae(x))


def test_load_refuses_broken_dictionaries(tmp_path):
    with pytest.raises(SAERegistryError, match="no sae.safetensors"):
        SparseAutoencoder.load(tmp_path)
    SparseAutoencoder.build(16, 64, top_k=4).save(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["sae"]["dict_size"] = 32
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SAERegistryError, match="has shape"):
        SparseAutoencoder.load(tmp_path / "d")
    (tmp_path / "d" / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SAERegistryError, match="not a readable safetensors"):
        SparseAutoencoder.load(tmp_path / "d")


def _forge_config(directory, **sae):
    config = json.loads((directory / "config.json").read_text())
    config["sae"].update(sae)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("dict_size, message", [(3_000_000, r"W_enc in .* has shape \(64, 8\), config.json implies "
                                                            r"\(3000000, 8\)"),
                                                (10**12, "dict_size must be <= 16777216")])
def test_load_checks_the_weight_header_before_allocating(tmp_path, monkeypatch, dict_size, message):
    SparseAutoencoder.build(8, 64, top_k=4).save(tmp_path / "d")
    _forge_config(tmp_path / "d", dict_size=dict_size)

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was allocated before the weight file was checked")

    monkeypatch.setattr(SparseAutoencoder, "__init__", no_model)
    with pytest.raises(SAERegistryError, match=message):
        SparseAutoencoder.load(tmp_path / "d")


def test_load_refuses_a_header_that_claims_more_than_the_file_holds(tmp_path):
    import struct

    SparseAutoencoder.build(8, 64, top_k=4).save(tmp_path / "d")
    _forge_config(tmp_path / "d", dict_size=2**20)
    shapes = {"W_enc": [2**20, 8], "b_enc": [2**20], "W_dec": [2**20, 8], "b_dec": [8], "input_scale": []}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.tensor(shape).prod()) if shape else 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (tmp_path / "d" / "sae.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    with pytest.raises(SAERegistryError, match="not a readable safetensors file"):
        SparseAutoencoder.load(tmp_path / "d")


def test_load_puts_the_dictionary_on_the_device_asked_for(tmp_path):
    SparseAutoencoder.build(8, 64, top_k=4).save(tmp_path / "d")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert SparseAutoencoder.load(tmp_path / "d", device="auto").W_dec.device.type == expected


def test_config_round_trip():
    cfg = SAEConfig(16, 64, 4, "l1")
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SAERegistryError, match="missing"):
        SAEConfig.from_dict({"dict_size": 4})


def _grads(sae, x, dead, sparse_backward):
    sae.zero_grad(set_to_none=True)
    out = sae.forward_train(x, sparse_backward=sparse_backward)
    loss = SparseAutoencoder.loss(x, out.reconstruction, out.hidden_acts, l1_coeff=1e-2)
    loss = loss + auxk_loss(sae, x, out, dead, k_aux=5)
    loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("seed", range(6))
def test_sparse_backward_equals_dense_autograd(seed):
    """The top-k path's custom backward gives the gradients plain autograd gives, for random shapes."""
    gen = torch.Generator().manual_seed(seed)
    d, dict_size, batch = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((2, 40), (8, 300), (1, 70)))
    k = int(torch.randint(1, dict_size + 1, (), generator=gen))
    torch.manual_seed(seed)
    sae = SparseAutoencoder.build(d, dict_size, top_k=k)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.encoder.bias.normal_(std=0.5)
    x = torch.randn(batch, d, dtype=torch.float64)
    sae = sae.double()
    dead = torch.randperm(dict_size)[: dict_size // 3].sort().values
    sparse_out, sparse = _grads(sae, x, dead, True)
    dense_out, dense = _grads(sae, x, dead, False)
    torch.testing.assert_close(sparse_out.reconstruction, dense_out.reconstruction)
    torch.testing.assert_close(sparse_out.hidden_acts, dense_out.hidden_acts)
    assert set(sparse) == {"encoder.encoder.weight", "encoder.encoder.bias", "encoder.b_dec", "W_dec"}
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)


def test_sparse_backward_matches_in_float32_at_training_shape():
    torch.manual_seed(0)
    sae = SparseAutoencoder.build(64, 1024, top_k=16)
    x = torch.randn(512, 64)
    _, sparse = _grads(sae, x, torch.arange(0, 1024, 7), True)
    _, dense = _grads(sae, x, torch.arange(0, 1024, 7), False)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_selection_keeps_exact_values_and_nearly_the_same_latents():
    torch.manual_seed(0)
    sae = SparseAutoencoder.build(64, 512, top_k=16)
    x = torch.randn(256, 64)
    exact = sae.forward_train(x)
    low = sae.forward_train(x, select_dtype=torch.bfloat16)
    pre = sae.encoder.encoder(x - sae.b_dec)
    # the values are the float32 encoder outputs at the chosen latents, whatever chose them
    torch.testing.assert_close(low.hidden_acts, pre.gather(1, low.indices).clamp_min(0))
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(low.indices, exact.indices))
    assert same / exact.indices.numel() > 0.95
    low.reconstruction.pow(2).mean().backward()
    assert sae.encoder.encoder.weight.grad is not None and sae.W_dec.grad is not None


def test_bfloat16_selection_with_dead_latents_trains_them_in_float32():
    torch.manual_seed(0)
    sae = SparseAutoencoder.build(32, 256, top_k=8)
    x = torch.randn(64, 32)
    out = sae.forward_train(x, select_dtype=torch.bfloat16)
    loss = auxk_loss(sae, x, out, torch.arange(0, 256, 3), k_aux=16)
    assert loss > 0
    (out.reconstruction.pow(2).mean() + loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
