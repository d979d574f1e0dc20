"""Downstream fidelity: a dictionary spliced into MiniLM (encoder) and a tiny random GPT-2 (causal LM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sae_registry
from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.harvest.local import default_model_path, demo_texts, harvest
from sae_registry.metrics.downstream import prepare


class Identity(nn.Module):
    """A perfect dictionary: its reconstruction is its input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.cfg = SAEConfig(input_size=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random 2-block GPT-2 LM (d = 32) with MiniLM's tokenizer, saved like any local model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_minilm_identity_is_one_zero_ablation_lower_and_a_trained_dictionary_between(minilm_store, tmp_path):
    from sae_registry.training.loop import TrainConfig, train

    ev = prepare(minilm_store, max_tokens=1024, device="cpu")
    assert ev.kind == "encoder" and ev.tokens >= 512
    # The activations spliced are exactly the store's held-out rows: same layer, same tokens, same windows.
    rows = [r for w in ev.windows for r in w.rows]
    assert min(rows) >= minilm_store.eval_start
    assert torch.allclose(ev.spliced_inputs(), minilm_store.read()[rows], atol=1e-4)

    perfect = ev.run(Identity(384))
    assert perfect["downstream/cosine_spliced"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["downstream/fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["downstream/cosine_zero"] < 0.9
    ablated = ev.run(zeros)
    assert ablated["downstream/cosine_spliced"] == pytest.approx(perfect["downstream/cosine_zero"])
    assert ablated["downstream/fidelity"] == pytest.approx(0.0, abs=1e-6)

    result = train(minilm_store, SAEConfig(384, 512, 16), TrainConfig(tokens=40_000, batch_size=1024, eval_every=20,
                                                                       device="cpu"), tmp_path / "sae", progress=False)
    trained = ev.run(result.sae)
    assert 0.0 < trained["downstream/fidelity"] < 1.0
    assert perfect["downstream/cosine_zero"] < trained["downstream/cosine_spliced"] < 1.0
    # The public entry point gives the same numbers (a fresh model, the same windows).
    again = sae_registry.evaluate(result.sae, minilm_store.path, max_tokens=1024, device="cpu")
    assert again["downstream/fidelity"] == pytest.approx(trained["downstream/fidelity"], abs=1e-5)


def test_causal_lm_identity_loses_nothing_and_zero_ablation_recovers_nothing(tiny_gpt2):
    ev = prepare(tiny_gpt2, texts=demo_texts()[:12], layer=1, max_tokens=300, max_length=48, device="cpu")
    assert ev.kind == "causal_lm" and ev.tokens >= 300
    perfect = ev.run(Identity(32))
    assert perfect["downstream/ce_increase"] == 0.0
    assert perfect["downstream/ce_spliced"] == perfect["downstream/ce_clean"]
    assert perfect["downstream/loss_recovered"] == pytest.approx(1.0) == perfect["downstream/fidelity"]
    ablated = ev.run(zeros)
    assert ablated["downstream/ce_spliced"] == pytest.approx(ablated["downstream/ce_zero"])
    assert ablated["downstream/loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    noisy = ev.run(lambda x: x + 0.3 * torch.randn_like(x))
    assert noisy["downstream/ce_increase"] != 0.0


def test_a_causal_lm_store_is_rebuilt_from_provenance_special_tokens_kept_clean(tiny_gpt2, tmp_path):
    store = harvest(tmp_path / "gpt2.zarr", demo_texts()[:80], model_path=tiny_gpt2, layer=2, max_length=48,
                    chunk_tokens=512, pack=False, progress=False)
    ev = prepare(store, max_tokens=200, device="cpu")
    assert ev.layer == 2 and ev.kind == "causal_lm" and ev.tokens >= 200
    cls, sep = 101, 102  # MiniLM's [CLS] and [SEP]: in the input, never spliced
    for w in ev.windows:
        assert w.input_ids[0] == cls and w.input_ids[-1] == sep and not w.splice[0] and not w.splice[-1]
    rows = [r for w in ev.windows for r in w.rows]
    assert torch.allclose(ev.spliced_inputs(), store.read()[rows], atol=1e-5)
    assert ev.run(Identity(32))["downstream/ce_increase"] == 0.0


def test_layer_zero_splices_the_embeddings(tiny_gpt2):
    ev = prepare(tiny_gpt2, texts=demo_texts()[:4], layer=0, max_tokens=64, max_length=32, device="cpu")
    assert ev.run(Identity(32))["downstream/ce_increase"] == 0.0
    assert ev.run(zeros)["downstream/loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_errors_say_what_to_do(tiny_gpt2, tmp_path):
    with pytest.raises(SAERegistryError, match="takes 384-wide activations but tiny-gpt2 has hidden size 32"):
        sae_registry.evaluate(SparseAutoencoder.build(384, dict_size=64, top_k=4), tiny_gpt2,
                              texts=["some text"], layer=1)
    with pytest.raises(SAERegistryError, match="nothing at .*no-such-model"):
        sae_registry.evaluate(Identity(32), tmp_path / "no-such-model", texts=["x"], layer=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAERegistryError, match="not a transformers model directory"):
        sae_registry.evaluate(Identity(32), tmp_path / "empty", texts=["x"], layer=1)
    with pytest.raises(SAERegistryError, match="needs texts="):
        sae_registry.evaluate(Identity(32), tiny_gpt2, layer=1)
    with pytest.raises(SAERegistryError, match="layer must be an integer in 0..2"):
        sae_registry.evaluate(Identity(32), tiny_gpt2, texts=["x y z"], layer=5)
    with pytest.raises(SAERegistryError, match="records no store it was trained on"):
        sae_registry.evaluate(Identity(32))


def test_a_store_without_provenance_needs_texts(tmp_path):
    store = sae_registry.ActivationStore.create(tmp_path / "old.zarr", d=4, source={
        "model_path": str(default_model_path()), "layer": 1})
    store.append(torch.randn(100, 4))
    store.close()
    with pytest.raises(SAERegistryError, match="keeps no token provenance.*pass texts="):
        sae_registry.evaluate(Identity(4), tmp_path / "old.zarr")


def test_the_package_exports_the_function():
    import sae_registry.metrics.downstream

    assert sae_registry.evaluate is sae_registry.metrics.downstream.evaluate


@pytest.mark.slow
def test_the_evaluate_command_records_fidelity_on_the_version_and_says_when_tokens_ran_short(tiny_gpt2, tmp_path):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.registry.runs import train_and_register
    from sae_registry.registry.versions import resolve
    from sae_registry.training.loop import TrainConfig

    store = harvest(tmp_path / "gpt2.zarr", demo_texts()[:120], model_path=tiny_gpt2, layer=1, max_length=48,
                    chunk_tokens=512, progress=False)
    for k in (4, 8):  # two versions; only the one evaluated gets a fidelity
        train_and_register(store, SAEConfig(32, 64, k), TrainConfig(tokens=4096, batch_size=512, device="cpu"),
                           tmp_path / f"d{k}", family="gpt2-l1", progress=False)
    r = CliRunner().invoke(main, ["list", "gpt2-l1"])
    assert "fidelity" not in r.output.splitlines()[0]  # no column until a version has one
    held_out = prepare(store, max_tokens=10**6, device="cpu").tokens
    r = CliRunner().invoke(main, ["evaluate", "gpt2-l1/2", "--tokens", "1000000", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"note: used {held_out:,} tokens, fewer than --tokens 1,000,000" in r.output
    assert "the held-out split of" in r.output and "recorded on gpt2-l1/2" in r.output
    fidelity = float(next(line.split()[1] for line in r.output.splitlines() if "downstream/fidelity" in line))
    info = resolve("gpt2-l1/2")
    assert float(info.tags["downstream.fidelity"]) == pytest.approx(fidelity, rel=1e-5)
    assert info.tags["downstream.text"].startswith("held-out split of")
    lines = CliRunner().invoke(main, ["list", "gpt2-l1"]).output.splitlines()
    assert lines[0].split()[-2:] == ["fidelity", "created"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert float(rows["2"][-3]) == pytest.approx(fidelity, abs=1e-4) and rows["1"][-3] == "-"
    r = CliRunner().invoke(main, ["evaluate", "gpt2-l1/1", "--tokens", "64", "--device", "cpu", "--no-record"])
    assert r.exit_code == 0 and "note: used" not in r.output and "recorded" not in r.output, r.output
    assert "downstream.fidelity" not in resolve("gpt2-l1/1").tags
    # --hook: the store's own hook gives the same number; another hook point is another splice
    said = {}
    for hook in (store.source["hook"], "blocks.0.hook_mlp_out"):
        r = CliRunner().invoke(main, ["evaluate", "gpt2-l1/2", "--hook", hook, "--tokens", "1000000", "--device",
                                      "cpu", "--no-record"])
        assert r.exit_code == 0, r.output
        said[hook] = float(next(line.split()[1] for line in r.output.splitlines() if "downstream/fidelity" in line))
    assert said[store.source["hook"]] == pytest.approx(fidelity, rel=1e-5)
    assert said["blocks.0.hook_mlp_out"] != pytest.approx(fidelity, rel=1e-3)
