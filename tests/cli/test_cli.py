import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae_registry import ActivationStore, SparseAutoencoder
from sae_registry.cli.commands import DEMO_STORE, main


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("sae-registry")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("harvest", "train", "demo"):
        assert command in out


@pytest.mark.slow
def test_harvest_then_train_from_the_command_line(tmp_path):
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n\n" * 400)
    (text / "b.md").write_text("Sparse autoencoders find interpretable features in activations.\n\n" * 400)
    runner = CliRunner()
    r = runner.invoke(main, ["harvest", "--out", str(tmp_path / "s.zarr"), "--text", str(text),
                             "--layer", "2", "--max-tokens", "6000"])
    assert r.exit_code == 0, r.output
    assert "wrote 6,000 tokens x 384" in r.output
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert store.source["layer"] == 2 and store.source["text"] == str(text)

    r = runner.invoke(main, ["train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run"),
                             "--dict-size", "256", "--k", "8", "--tokens", "20000", "--batch-size", "512",
                             "--eval-every", "10"])
    assert r.exit_code == 0, r.output
    assert "FVU" in r.output and "L0" in r.output and "tokens/s" in r.output
    sae = SparseAutoencoder.load(tmp_path / "run")
    assert (sae.cfg.dict_size, sae.cfg.top_k) == (256, 8)
    # and resume from its final checkpoint has nothing left to do but finishes cleanly
    r = runner.invoke(main, ["train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run"),
                             "--dict-size", "256", "--k", "8", "--tokens", "20000", "--batch-size", "512",
                             "--eval-every", "10", "--resume"])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_demo_reuses_its_store_and_prints_metrics(minilm_store, tmp_path):
    shutil.copytree(minilm_store.path, tmp_path / "data" / DEMO_STORE)
    r = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                  "--dict-size", "512", "--tokens", "20000", "--batch-size", "1024"])
    assert r.exit_code == 0, r.output
    assert "using" in r.output and "harvesting" not in r.output
    assert '"fvu"' in r.output and '"dead_fraction"' in r.output
    assert (tmp_path / "run" / "sae.safetensors").exists()
    assert "registered as minilm-l3-demo/1" in r.output and "loaded back" in r.output
    assert (tmp_path / "mlflow.db").exists()  # the embedded registry, in the working directory


def test_errors_are_one_clear_line(tmp_path):
    r = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "Error: no activation store at" in r.output
    assert "Traceback" not in r.output


# -- options generated from the configurations ----------------------------------------------------


def _captured(monkeypatch, command: str, *args: str):
    """The configs `train --no-registry` (or `demo`) would train with, given ``args``; nothing is trained."""
    import sae_registry.harvest.local
    import sae_registry.training.loop
    from sae_registry.cli import commands as cli

    seen = {}

    class Store:
        d, path, has_provenance = 8, Path("s.zarr"), False

    def fake_train(store, sae_cfg, train_cfg, out, **kw):
        seen.update(sae=sae_cfg, train=train_cfg)
        raise SystemExit(0)

    monkeypatch.setattr("sae_registry.store.reader.ActivationStore.open", lambda path: Store())
    monkeypatch.setattr(sae_registry.training.loop, "train", fake_train)
    monkeypatch.setattr("sae_registry.registry.runs.train_and_register", fake_train)
    monkeypatch.setattr(sae_registry.harvest.local, "ensure_store", lambda *a, **kw: Store())
    base = ["train", "--store", "s.zarr", "--out", "o", "--no-registry"] if command == "train" else ["demo"]
    r = CliRunner().invoke(cli.main, [*base, *args])
    assert r.exit_code == 0, r.output
    return seen["sae"], seen["train"]


def test_every_training_option_is_on_the_command_line():
    from dataclasses import fields

    from sae_registry.config.options import SAEConfig, TrainConfig

    for command in ("train", "demo"):
        params = {p.name: p for p in main.commands[command].params}
        missing = [f.name for f in fields(TrainConfig) if f.name not in params]
        assert not missing, (command, missing)
        for f in fields(TrainConfig):
            assert params[f.name].default is None  # unset: the dataclass's default, not a second copy
            assert f.metadata["help"] in params[f.name].help
    assert {"dict_size", "top_k", "sparsity"} <= {p.name for p in main.commands["train"].params}
    precision = next(p for p in main.commands["train"].params if p.name == "precision")
    assert tuple(precision.type.choices) == TrainConfig.__dataclass_fields__["precision"].metadata["choices"]
    assert SAEConfig.__dataclass_fields__["top_k"].metadata["flags"] == ("--k",)


def test_options_reach_the_configs_and_unset_ones_keep_the_defaults(monkeypatch):
    from sae_registry.config.options import TrainConfig

    sae, cfg = _captured(monkeypatch, "train", "--precision", "bfloat16", "--no-sparse-backward", "--k", "8",
                         "--dict-size", "64", "--aux-k", "3", "--l1-warmup-fraction", "0.1", "--free-decoder-norm",
                         "--eval-tokens", "512")
    assert (sae.input_size, sae.dict_size, sae.top_k, sae.sparsity) == (8, 64, 8, "top_k")
    assert (cfg.precision, cfg.sparse_backward, cfg.aux_k, cfg.l1_warmup_fraction, cfg.unit_norm_decoder,
            cfg.eval_tokens) == ("bfloat16", False, 3, 0.1, False, 512)
    assert cfg.tokens == TrainConfig().tokens and cfg.lr is None and cfg.normalize_inputs is True
    sae, cfg = _captured(monkeypatch, "demo", "--precision", "bfloat16")
    assert cfg.precision == "bfloat16" and cfg.tokens == 1_500_000 and sae.sparsity == "top_k"
    sae, cfg = _captured(monkeypatch, "demo", "--tokens", "1000")
    assert cfg.tokens == 1000


def test_bad_options_are_refused_before_any_work(tmp_path):
    for args, message in [(["--precision", "fp8"], "Invalid value for '--precision'"),
                          (["--lr", "0"], "Error: --lr must be > 0, got 0"),
                          (["--k", "64", "--dict-size", "32"], r"top_k \(64\) cannot exceed dict_size \(32\)")]:
        # the store does not exist: the option is refused first, and nothing is harvested or opened
        r = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path), *args])
        assert r.exit_code in (1, 2) and re.search(message, r.output), r.output
        assert "no activation store" not in r.output
    r = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path / "d"), "--batch-size", "0"])
    assert r.exit_code == 1 and "Error: --batch-size must be a positive integer, got 0" in r.output, r.output
    assert not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, ["harvest", "--out", str(tmp_path / "h.zarr"), "--layer", "-1"])
    assert r.exit_code == 1 and "Error: --layer must be >= 0, got -1" in r.output, r.output


def test_a_typo_inside_a_specs_harvest_block_is_one_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: h\nstore: s.zarr\ngrid: {k: [4]}\nharvest: {layer: 1, max_tokns: 2000}\n")
    r = CliRunner().invoke(main, ["sweep", str(spec)])
    assert r.exit_code == 1 and r.output.count("Error:") == 1, r.output
    assert "harvest.max_tokns: unknown harvest option" in r.output and "max_tokens" in r.output
    assert "Traceback" not in r.output


def test_harvest_spec_defaults_are_harvests_own():
    import inspect

    from sae_registry.config.options import HarvestSpec
    from sae_registry.harvest.local import harvest

    signature = inspect.signature(harvest).parameters
    for name, value in HarvestSpec().harvest_options().items():
        assert signature[name].default == value, name


def test_the_cli_and_the_configs_need_no_torch_ray_or_mlflow():
    """`--help` is built from the torch-free configs: cli.py, config.py and sweep_spec.py import (and every
    command's help builds) with torch, Ray and MLflow made unimportable (the package's own __init__ skipped)."""
    package = Path(__file__).resolve().parents[2] / "sae_registry"
    code = f"""
import importlib.abc, sys, types
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ray", "mlflow"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
package = types.ModuleType("sae_registry")
package.__path__ = [{str(package)!r}]
sys.modules["sae_registry"] = package
import click
import sae_registry.cli as cli
import sae_registry.config.sweep
for command in cli.main.commands.values():
    assert "--help" in command.get_help(click.Context(command))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
