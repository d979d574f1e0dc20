"""The MLflow UI is a front door too: a registered family's page and a version's page explain
themselves (their Markdown descriptions render), checked in headless Chromium against a real server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from procs import chromium, start_mlflow_server

from sae_registry import ActivationStore, SAEConfig
from sae_registry.registry.runs import train_and_register
from sae_registry.training.loop import TrainConfig


def _rendered(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (the UI is a single-page app that fetches the registry)."""
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw", "--dump-dom", url],
        capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_family_and_version_pages_show_their_descriptions(tmp_path):
    with ActivationStore.create(tmp_path / "acts.zarr", d=16, chunk_tokens=1024,
                                source={"model": "synthetic-model", "layer": 2}) as writer:
        writer.append(torch.randn(8192, 16))
    store = ActivationStore.open(tmp_path / "acts.zarr")
    (tmp_path / "server").mkdir()
    with start_mlflow_server(tmp_path / "server") as server:
        recorded = train_and_register(store, SAEConfig(16, 64, 4), TrainConfig(tokens=8192, batch_size=1024),
                                      tmp_path / "run", family="ui-demo", alias="champion", progress=False,
                                      tracking_uri=server["uri"])
        fvu = recorded.result.metrics["fvu"]

        family_page = _rendered(f"{server['uri']}/#/models/ui-demo", tmp_path / "profile-a")
        # the Markdown is rendered (bold family name, list items), not shown as source
        assert "<strong>ui-demo</strong>" in family_page, family_page[-3000:]
        assert "a family of sparse-autoencoder dictionaries made with sae-registry" in family_page
        assert "synthetic-model" in family_page and store.fingerprint in family_page

        version_page = _rendered(f"{server['uri']}/#/models/ui-demo/versions/1", tmp_path / "profile-b")
        assert f"{fvu:.4g}" in version_page  # the numbers' table
        assert "plots/training_curves.png" in version_page and "cards/index.html" in version_page
        assert recorded.run_id in version_page
