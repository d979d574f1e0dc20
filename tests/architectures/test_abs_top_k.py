"""abs_top_k: SAELens's AbsTopK (the k largest |pre| per token, signed), trained here and interchanged exactly.

The contract every architecture keeps (files, one inference form, the sparse step at the defaults, the
CLI, a sweep, the shipped code) is ``test_contract.py``; this file checks what is abs_top_k's own.
"""

from __future__ import annotations

import pytest
import sae_lens
import torch
from sae_lens.saes.abstopk_sae import AbsTopK as SAELensAbsTopK
from sae_lens.saes.abstopk_sae import calculate_abstopk_aux_acts

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.architectures.base import auxk_loss
from sae_registry.interchange import formats as ic
from sae_registry.training.loop import TrainConfig, train

D, N, K = 16, 64, 4


def _sae(input_scale: float = 1.0, seed: int = 0) -> SparseAutoencoder:
    """Every weight random, biases too, so that many encoder outputs are negative."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder.build(D, N, K, "abs_top_k")
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        sae.encoder.input_scale.fill_(input_scale)
    return sae.eval()


def _x(n: int = 256, seed: int = 1) -> torch.Tensor:
    return 3 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_codes_are_saelens_abstopk_of_the_encoder_outputs():
    sae, x = _sae(), _x()
    with torch.no_grad():
        pre = sae.encoder.encoder(x - sae.b_dec)
        codes = sae.encode(x)
        torch.testing.assert_close(codes, SAELensAbsTopK(K)(pre), rtol=0, atol=0)
        values, indices = sae.encode_topk(x)
    assert (codes != 0).sum(-1).eq(K).all()
    assert (values < 0).any() and (values > 0).any()  # signed: a latent fires either way
    # every kept |code| is at least every dropped |pre| of its row
    dropped = pre.abs().scatter(-1, indices, 0.0)
    assert (values.abs().min(-1).values >= dropped.max(-1).values).all()


def test_stats_count_negative_codes_as_firing():
    sae, x = _sae(), _x(64)
    out = sae.forward_train(x, sparse_backward=False)
    fired, l0 = sae.rule.stats(out, len(x), N)
    assert float(l0) == K
    assert torch.equal(fired, (sae.encode(x) != 0).any(0))


@pytest.mark.parametrize("aux", [0.0, 1 / 32])
def test_the_sparse_step_gives_the_dense_steps_numbers_with_the_aux_loss(aux):
    sae, x = _sae(), _x(32)
    sae.train()
    cfg = TrainConfig(aux_coeff=aux, aux_k=5).resolved(sae.cfg)
    dead = torch.arange(0, N, 3)

    def step(sparse: bool):
        sae.zero_grad()
        out = sae.forward_train(x, sparse_backward=sparse, cfg=cfg)
        loss = sae.rule.loss(sae, x, out, cfg, 1.0, dead)
        loss.loss.backward()
        return loss, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}

    (dense, dense_grads), (sparse, sparse_grads) = step(False), step(True)
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.terms["aux_loss"], dense.terms["aux_loss"])
    assert (dense.terms["aux_loss"] > 0) == (aux > 0)
    assert dense_grads.keys() == sparse_grads.keys() and "encoder.encoder.weight" in dense_grads
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


def test_the_aux_loss_picks_saelens_dead_latents_by_magnitude_signed():
    sae, x = _sae(), _x(32)
    out = sae.forward_train(x, sparse_backward=False)
    dead = torch.arange(0, N, 2)
    mask = torch.zeros(N, dtype=torch.bool).index_fill_(0, dead, True)
    ours = auxk_loss(sae, x, out, dead, 6, signed=True)
    with torch.no_grad():
        acts = calculate_abstopk_aux_acts(6, out.pre_acts.detach(), mask)  # SAELens's selection
        assert (acts < 0).any()
        residual = (x - out.reconstruction).detach()
        total_var = (residual - residual.mean(0)).pow(2).sum()
        expected = (acts @ sae.W_dec - residual).pow(2).sum() / total_var  # 32 dead >= k_aux: scale 1
    torch.testing.assert_close(ours.detach(), expected)


def test_trains_on_a_store_and_loads_back(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=40 * 1024, batch_size=1024, lr=3e-3, eval_every=20, dead_after_tokens=20_000)
    result = train(store, SAEConfig(32, 128, 3, "abs_top_k"), cfg, tmp_path / "run", progress=False)
    assert result.metrics["fvu"] < 0.5, result.metrics
    assert result.metrics["l0"] == pytest.approx(3)
    assert "train/aux_loss" in result.history[-1]
    loaded = SparseAutoencoder.load(tmp_path / "run")
    assert loaded.cfg.sparsity == "abs_top_k"
    x = store.read_split("eval")[:512]
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x), rtol=0, atol=0)


# -- SAELens, both ways ----------------------------------------------------------------------------------


@pytest.mark.parametrize("input_scale", [1.0, 0.37])
def test_saelens_encodes_our_export_as_we_do(tmp_path, input_scale):
    sae, x = _sae(input_scale), _x()
    ic.export(sae, "saelens", tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == "AbsTopKSAE" and theirs.cfg.k == K
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-4)
        if input_scale == 1.0:  # nothing folded: the same weights, the same codes bit for bit
            torch.testing.assert_close(sae.encode(x), codes, rtol=0, atol=0)
            back = ic.read(tmp_path).sae
            assert back.cfg == sae.cfg
            for name, tensor in sae.state_tensors().items():
                assert torch.equal(back.state_tensors()[name], tensor), name


@pytest.mark.parametrize("options", [{}, {"apply_b_dec_to_input": False}, {"rescale_acts_by_decoder_norm": True}])
def test_we_encode_saelens_files_as_saelens_does(tmp_path, options):
    cls, cfg_cls = sae_lens.registry.get_sae_class("abstopk")
    torch.manual_seed(2)
    theirs = cls(cfg_cls(d_in=D, d_sae=N, k=K, **options))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    theirs.save_model(tmp_path)
    theirs, x = sae_lens.SAE.load_from_disk(tmp_path), _x()
    foreign = ic.read(tmp_path)
    assert (foreign.architecture, foreign.sae.cfg.sparsity, foreign.sae.cfg.top_k) == ("abstopk", "abs_top_k", K)
    assert bool(foreign.conversions) == bool(options)
    with torch.no_grad():
        codes = foreign.sae.encode(x)
        expected = theirs.encode(x)  # with rescale_acts_by_decoder_norm, folded: the same codes
        torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(codes != 0, expected != 0)
        torch.testing.assert_close(foreign.sae(x), theirs(x), rtol=1e-5, atol=1e-4)


def test_dictionary_learning_has_no_abs_top_k_and_export_there_is_refused(tmp_path):
    with pytest.raises(SAERegistryError, match="sparsity abs_top_k has no dictionary_learning form"):
        ic.export(_sae(), "dictionary_learning", tmp_path / "out")
    assert not (tmp_path / "out").exists()
