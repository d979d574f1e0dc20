"""The contract every catalogue entry keeps: a new architecture (a file and a catalogue line, or a
plugin) is covered here without a line of its own.

Per architecture: its files round-trip; its sparse training step gives the dense step's numbers;
inference is one form (the reconstruction is the decoding of the codes); its interchange formats
round-trip or refuse clearly; its cost estimate grows with the work; the CLI and a sweep spec take
it; and the code a registered dictionary ships rebuilds it the way serving does. The cost model's
accuracy against measured steps is a benchmark (benchmarks/train_speed.py), not a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.architectures.catalogue import architecture, catalogue, names, rule_of
from sae_registry.cli.commands import main
from sae_registry.config.options import TrainConfig
from sae_registry.config.sweep import SweepSpec, estimated_cost
from sae_registry.interchange.formats import FORMATS, export, read
from sae_registry.registry.runs import shipped_code

ALL = names()


def _trained_sae(sparsity: str, d: int = 8, dict_size: int = 32, k: int = 4) -> SparseAutoencoder:
    """A small dictionary of ``sparsity`` in the state training leaves it (thresholds estimated)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d, dict_size, k, sparsity))
    cfg = TrainConfig(aux_coeff=0.0).resolved(sae.cfg)
    sae.rule.init(sae, cfg)
    x = torch.randn(64, d)
    out = sae.forward_train(x, sparse_backward=False, cfg=cfg)
    sae.rule.after_step(sae, out, cfg, 0)
    sae.rule.calibrate(sae, [x])
    return sae.eval()


@pytest.mark.parametrize("sparsity", ALL)
def test_the_catalogue_entry_names_its_rule_and_the_rule_its_entry(sparsity):
    entry = architecture(sparsity)
    rule = rule_of(sparsity)
    assert rule.arch is entry and rule.name == sparsity == entry.name
    assert entry.summary and not entry.fixed_k or entry.uses_k  # a fixed k is a k
    assert set(entry.named_keys) <= {"k", "prefixes", "l1_coeff", "l0_coeff", "target_l0"} | {
        f for f in TrainConfig.__dataclass_fields__}


@pytest.mark.parametrize("sparsity", ALL)
def test_files_round_trip(sparsity, tmp_path):
    sae = _trained_sae(sparsity)
    sae.save(tmp_path / "d")
    loaded = SparseAutoencoder.load(tmp_path / "d")
    x = torch.randn(16, 8)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    assert loaded.cfg == sae.cfg


@pytest.mark.parametrize("sparsity", ALL)
def test_inference_is_one_form(sparsity):
    """The reconstruction of ``forward`` is the decoding of ``encode``'s codes, whatever the rule."""
    sae = _trained_sae(sparsity)
    x = torch.randn(16, 8)
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    if architecture(sparsity).fixed_k:
        values, indices = sae.encode_topk(x)
        assert values.shape == indices.shape == (16, 4)
        torch.testing.assert_close(sae.decode_topk(values, indices), sae(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", ALL)
def test_the_sparse_step_gives_the_dense_steps_numbers(sparsity):
    def grads(sparse: bool):
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(8, 32, 4, sparsity))
        cfg = TrainConfig(aux_coeff=0.0, l1_coeff=0.01 if sparsity == "l1" else None).resolved(sae.cfg)
        sae.rule.init(sae, cfg)
        sae.active_fraction = 0.0 if sparse else 1.0
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        step = sae.rule.loss(sae, x, sae.forward_train(x, sparse_backward=sparse, cfg=cfg), cfg, 1.0,
                             torch.zeros(0, dtype=torch.long))
        step.loss.backward()
        return step, {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}

    (dense, dense_grads), (sparse, sparse_grads) = grads(False), grads(True)
    torch.testing.assert_close(sparse.loss, dense.loss)
    assert sparse.terms.keys() == dense.terms.keys()  # a run logs the same names on either path
    assert dense_grads.keys() == sparse_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sparsity", ALL)
def test_interchange_round_trips_or_refuses_naming_the_format(sparsity, fmt, tmp_path):
    sae = _trained_sae(sparsity)
    theirs = architecture(sparsity).saelens if fmt == "saelens" else architecture(sparsity).dictionary_learning
    if theirs is None:
        with pytest.raises(SAERegistryError, match=f"{sparsity}.*{fmt}|{fmt}.*{sparsity}"):
            export(sae, fmt, tmp_path / "out")
        return
    export(sae, fmt, tmp_path / "out")
    back = read(tmp_path / "out", fmt).sae.eval()
    x = torch.randn(16, 8)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", ALL)
def test_the_cost_estimate_grows_with_the_work(sparsity):
    train_cfg = TrainConfig(tokens=100_000)
    cost = {size: estimated_cost(SAEConfig(384, size, 32, sparsity), train_cfg, 384) for size in (1024, 4096)}
    assert 0 < cost[1024] < cost[4096]
    assert estimated_cost(SAEConfig(384, 1024, 32, sparsity), TrainConfig(tokens=200_000), 384) == pytest.approx(
        2 * cost[1024])


@pytest.mark.parametrize("sparsity", ALL)
def test_the_cli_and_a_sweep_spec_take_it(sparsity, synthetic_store, tmp_path):
    store, _ = synthetic_store
    result = CliRunner().invoke(main, ["train", "--store", str(store.path), "--out", str(tmp_path / "d"),
                                       "--sparsity", sparsity, "--dict-size", "64", "--k", "4", "--tokens", "4096",
                                       "--batch-size", "1024", "--no-registry", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["sae"]["sparsity"] == sparsity
    spec = SweepSpec.from_dict({"name": "contract", "store": str(store.path), "train": {"tokens": 4096},
                                "grid": {"sparsity": [sparsity], "dict_size": [64, 128]}})
    configs = spec.configurations(store.d)
    assert {s.sparsity for s, _ in configs} == {sparsity} and len(configs) == 2
    assert sorted(i for pack in spec.pack_plan(store.d, 2) for i in pack) == [0, 1]


def test_the_shipped_code_rebuilds_every_architecture_as_serving_does(tmp_path):
    """Serving imports ``sae_registry_code.model.sae`` from the model folder's code/ (registry/serving.py)."""
    for sparsity in ALL:
        sae = _trained_sae(sparsity)
        sae.save(tmp_path / sparsity)
        torch.save(sae.encode(torch.ones(3, 8)), tmp_path / f"{sparsity}.codes.pt")
    code = shipped_code(tmp_path / "code").parent
    builtin = [name for name, entry in catalogue().items() if entry.source == "sae-registry"]
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(code)!r})
        from sae_registry_code.model.sae import SparseAutoencoder
        for name in {builtin!r}:
            sae = SparseAutoencoder.load({str(tmp_path)!r} + "/" + name)
            expected = torch.load({str(tmp_path)!r} + "/" + name + ".codes.pt")
            torch.testing.assert_close(sae.encode(torch.ones(3, 8)), expected, rtol=0, atol=0)
        assert not [m for m in sys.modules if m == "sae_registry" or m.startswith("sae_registry.")]
        print("ok", len({builtin!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
