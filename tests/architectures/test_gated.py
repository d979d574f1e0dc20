"""gated: Rajamanoharan et al.'s gated SAE, its loss against SAELens's and dictionary_learning's trainers,
and its files both ways with both libraries.

The contract every architecture keeps (files, one inference form, the sparse step at the defaults, the
CLI, a sweep, the shipped code) is ``test_contract.py``; this file checks what is gated's own.
"""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from click.testing import CliRunner
from dictionary_learning.dictionary import GatedAutoEncoder
from dictionary_learning.trainers.gdm import GatedSAETrainer
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from sae_registry import SAEConfig, SparseAutoencoder
from sae_registry.architectures.catalogue import rule_of
from sae_registry.cli.commands import main
from sae_registry.interchange import formats as ic
from sae_registry.training.loop import TrainConfig, train

D, N = 16, 64
NONE_DEAD = torch.zeros(0, dtype=torch.long)


def _sae(input_scale: float = 1.0, seed: int = 0, unit_decoder: bool = False) -> SparseAutoencoder:
    """Every weight random (gate and magnitude biases, r_mag too): about half the gates open."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder.build(D, N, 4, "gated")
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if unit_decoder:
            sae.normalize_decoder_()
        sae.encoder.input_scale.fill_(input_scale)
    return sae.eval()


def _x(n: int = 256, seed: int = 1) -> torch.Tensor:
    return 3 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_codes_are_the_gate_times_the_magnitude():
    sae, x = _sae(), _x()
    enc = sae.encoder
    with torch.no_grad():
        x_enc = (x - enc.b_dec) @ enc.encoder.weight.T
        gate = x_enc + enc.encoder.bias > 0
        magnitude = torch.relu(enc.r_mag.exp() * x_enc + enc.b_mag)
        codes = sae.encode(x)
    torch.testing.assert_close(codes, gate * magnitude)
    assert 0.2 < (codes > 0).float().mean() < 0.6
    assert ((codes == 0) & gate & (magnitude > 0)).sum() == 0  # an open gate with a positive magnitude fires


def test_the_sparse_step_gives_the_dense_steps_numbers():
    sae, x = _sae(), _x(32)
    sae.train()
    cfg = TrainConfig(l1_coeff=0.05).resolved(sae.cfg)

    def step(sparse: bool):
        sae.zero_grad()
        sae.active_fraction = 0.0 if sparse else 1.0
        out = sae.forward_train(x, sparse_backward=sparse, cfg=cfg)
        assert (out.rows is not None) == sparse
        loss = sae.rule.loss(sae, x, out, cfg, 1.0, NONE_DEAD)
        loss.loss.backward()
        return loss, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}

    (dense, dense_grads), (sparse, sparse_grads) = step(False), step(True)
    torch.testing.assert_close(sparse.loss, dense.loss)
    assert dense.terms.keys() == sparse.terms.keys() == {"l1_penalty", "aux_loss"}
    for name in dense.terms:
        torch.testing.assert_close(sparse.terms[name], dense.terms[name])
    assert dense_grads.keys() == sparse_grads.keys() == {
        "W_dec", "encoder.b_dec", "encoder.encoder.weight", "encoder.encoder.bias", "encoder.r_mag", "encoder.b_mag"}
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


def _ours_loss(sae: SparseAutoencoder, x: torch.Tensor, l1_coeff: float):
    cfg = TrainConfig(l1_coeff=l1_coeff).resolved(sae.cfg)
    sae.zero_grad()
    loss = sae.rule.loss(sae, x, sae.forward_train(x, sparse_backward=False, cfg=cfg), cfg, 1.0, NONE_DEAD).loss
    loss.backward()
    return loss.detach()


def test_the_loss_is_saelens_gated_training_loss_in_this_mse_s_units():
    """SAELens sums the squared errors over features where we average: its loss is ``D`` times ours at
    ``l1_coefficient = D * l1_coeff``, and so are the encoder's gradients. (Its auxiliary term also
    trains the decoder, ours and the paper's do not: the decoder's gradients are not compared.)"""
    sae, x = _sae(), _x(32)
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D, d_sae=N, l1_coefficient=0.05 * D))
    with torch.no_grad():
        theirs.W_enc.copy_(sae.encoder.encoder.weight.T)
        theirs.b_gate.copy_(sae.encoder.encoder.bias)
        theirs.r_mag.copy_(sae.encoder.r_mag)
        theirs.b_mag.copy_(sae.encoder.b_mag)
        theirs.W_dec.copy_(sae.W_dec)
        theirs.b_dec.copy_(sae.b_dec)
    out = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 0.05 * D}, dead_neuron_mask=None,
                                                      n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    ours = _ours_loss(sae, x, 0.05)
    torch.testing.assert_close(D * ours, out.loss.detach())
    for name, mine, their in (("W_enc", sae.encoder.encoder.weight.grad.T, theirs.W_enc.grad),
                              ("b_gate", sae.encoder.encoder.bias.grad, theirs.b_gate.grad),
                              ("r_mag", sae.encoder.r_mag.grad, theirs.r_mag.grad),
                              ("b_mag", sae.encoder.b_mag.grad, theirs.b_mag.grad)):
        torch.testing.assert_close(D * mine, their, msg=name)


def test_the_loss_is_dictionary_learning_gated_trainer_loss_in_this_mse_s_units():
    """dictionary_learning's GatedSAETrainer freezes the auxiliary decoder as we do, and its L1 is plain
    (its decoder's columns are kept at unit norm, as ours): every gradient agrees, the decoder's once the
    part along its rows is removed (both trainers remove it: ConstrainedAdam, ``remove_parallel_grads_``)."""
    sae, x = _sae(unit_decoder=True), _x(32)
    trainer = GatedSAETrainer(steps=10, activation_dim=D, dict_size=N, layer=0, lm_name="none", l1_penalty=0.05 * D,
                              warmup_steps=0, sparsity_warmup_steps=None, device="cpu", wandb_name=None)
    ae = trainer.ae
    with torch.no_grad():
        ae.encoder.weight.copy_(sae.encoder.encoder.weight)
        ae.gate_bias.copy_(sae.encoder.encoder.bias)
        ae.r_mag.copy_(sae.encoder.r_mag)
        ae.mag_bias.copy_(sae.encoder.b_mag)
        ae.decoder.weight.copy_(sae.W_dec.T)
        ae.decoder_bias.copy_(sae.b_dec)
    theirs = trainer.loss(x, step=0)
    theirs.backward()
    ours = _ours_loss(sae, x, 0.05)
    torch.testing.assert_close(D * ours, theirs.detach())
    sae.remove_parallel_grads_()
    W = ae.decoder.weight.detach()
    their_dec = ae.decoder.weight.grad - (ae.decoder.weight.grad * W).sum(0, keepdim=True) * W
    for name, mine, their in (("W_enc", sae.encoder.encoder.weight.grad, ae.encoder.weight.grad),
                              ("b_gate", sae.encoder.encoder.bias.grad, ae.gate_bias.grad),
                              ("r_mag", sae.encoder.r_mag.grad, ae.r_mag.grad),
                              ("b_mag", sae.encoder.b_mag.grad, ae.mag_bias.grad),
                              ("b_dec", sae.b_dec.grad, ae.decoder_bias.grad),
                              ("W_dec", sae.W_dec.grad.T, their_dec)):
        torch.testing.assert_close(D * mine, their, msg=name)


def test_trains_on_a_store_logs_its_terms_and_loads_back(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=60 * 1024, batch_size=1024, lr=3e-3, eval_every=20, l1_coeff=0.05)
    result = train(store, SAEConfig(32, 128, 3, "gated"), cfg, tmp_path / "run", progress=False)
    assert result.metrics["fvu"] < 0.5, result.metrics
    assert 1 < result.metrics["l0"] < 64, result.metrics
    last = result.history[-1]
    assert last["train/l1_penalty"] > 0 and last["train/aux_loss"] > 0
    assert result.sae.encoder.r_mag.abs().sum() > 0 and result.sae.encoder.b_mag.abs().sum() > 0  # trained
    loaded = SparseAutoencoder.load(tmp_path / "run")
    for name, tensor in result.sae.state_tensors().items():
        assert torch.equal(loaded.state_tensors()[name], tensor.detach().cpu()), name
    x = store.read_split("eval")[:512]
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x), rtol=0, atol=0)


def test_the_cli_trains_it_with_gated_default_l1_coeff(synthetic_store, tmp_path):
    store, _ = synthetic_store
    result = CliRunner().invoke(main, ["train", "--store", str(store.path), "--out", str(tmp_path / "d"),
                                       "--sparsity", "gated", "--dict-size", "64", "--tokens", "8192",
                                       "--batch-size", "1024", "--no-registry", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["sae"]["sparsity"] == "gated" and config["train"]["l1_coeff"] == 1.5e-2
    shape = SAEConfig(32, 64, sparsity="gated")
    assert rule_of("gated").run_name(shape, TrainConfig().resolved(shape)) == "gated-d64-l1c0.015"


# -- SAELens and dictionary_learning, both ways --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning"])
def test_round_trip_is_bit_exact_when_input_scale_is_one(tmp_path, fmt):
    sae, x = _sae(), _x()
    ic.export(sae, fmt, tmp_path)
    back = ic.read(tmp_path).sae
    assert back.cfg.sparsity == "gated"
    for name, tensor in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))


@pytest.mark.parametrize("input_scale", [1.0, 0.37])
def test_saelens_encodes_our_export_as_we_do(tmp_path, input_scale):
    sae, x = _sae(input_scale), _x()
    ic.export(sae, "saelens", tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == "GatedSAE"
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
        assert (codes > 0).any()
        torch.testing.assert_close(theirs.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_we_encode_saelens_files_as_saelens_does(tmp_path, apply_b_dec_to_input):
    cls, cfg_cls = sae_lens.registry.get_sae_class("gated")
    theirs = cls(cfg_cls(d_in=D, d_sae=N, apply_b_dec_to_input=apply_b_dec_to_input))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    theirs.save_model(tmp_path)
    theirs, x = sae_lens.SAE.load_from_disk(tmp_path), _x()
    foreign = ic.read(tmp_path)
    assert (foreign.architecture, foreign.sae.cfg.sparsity) == ("gated", "gated")
    assert bool(foreign.conversions) == (not apply_b_dec_to_input)
    with torch.no_grad():
        codes = foreign.sae.encode(x)
        torch.testing.assert_close(codes, theirs.encode(x), rtol=1e-5, atol=1e-5)
        assert (codes > 0).any()
        torch.testing.assert_close(foreign.sae(x), theirs(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("input_scale", [1.0, 0.37])
def test_dictionary_learning_encodes_our_export_as_we_do(tmp_path, input_scale):
    sae, x = _sae(input_scale), _x()
    ic.export(sae, "dictionary_learning", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["dict_class"] == "GatedAutoEncoder"
    theirs = GatedAutoEncoder.from_pretrained(str(tmp_path / "ae.pt"))
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
        assert (codes > 0).any()
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-4)


def test_we_encode_dictionary_learning_files_as_dictionary_learning_does(tmp_path):
    theirs = GatedAutoEncoder(D, N)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    torch.save(theirs.state_dict(), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "GatedAutoEncoder", "trainer_class": "GatedSAETrainer", "activation_dim": D, "dict_size": N,
        "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, "submodule_name": "resid_post_layer_3"}}))
    foreign, x = ic.read(tmp_path), _x()
    assert (foreign.format, foreign.architecture, foreign.sae.cfg.sparsity) == (
        "dictionary_learning", "GatedAutoEncoder", "gated")
    with torch.no_grad():
        codes = foreign.sae.encode(x)
        torch.testing.assert_close(codes, theirs.encode(x), rtol=1e-5, atol=1e-5)
        assert (codes > 0).any()
        torch.testing.assert_close(foreign.sae(x), theirs(x), rtol=1e-5, atol=1e-4)
