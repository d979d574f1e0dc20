"""Interchange with SAELens and dictionary_learning: files both ways, checked against the libraries' own encode.

SAELens (``sae-lens``) and dictionary_learning (``dictionary-learning``) are real installs from PyPI
(the test extra; ``scripts/setup.sh``), imported unconditionally so that a broken install fails here
instead of skipping: every comparison runs their code on their loading path.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import dictionary_learning.dictionary as dl_dictionary
import dictionary_learning.trainers.batch_top_k as dl_batch
import dictionary_learning.trainers.matryoshka_batch_top_k as dl_matryoshka
import dictionary_learning.trainers.top_k as dl_topk
import pytest
import sae_lens
import torch
from click.testing import CliRunner

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder, load
from sae_registry.cli.commands import main
from sae_registry.interchange import formats as ic
from sae_registry.registry.dictionary import Dictionary
from sae_registry.registry.runs import import_dictionary, train_and_register
from sae_registry.registry.versions import families, resolve
from sae_registry.training.loop import TrainConfig

D_IN, D_SAE, K = 16, 64, 4
DL_NEW = {"batch_top_k": dl_batch.BatchTopKSAE, "matryoshka": dl_matryoshka.MatryoshkaBatchTopKSAE,
          "jumprelu": dl_dictionary.JumpReluAutoEncoder}
FAMILY = "interchange"


def _random_sae(sparsity: str, input_scale: float, seed: int = 0) -> SparseAutoencoder:
    """A dictionary with every weight random (biases too) and a non-trivial input scale (thresholds:
    random per latent for jumprelu, one trained-looking value for batch_top_k and matryoshka)."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder.build(D_IN, D_SAE, K, sparsity)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        sae.encoder.input_scale.fill_(input_scale)
        if sparsity == "jumprelu":
            sae.encoder.threshold.uniform_(0.0, 1.0)
        elif sparsity in ("batch_top_k", "matryoshka"):
            sae.encoder.threshold.fill_(0.6)
    return sae.eval()


def _x(n: int = 256, scale: float = 3.0, seed: int = 1, d: int = D_IN) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def assert_same_codes(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 rounding, with the same support wherever a code is not within rounding of 0."""
    ours, theirs = ours.detach().float(), theirs.detach().float()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    clear = (ours.abs() > 1e-4) | (theirs.abs() > 1e-4)
    assert torch.equal((ours > 0)[clear], (theirs > 0)[clear])
    assert (ours > 0).any()


# -- the folded weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["top_k", "l1"])
@pytest.mark.parametrize("input_scale", [1.0, 0.37])
def test_folded_weights_give_our_encode_and_decode_on_raw_inputs(sparsity, input_scale):
    sae, x = _random_sae(sparsity, input_scale), _x()
    w = ic.folded_weights(sae)
    pre = torch.relu((x - w.b_dec) @ w.W_enc + w.b_enc)
    if sparsity == "top_k":
        values, indices = pre.topk(K, dim=-1)
        pre = torch.zeros_like(pre).scatter_(-1, indices, values)
    with torch.no_grad():
        codes = sae.encode(x)
        assert_same_codes(codes, pre)
        torch.testing.assert_close(codes @ w.W_dec + w.b_dec, sae.decode(codes), rtol=1e-5, atol=1e-5)
    if input_scale == 1.0:  # nothing to fold: the parameters themselves, bit for bit
        assert torch.equal(w.W_enc, sae.encoder.encoder.weight.T) and torch.equal(w.W_dec, sae.W_dec)
        assert torch.equal(w.b_dec, sae.b_dec) and torch.equal(w.b_enc, sae.encoder.encoder.bias)


@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning"])
@pytest.mark.parametrize("sparsity", ["top_k", "l1", "batch_top_k", "matryoshka", "jumprelu"])
def test_round_trip_is_bit_exact_when_input_scale_is_one(tmp_path, fmt, sparsity):
    sae, x = _random_sae(sparsity, 1.0), _x()
    ic.export(sae, fmt, tmp_path)
    back = ic.read(tmp_path).sae
    # SAELens keeps BatchTopK and Matryoshka as jumprelu (one threshold per latent): the same codes
    expected = "jumprelu" if fmt == "saelens" and sparsity in ("batch_top_k", "matryoshka") else sparsity
    assert back.cfg.sparsity == expected
    if expected != sparsity:
        assert torch.equal(back.encoder.threshold, sae.encoder.threshold.expand(D_SAE))
    exact = not (fmt == "dictionary_learning" and sparsity == "jumprelu")  # b_dec folded into b_enc and back
    for name, tensor in sae.state_tensors().items():
        if name != "threshold" or expected == sparsity:
            same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-6))
            assert same(back.state_tensors()[name], tensor), name
    assert back.cfg.prefixes == sae.cfg.prefixes or expected != sparsity
    with torch.no_grad():
        if exact:
            assert torch.equal(back.encode(x), sae.encode(x))
        else:
            assert_same_codes(back.encode(x), sae.encode(x))


# -- ours into theirs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity, architecture", [("top_k", "TopKSAE"), ("l1", "StandardSAE"),
                                                    ("batch_top_k", "JumpReLUSAE"), ("matryoshka", "JumpReLUSAE"),
                                                    ("jumprelu", "JumpReLUSAE")])
def test_saelens_encodes_our_export_as_we_do(tmp_path, sparsity, architecture):
    sae, x = _random_sae(sparsity, 0.37), _x()
    ic.export(sae, "saelens", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == architecture
    with torch.no_grad():
        codes = theirs.encode(x)
        assert_same_codes(sae.encode(x), codes)
        torch.testing.assert_close(theirs.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sparsity", ["top_k", "l1", "batch_top_k", "matryoshka", "jumprelu"])
def test_dictionary_learning_encodes_our_export_as_we_do(tmp_path, sparsity):
    sae, x = _random_sae(sparsity, 0.37), _x()
    ic.export(sae, "dictionary_learning", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if sparsity in DL_NEW:
        assert config["trainer"]["dict_class"] == DL_NEW[sparsity].__name__
        theirs = DL_NEW[sparsity].from_pretrained(str(tmp_path / "ae.pt"))
        if sparsity == "matryoshka":
            assert theirs.group_sizes.tolist() == [4, 12, 48]  # our default prefixes 4, 16, 64
    elif sparsity == "top_k":
        assert config["trainer"]["dict_class"] == "AutoEncoderTopK" and config["trainer"]["k"] == K
        theirs = dl_topk.AutoEncoderTopK.from_pretrained(str(tmp_path / "ae.pt"))
    else:
        assert config["trainer"]["dict_class"] == "AutoEncoder"
        # Their default renormalises decoder columns (rescaling codes); as written, the weights are ours.
        theirs = dl_dictionary.AutoEncoder.from_pretrained(str(tmp_path / "ae.pt"), normalize_decoder=False)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert_same_codes(sae.encode(x), codes)
        torch.testing.assert_close(theirs.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-4)


# -- theirs into ours ------------------------------------------------------------------------------------


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))


SAELENS_VARIANTS = {
    "topk": ("topk", {"k": K}),
    "topk-no-b_dec-on-input": ("topk", {"k": K, "apply_b_dec_to_input": False}),
    "topk-rescale-by-decoder-norm": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    "standard": ("standard", {}),
    "standard-no-b_dec-on-input": ("standard", {"apply_b_dec_to_input": False}),
    "jumprelu": ("jumprelu", {}),  # random thresholds, some below 0 (SAELens's ReLU then decides)
    "jumprelu-no-b_dec-on-input": ("jumprelu", {"apply_b_dec_to_input": False}),
}


def _saelens_sae(architecture: str, seed: int = 2, **options):
    sae_cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    theirs = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **options))
    _randomise_(theirs, seed)
    return theirs.eval()


@pytest.mark.parametrize("variant", sorted(SAELENS_VARIANTS))
def test_we_encode_saelens_files_as_saelens_does(tmp_path, variant):
    architecture, options = SAELENS_VARIANTS[variant]
    _saelens_sae(architecture, **options).save_model(tmp_path)
    theirs, x = sae_lens.SAE.load_from_disk(tmp_path), _x()
    foreign = ic.read(tmp_path)
    assert (foreign.format, foreign.architecture) == ("saelens", architecture)
    assert bool(foreign.conversions) == (variant not in ("topk", "standard", "jumprelu"))
    ours = foreign.sae
    assert ours.cfg.sparsity == {"topk": "top_k", "standard": "l1", "jumprelu": "jumprelu"}[architecture]
    with torch.no_grad():
        codes = ours.encode(x)
        assert_same_codes(codes, theirs.encode(x))
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), rtol=1e-5, atol=1e-4)


def _dictionary_learning_dir(directory: Path, dict_class: str, seed: int = 3, threshold: float | None = None
                             ) -> torch.nn.Module:
    """A dictionary_learning SAE saved as its trainer saves one: ``ae.pt`` + ``config.json``
    (``threshold``: the inference threshold its trainer would have set)."""
    if dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        cls = {c.__name__: c for c in DL_NEW.values()}[dict_class]
        theirs = cls(D_IN, D_SAE, K, [8, 24, 32]) if dict_class.startswith("Matryoshka") else cls(D_IN, D_SAE)
        trainer = {"trainer_class": "sae_registry-test", "k": K}
    elif dict_class == "AutoEncoderTopK":
        theirs, trainer = dl_topk.AutoEncoderTopK(D_IN, D_SAE, K), {"trainer_class": "TopKTrainer", "k": K}
    elif dict_class == "AutoEncoder":
        theirs, trainer = dl_dictionary.AutoEncoder(D_IN, D_SAE), {"trainer_class": "StandardTrainer"}
    else:
        from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

        theirs, trainer = BatchTopKSAE(D_IN, D_SAE, K), {"trainer_class": "BatchTopKTrainer", "k": K}
    _randomise_(theirs, seed)
    if threshold is not None and hasattr(theirs, "threshold"):
        with torch.no_grad():
            theirs.threshold.copy_(torch.full_like(theirs.threshold, threshold))
            if dict_class == "JumpReluAutoEncoder":
                theirs.threshold.uniform_(0, 2 * threshold)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in theirs.state_dict().items()}, directory / "ae.pt")
    config = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
                          "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3,
                          "submodule_name": "resid_post_layer_3", **trainer}}
    (directory / "config.json").write_text(json.dumps(config))
    return theirs.eval()


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "AutoEncoder", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
                                        "JumpReluAutoEncoder"])
def test_we_encode_dictionary_learning_files_as_dictionary_learning_does(tmp_path, dict_class):
    _dictionary_learning_dir(tmp_path, dict_class, threshold=0.5)
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        cls = {c.__name__: c for c in DL_NEW.values()}[dict_class]
        theirs = cls.from_pretrained(str(tmp_path / "ae.pt"))
    elif dict_class == "AutoEncoderTopK":
        theirs = dl_topk.AutoEncoderTopK.from_pretrained(str(tmp_path / "ae.pt"))
    else:  # random decoder columns are not unit-norm: load them as written
        theirs = dl_dictionary.AutoEncoder.from_pretrained(str(tmp_path / "ae.pt"), normalize_decoder=False)
    foreign, x = ic.read(tmp_path), _x()
    assert (foreign.format, foreign.architecture) == ("dictionary_learning", dict_class)
    assert foreign.source == {"source.model": "EleutherAI/pythia-70m-deduped", "source.layer": "3",
                              "source.hook": "resid_post_layer_3"}
    with torch.no_grad():
        codes = foreign.sae.encode(x)
        assert_same_codes(codes, theirs.encode(x))
        torch.testing.assert_close(foreign.sae.decode(codes), theirs.decode(codes), rtol=1e-5, atol=1e-4)


# -- what cannot be mapped exactly ----------------------------------------------------------------------


def test_unmappable_saelens_files_are_refused_naming_the_field(tmp_path):
    _saelens_sae("matching_pursuit").save_model(tmp_path / "mp")
    with pytest.raises(SAERegistryError, match="architecture 'matching_pursuit'"):
        ic.read(tmp_path / "mp")
    _saelens_sae("topk", k=K, normalize_activations="layer_norm").save_model(tmp_path / "ln")
    with pytest.raises(SAERegistryError, match="normalize_activations 'layer_norm'"):
        ic.read(tmp_path / "ln")
    _saelens_sae("topk", k=K, normalize_activations="expected_average_only_in").save_model(tmp_path / "avg")
    with pytest.raises(SAERegistryError, match="fold_activation_norm_scaling_factor"):
        ic.read(tmp_path / "avg")
    with pytest.raises(SAERegistryError, match="neither a SAELens SAE"):
        ic.read(tmp_path)


def test_unmappable_dictionary_learning_files_are_refused_naming_the_field(tmp_path):
    _dictionary_learning_dir(tmp_path / "batch", "BatchTopKSAE")  # threshold never set: -1
    with pytest.raises(SAERegistryError, match="threshold is -1.0: this BatchTopKSAE has no inference threshold"):
        ic.read(tmp_path / "batch")
    _dictionary_learning_dir(tmp_path / "new", "AutoEncoder")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    config["trainer"]["dict_class"] = "AutoEncoderNew"
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SAERegistryError, match="trainer.dict_class 'AutoEncoderNew' cannot be mapped"):
        ic.read(tmp_path / "new")
    _dictionary_learning_dir(tmp_path / "bare", "AutoEncoderTopK")
    (tmp_path / "bare" / "config.json").unlink()
    with pytest.raises(SAERegistryError, match="no config.json"):
        ic.read(tmp_path / "bare")


@pytest.mark.parametrize("k", [torch.tensor([K, K]), torch.tensor(2.5), torch.tensor(0)])
def test_an_ae_pt_with_a_k_that_is_not_one_positive_integer_is_refused(tmp_path, k):
    _dictionary_learning_dir(tmp_path, "AutoEncoderTopK")
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    torch.save({**state, "k": k}, tmp_path / "ae.pt")
    with pytest.raises(SAERegistryError, match=r"ae.pt: k must be (one integer|a positive integer)"):
        ic.read(tmp_path)


class _Trap:
    """Pickles as a call that would create ``marker``: what a hostile ``ae.pt`` can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_ae_pt_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    _dictionary_learning_dir(tmp_path, "AutoEncoderTopK")
    with open(tmp_path / "ae.pt", "wb") as f:
        pickle.dump({"encoder.weight": _Trap(marker)}, f, protocol=2)
    with pytest.raises(SAERegistryError, match="not a plain torch state dict"):
        ic.read(tmp_path)
    assert not marker.exists()


def test_a_refused_import_leaves_nothing_in_the_registry(tmp_path):
    _dictionary_learning_dir(tmp_path / "batch", "BatchTopKSAE")
    r = CliRunner().invoke(main, ["import", str(tmp_path / "batch"), "--name", FAMILY])
    assert r.exit_code == 1 and "BatchTopKSAE" in r.output and "Traceback" not in r.output
    assert families() == []


# -- through the registry ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, synthetic_store):
    """An embedded registry holding one trained top-k dictionary, FAMILY@champion (input_scale != 1)."""
    work = tmp_path_factory.mktemp("interchange-registry")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(work)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        store, _ = synthetic_store
        cfg = TrainConfig(tokens=8 * 1024, batch_size=1024, eval_every=4, lr=3e-3)
        train_and_register(store, SAEConfig(store.d, D_SAE, K), cfg, "runs/trained", family=FAMILY,
                           alias="champion", progress=False)
    finally:
        mp.undo()
    return work


@pytest.fixture
def in_registry(registry_dir, monkeypatch):
    monkeypatch.chdir(registry_dir)
    monkeypatch.setenv("SAE_REGISTRY_CACHE", str(registry_dir / "cache"))
    return registry_dir


@pytest.mark.parametrize("fmt, weights", [("saelens", "sae_weights.safetensors"), ("dictionary_learning", "ae.pt")])
def test_export_then_import_encodes_as_the_original(in_registry, tmp_path, fmt, weights):
    original = load(f"{FAMILY}@champion")
    assert float(original.sae.input_scale) != 1.0  # the fold is exercised
    runner = CliRunner()
    r = runner.invoke(main, ["export", f"{FAMILY}@champion", str(tmp_path / "out"), "--format", fmt])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["import", str(tmp_path / "out"), "--name", f"{FAMILY}-{fmt}", "--alias", "champion"])
    assert r.exit_code == 0, r.output
    imported = load(f"{FAMILY}-{fmt}@champion")
    x = _x(512, scale=1.0, d=original.config.input_size)
    assert_same_codes(imported.encode(x), original.encode(x))
    torch.testing.assert_close(imported.reconstruct(x), original.reconstruct(x), rtol=1e-5, atol=1e-5)
    # The imported dictionary holds exactly the exported weights: a second export writes the same ones.
    assert float(imported.sae.input_scale) == 1.0
    ic.export(imported, fmt, tmp_path / "again")
    first, again = ic.read(tmp_path / "out").sae, ic.read(tmp_path / "again").sae
    for a, b in zip(ic.folded_weights(first), ic.folded_weights(again)):
        assert torch.equal(a, b)
    # What the registry recorded about where it came from.
    info = resolve(f"{FAMILY}-{fmt}@champion")
    assert info.tags["import.format"] == fmt
    assert info.tags["import.origin"] == str((tmp_path / "out").resolve())
    assert f"import.sha256.{weights}" in info.tags
    assert info.tags["dict_size"] == str(D_SAE) and info.tags["k"] == str(K)
    assert imported.lineage["import.format"] == fmt and imported.metrics == {}
    # The lineage the export carried comes back: cards and evaluate find the store without --store.
    for key in ("store.path", "store.fingerprint", "source.model"):
        assert imported.lineage[key] == original.lineage[key], key
    r = runner.invoke(main, ["cards", f"{FAMILY}-{fmt}@champion", "--no-log"])
    assert "pass --store" not in r.output and "harvested without token provenance" in r.output, r.output


def test_exported_weights_respect_the_umask(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    ic.export(SparseAutoencoder.build(8, 16, 2), "saelens", tmp_path)
    assert (tmp_path / "sae_weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "sae_weights.safetensors").stat().st_mode & 0o777 == (tmp_path / "cfg.json").stat().st_mode & 0o777


def test_imported_saelens_dictionary_encodes_as_saelens_after_load(in_registry, tmp_path):
    _saelens_sae("standard").save_model(tmp_path / "theirs")
    made = import_dictionary(tmp_path / "theirs", f"{FAMILY}-from-saelens")
    assert (made.format, made.architecture, made.version) == ("saelens", "standard", "1")
    x = _x()
    with torch.no_grad():
        assert_same_codes(load(f"{FAMILY}-from-saelens/1").encode(x),
                          sae_lens.SAE.load_from_disk(tmp_path / "theirs").encode(x))


def test_dictionary_is_an_saebench_custom_sae(in_registry):
    d = load(f"{FAMILY}@champion")
    d_in = d.config.input_size
    assert d.W_enc.shape == (d_in, D_SAE) and d.W_dec.shape == (D_SAE, d_in)
    assert d.b_enc.shape == (D_SAE,) and d.b_dec.shape == (d_in,)
    assert d.device == torch.device("cpu") and d.dtype == torch.float32
    cfg = d.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.architecture, cfg.activation_fn_kwargs) == (d_in, D_SAE, "topk", {"k": K})
    assert cfg.model_name == "synthetic" and cfg.dtype == "float32" and cfg.device == "cpu"
    # On raw activations, [batch, seq, d_in] as SAEBench passes them:
    x = torch.randn(3, 5, d_in)
    codes = d.encode(x)
    assert codes.shape == (3, 5, D_SAE) and ((codes > 0).sum(-1) <= K).all()
    pre = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    values, indices = pre.topk(K, dim=-1)
    assert_same_codes(codes.reshape(-1, D_SAE), torch.zeros_like(pre).scatter_(-1, indices, values).reshape(-1, D_SAE))
    torch.testing.assert_close(d.decode(codes), codes @ d.W_dec + d.b_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d(x), d.decode(d.encode(x)))
    torch.testing.assert_close(d.forward(x), d.reconstruct(x))
    # to(dtype=...) as SAEBench calls it: the exposed weights follow.
    assert d.to(dtype=torch.float64) is d
    assert d.dtype == torch.float64 and d.W_enc.dtype == torch.float64 and d.cfg.dtype == "float64"
    assert d.encode(x).dtype == torch.float64
    d.to(torch.float32)
    assert d.W_dec.dtype == torch.float32


def test_a_bare_dictionary_object_has_the_interface_too():
    sae = _random_sae("l1", 1.0)
    d = Dictionary("x", "x", "1", [], sae, {}, {}, Path("."))
    assert d.cfg.architecture == "standard" and d.cfg.activation_fn_str == "relu"
    assert torch.equal(d.W_enc, sae.encoder.encoder.weight.T)  # input_scale 1: bit for bit


@pytest.mark.parametrize("sparsity", ["batch_top_k", "matryoshka"])
@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning"])
def test_a_batch_top_k_without_its_threshold_is_never_exported_as_plain_relu(tmp_path, fmt, sparsity):
    sae = SparseAutoencoder.build(D_IN, D_SAE, K, sparsity)  # untrained: no inference threshold yet
    with pytest.raises(SAERegistryError, match=f"threshold: this {sparsity} dictionary has no inference threshold"):
        ic.export(sae, fmt, tmp_path)
    assert not any(tmp_path.iterdir())
