import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae_registry import ActivationStore, SparseAutoencoder
from sae_registry.cli import DEMO_STORE, main


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
