"""docs/extending.md's worked examples, executed: the plugin architecture is installed as a
distribution on a temporary path (a dist-info with its entry point), then trained, registered,
loaded and swept from the command line in processes that see it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "extending.md").read_text()
CLI = [sys.executable, "-m", "sae_registry.cli"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE, re.S)


def install_plugin(where: Path) -> dict[str, str]:
    """The page's package and its entry point as an installed distribution under ``where``; the
    environment of a process that sees it."""
    package = where / "my_rules"
    package.mkdir(parents=True)
    for block in blocks("python"):
        name = re.match(r"# (my_rules/\w+\.py)", block)
        if name:  # the plugin's files; the page's other examples are run by their own tests
            (where / name[1]).write_text(block)
    toml = blocks("toml")[0]
    group, line = re.search(r'\[project\.entry-points\."([^"]+)"\]\n(.+)', toml).groups()
    dist = where / "my_rules-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{line.replace(chr(34), '')}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))}


def run(args: list[str], env: dict, cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_plugin_is_found_and_refused_when_broken(tmp_path):
    env = install_plugin(tmp_path / "site")
    out = run([sys.executable, "-c", "from sae_registry.architectures.catalogue import catalogue; "
               "print(sorted(catalogue())); print(catalogue()['plain_top_k'].source)"], env, tmp_path)
    assert "plain_top_k" in out and "my-rules" in out
    assert "plain_top_k" in run([*CLI, "train", "--help"], env, tmp_path)
    # a second distribution claiming the name is refused, naming both
    clash = tmp_path / "site" / "clash-0.1.dist-info"
    clash.mkdir()
    (clash / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 0.1\n")
    (clash / "entry_points.txt").write_text("[sae_registry.architectures]\nagain = my_rules:PLAIN_TOP_K\n")
    done = subprocess.run([*CLI, "train", "--help"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "already provides" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_plugin_architecture_trains_registers_loads_and_sweeps_from_the_command_line(synthetic_store, tmp_path):
    store, _ = synthetic_store
    env = install_plugin(tmp_path / "site")
    env["RAY_AUTH_MODE"], env["RAY_USAGE_STATS_ENABLED"] = "disabled", "0"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run([*CLI, "--tracking-uri", uri, "train", "--store", str(store.path), "--out", str(tmp_path / "one"),
         "--sparsity", "plain_top_k", "--dict-size", "64", "--k", "4", "--tokens", "8192", "--batch-size", "1024",
         "--name", "plugin", "--alias", "champion", "--device", "cpu"], env, tmp_path)
    assert json.loads((tmp_path / "one" / "config.json").read_text())["sae"]["sparsity"] == "plain_top_k"
    shown = run([*CLI, "--tracking-uri", uri, "show", "plugin@champion"], env, tmp_path)
    assert "plain_top_k" in shown
    loaded = run([sys.executable, "-c", "import sae_registry, torch; "
                  f"d = sae_registry.load('plugin@champion', tracking_uri={uri!r}); "
                  "codes = d.encode(torch.randn(5, 32)); print(type(d.sae.rule).__name__, (codes > 0).sum(-1).tolist())"],
                 env, tmp_path)
    assert loaded.startswith("PlainTopK") and "[4, 4, 4, 4, 4]" in loaded.replace(" ", "").replace(",", ", ")
    spec = {"name": "plugin-sweep", "store": str(store.path), "grid": {"sparsity": ["plain_top_k", "top_k"],
                                                                      "dict_size": [64], "k": [4]},
            "train": {"tokens": 8192, "batch_size": 1024, "eval_every": 4}, "resources": {"cpu": 1, "gpu": 0},
            "max_concurrent_trials": 1, "register": "all", "evaluate": "none"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run([*CLI, "--tracking-uri", uri, "sweep", str(tmp_path / "spec.yaml")], env, tmp_path)
    listed = run([*CLI, "--tracking-uri", uri, "list", "plugin-sweep"], env, tmp_path)
    assert "plain_top_k" in listed.replace("plaintopk", "plain_top_k") and "top_k" in listed


def section(title: str) -> str:
    start = PAGE.index(f"## {title}")
    end = PAGE.find("\n## ", start + 1)
    return PAGE[start:end if end > 0 else None]


def test_the_metric_example_is_computed_recorded_and_listed(monkeypatch, tmp_path):
    """The page's metric, added as it says (a function that ``_scalars`` calls, a row of the table), is
    logged during training, tagged on the registered version and a column of ``sae-registry list``."""
    import numpy as np
    import torch
    from click.testing import CliRunner

    import sae_registry
    from sae_registry.cli.commands import main
    from sae_registry.config import metrics as table
    from sae_registry.metrics import reconstruction

    function, row = re.findall(r"```python\n(.*?)```", section("A metric"), re.S)
    namespace = {"torch": torch}
    exec(function, namespace)
    original = reconstruction._scalars
    monkeypatch.setattr(reconstruction, "_scalars", lambda mse, fvu, density: {
        **original(mse, fvu, density), "dense_fraction": namespace["dense_fraction"](density)})
    monkeypatch.setattr(table, "METRICS", table.METRICS + (eval(row, vars(table)),))
    acts = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = sae_registry.train(acts, dict_size=32, top_k=4, tokens=2048, batch_size=512, eval_every=2,
                              family="dense", tracking_uri=uri, progress=False)
    assert "eval/dense_fraction" in made.result.history[-1]
    version = sae_registry.find("dense", tracking_uri=uri)[0]
    assert float(version.tags["dense_fraction"]) == pytest.approx(made.metrics["dense_fraction"])
    listed = CliRunner().invoke(main, ["--tracking-uri", uri, "list", "dense"])
    assert listed.exit_code == 0 and "dense" in listed.output.splitlines()[0], listed.output


def test_the_store_backend_example_trains_and_fingerprints_as_a_store(tmp_path):
    import numpy as np

    import sae_registry
    from sae_registry import ActivationStore
    from sae_registry.store.source import ActivationSource

    namespace: dict = {}
    exec(blocks("python")[-1], namespace)  # npy_source.py
    acts = np.random.default_rng(0).standard_normal((2048, 16)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    with ActivationStore.create(tmp_path / "acts.zarr", d=16) as writer:
        writer.append(acts)
    source = namespace["open_npy"](tmp_path / "acts.npy")
    assert isinstance(source, ActivationSource)
    assert source.fingerprint == ActivationStore.open(tmp_path / "acts.zarr").fingerprint
    made = sae_registry.train(source, dict_size=32, top_k=4, tokens=1024, batch_size=256, progress=False)
    assert made.sae.cfg.input_size == 16 and made.metrics["l0"] <= 4
