"""Dictionaries registered by sae-registry 4cae604 (before the package moved into subpackages) still
load, encode, serve and list with today's code.

``tests/fixtures/registry_v0`` is an embedded registry (``mlflow.db`` + ``mlruns/``) that the OLD code
wrote with ``tests/fixtures/make_registry_v0.py``: one family, ``compat-v0``, one version per sparsity
rule with the alias ``v0-<rule>``, and ``reference.safetensors`` holding an input batch and what the old
``load(...).encode`` / ``decode`` returned for it. MLflow records absolute artifact locations, so each
test session copies the folder and rewrites the build folder's path in the copy's database (and only
that); the files the old code wrote are used as they are.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sae_registry

FIXTURE = Path(__file__).parents[1] / "fixtures" / "registry_v0"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())
FAMILY = MANIFEST["family"]
RULES = list(MANIFEST["rules"])
SHIPPED_PACKAGE = "sae_registry_code"  # the private package each logged model carries in its code/ folder


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: the same weights on the same input (another kernel may round otherwise)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def rewrite_root(db: Path, old: str, new: str) -> int:
    """Replace the absolute folder ``old`` by ``new`` in every text value of every table; the number of values changed.

    Generic on purpose: experiments.artifact_location, runs.artifact_uri, logged_models.artifact_location,
    model_versions.source / storage_location, the ``store.path`` tags and whatever else MLflow keeps there.
    """
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]:
                changed += con.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                    f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old)).rowcount
    return changed


def values_naming(db: Path, text: str) -> list[tuple[str, str]]:
    """(table, column) of every text value in ``db`` that contains ``text``."""
    found = []
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]:
                hit = con.execute(f'SELECT 1 FROM "{table}" WHERE typeof("{column}") = \'text\' '
                                  f'AND instr("{column}", ?) > 0 LIMIT 1', (text,)).fetchone()
                if hit:
                    found.append((table, column))
    return found


@pytest.fixture(scope="module")
def registry_v0(tmp_path_factory) -> dict:
    """A private copy of the fixture whose database names the copy's folder; its tracking URI and references."""
    root = tmp_path_factory.mktemp("compat-v0") / "registry_v0"
    shutil.copytree(FIXTURE, root)
    db = root / "mlflow.db"
    old = MANIFEST["root"]
    assert rewrite_root(db, old, str(root)) > 0
    assert values_naming(db, old) == []  # nothing in the copy still points at the build folder
    return {"root": root, "uri": f"sqlite:///{db}", "reference": load_file(str(root / "reference.safetensors"))}


def test_the_fixture_is_what_the_old_code_wrote():
    """The committed database names only its build folder (the copy names only itself), for every rule."""
    assert MANIFEST["written_by"]["sae_registry_commit"] == "4cae604"
    assert set(RULES) == {"top_k", "l1", "batch_top_k", "jumprelu", "matryoshka"}
    kinds = {table for table, _ in values_naming(FIXTURE / "mlflow.db", MANIFEST["root"])}
    assert {"experiments", "runs", "model_versions", "logged_models"} <= kinds


@pytest.mark.parametrize("rule", RULES)
def test_load_encodes_and_decodes_as_the_old_code_did(registry_v0, rule):
    reference, meta = registry_v0["reference"], MANIFEST["rules"][rule]
    x = reference["x"]
    for attempt in ("download", "cached"):  # the second finds the files cached (and may skip MLflow)
        d = sae_registry.load(f"{FAMILY}@{meta['alias']}", tracking_uri=registry_v0["uri"])
        assert (d.family, d.version) == (FAMILY, meta["version"]), attempt
        assert meta["alias"] in d.aliases
        assert d.config.sparsity == rule
        assert (d.config.input_size, d.config.dict_size, d.config.top_k) == (16, 32, 4)
        assert d.lineage["run_id"] == meta["run_id"]
        with torch.no_grad():
            codes = d.encode(x)
            exact(codes, reference[f"codes.{rule}"])
            exact(d.decode(codes), reference[f"decoded.{rule}"])
            if rule == "top_k":
                values, indices = d.encode_topk(x)
                exact(values, reference["topk_values.top_k"])
                assert torch.equal(indices, reference["topk_indices.top_k"])
    assert (codes != 0).any()  # a dictionary that encodes everything to zero would prove nothing
    by_version = sae_registry.load(f"{FAMILY}/{meta['version']}", tracking_uri=registry_v0["uri"])
    with torch.no_grad():
        exact(by_version.encode(x), reference[f"codes.{rule}"])


@pytest.mark.parametrize("rule", RULES)
def test_the_registered_pyfunc_model_predicts_the_old_codes(registry_v0, rule, tmp_path, monkeypatch):
    """``family@alias`` resolved by the registry at an explicit URI, its model loaded as MLflow's pyfunc.

    Through ``MlflowClient``: MLflow 3.17's ``download_artifacts("models:/family@alias", tracking_uri=...,
    registry_uri=...)`` resolves the alias with the process-wide registry URI whatever it is given (an
    empty ``mlflow.db`` in the working directory), and this test sets no global.

    The model folder runs the code it was logged with (``code/sae_registry_code``, the old modules): this
    checks that today's registry and MLflow still resolve and serve an old model, not today's modules.
    """
    # Loading a model puts its code/ folder first on sys.path and imports the package it carries: both undone
    # after the test, and the package dropped before, so that each model runs the code it was logged with.
    monkeypatch.setattr(sys, "path", list(sys.path))
    forget_shipped_package()
    try:
        predict_with_the_registered_model(registry_v0, rule, tmp_path)
    finally:
        forget_shipped_package()


def forget_shipped_package() -> None:
    for name in [m for m in sys.modules if m == SHIPPED_PACKAGE or m.startswith(SHIPPED_PACKAGE + ".")]:
        del sys.modules[name]


def predict_with_the_registered_model(registry_v0: dict, rule: str, tmp_path: Path) -> None:
    import mlflow.pyfunc
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry_v0["uri"], registry_uri=registry_v0["uri"])
    meta = MANIFEST["rules"][rule]
    version = client.get_model_version_by_alias(FAMILY, meta["alias"])
    assert (str(version.version), version.run_id) == (meta["version"], meta["run_id"])
    (tmp_path / "model").mkdir()  # a copy: loading adds files (__pycache__) to a model folder
    model = mlflow.pyfunc.load_model(client.get_model_version_download_uri(FAMILY, version.version),
                                     dst_path=str(tmp_path / "model"))
    x = registry_v0["reference"]["x"]
    codes = model.predict(x.numpy())
    assert isinstance(codes, np.ndarray) and codes.shape == (8, 32)
    exact(torch.from_numpy(codes), registry_v0["reference"][f"codes.{rule}"])


def test_find_sees_every_old_version(registry_v0):
    found = sae_registry.find(FAMILY, tracking_uri=registry_v0["uri"])
    assert sorted(v.version for v in found) == sorted(m["version"] for m in MANIFEST["rules"].values())
    (top_k,) = sae_registry.find(FAMILY, tracking_uri=registry_v0["uri"], sparsity="top_k")
    assert top_k.version == MANIFEST["rules"]["top_k"]["version"]


def test_the_old_store_opens_and_matches_its_lineage(registry_v0):
    d = sae_registry.load(f"{FAMILY}@v0-top_k", tracking_uri=registry_v0["uri"])
    assert d.lineage["store.path"] == str(registry_v0["root"] / "store.zarr")
    store = sae_registry.ActivationStore.open(d.lineage["store.path"])
    assert store.fingerprint == d.lineage["store.fingerprint"]
    assert (len(store), store.d) == (2048, 16)


def sae_registry_cli(uri: str, *args: str) -> str:
    """The installed console script, as a user runs it; its output (it must succeed)."""
    exe = Path(sys.executable).with_name("sae-registry")
    r = subprocess.run([str(exe), "--tracking-uri", uri, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_cli_lists_and_shows_the_old_family(registry_v0):
    uri = registry_v0["uri"]
    families = sae_registry_cli(uri, "list")
    line = next(line for line in families.splitlines() if line.split()[0] == FAMILY)
    for meta in MANIFEST["rules"].values():
        assert f"{meta['alias']}=v{meta['version']}" in line

    rows = {row.split()[0]: row.split() for row in sae_registry_cli(uri, "list", FAMILY).splitlines()[1:]}
    for rule, meta in MANIFEST["rules"].items():
        assert rows[meta["version"]][1:3] == [meta["alias"], rule]

    meta = MANIFEST["rules"]["top_k"]
    shown = sae_registry_cli(uri, "show", f"{FAMILY}@{meta['alias']}")
    assert shown.splitlines()[0].startswith(f"{FAMILY}/{meta['version']}")
    assert meta["run_id"] in shown
    tags = dict((line.split(None, 1) + [""])[:2] for line in shown.splitlines()[2:] if line.strip())
    assert tags["sparsity"] == "top_k" and tags["dict_size"] == "32"
    assert tags["store.path"] == str(registry_v0["root"] / "store.zarr")
    assert len(tags["sha256.sae.safetensors"]) == 64
