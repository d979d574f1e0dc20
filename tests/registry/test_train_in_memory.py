"""`sae_registry.train`: a dictionary straight from a tensor or numpy array, registered when a family is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sparse_dictionary_data

import sae_registry
from sae_registry import SAEConfig, SAERegistryError, TrainConfig
from sae_registry.store.source import ArraySource

SMALL = {"tokens": 24 * 256, "batch_size": 256, "eval_every": 8, "eval_tokens": 512, "lr": 3e-3, "device": "cpu"}


@pytest.fixture(scope="module")
def acts() -> np.ndarray:
    x, _ = sparse_dictionary_data(8_000, d=16, n_true=32)
    return x.numpy()


def test_trains_from_a_numpy_array_without_a_registry(acts, tmp_path):
    r = sae_registry.train(acts, dict_size=64, top_k=3, out_dir=tmp_path / "run", progress=False, **SMALL)
    assert (r.run_id, r.version) == (None, None)
    assert r.sae.cfg.input_size == 16 and r.sae.cfg.dict_size == 64
    assert r.metrics["fvu"] < 0.5  # it learnt something in 24 steps
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    fingerprint = ArraySource(acts).fingerprint
    assert saved["store"] == {"path": f"memory:{fingerprint}", "fingerprint": fingerprint, "source": {},
                              "n_tokens": len(acts)}
    assert [p.name for p in Path.cwd().iterdir()] == ["run"]  # nothing recorded: no mlflow.db, no mlruns/


def test_configs_and_options_combine_and_a_temporary_out_dir_is_made(acts):
    sae_cfg = SAEConfig(16, 32, 4)
    r = sae_registry.train(torch.from_numpy(acts), sae_cfg, TrainConfig(**SMALL), top_k=2, tokens=2048,
                           progress=False)
    assert (r.sae.cfg.dict_size, r.sae.cfg.top_k) == (32, 2)  # options replace the config's fields
    assert r.result.history[-1]["tokens"] == 2048
    assert (r.result.out_dir / "sae.safetensors").is_file() and r.result.out_dir.name.startswith("sae-train-")


def test_the_same_array_resumes_and_another_is_refused(acts, tmp_path):
    out = tmp_path / "run"
    sae_registry.train(acts, dict_size=32, top_k=2, out_dir=out, progress=False, **SMALL)
    with pytest.raises(SAERegistryError, match="already holds a dictionary"):
        sae_registry.train(acts, dict_size=32, top_k=2, out_dir=out, progress=False, **SMALL)
    other = acts.copy()
    other[0, 0] += 1
    with pytest.raises(SAERegistryError, match="store_fingerprint was"):
        sae_registry.train(other, dict_size=32, top_k=2, out_dir=out, resume=True, progress=False, **SMALL)


BAD = {
    "nan": (lambda a: np.where(np.arange(len(a))[:, None] == 5, np.nan, a), {}, "NaN or Inf .row 5"),
    "1-d": (lambda a: a[0], {}, "must be 2-d"),
    "ints": (lambda a: a.astype(np.int32), {}, "must hold floats"),
    "list": (lambda a: a.tolist(), {}, "got list"),
    "width": (lambda a: a, {"input_size": 8}, r"input_size \(8\) differs from the width of the activations \(16\)"),
    "option": (lambda a: a, {"dict_sise": 64}, r"unknown options \['dict_sise'\]"),
    "value": (lambda a: a, {"top_k": 0}, "top_k must be a positive integer"),
    "alias alone": (lambda a: a, {"alias": "champion"}, "give family= too"),
    "family": (lambda a: a, {"family": "a/b"}, "family name 'a/b'"),
    "sae_cfg": (lambda a: a, {"sae_cfg": {"dict_size": 8}}, "sae_cfg must be an SAEConfig"),
    "batch": (lambda a: a, {"batch_size": 10**6}, "fewer than one batch"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_any_run(acts, tmp_path, case):
    change, kw, words = BAD[case]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = {"family": "mem", "tracking_uri": uri} if "alias" not in kw else {}
    with pytest.raises(SAERegistryError, match=words):
        sae_registry.train(change(acts), **{**SMALL, **registry, **kw, "progress": False})
    if (tmp_path / "mlflow.db").exists():  # no run was started, none registered
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        assert not client.search_registered_models()
        experiment = client.get_experiment_by_name("mem")
        assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_train_and_register_from_an_array_then_load_by_alias(acts, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = ArraySource(acts, source={"model": "synthetic", "layer": 0})
    r = sae_registry.train(source, dict_size=64, top_k=3, family="in-memory", alias="champion", tracking_uri=uri,
                           progress=False, **SMALL)
    assert r.version == "1" and r.run_id
    d = sae_registry.load("in-memory@champion", tracking_uri=uri)
    x = torch.from_numpy(acts[-256:])
    torch.testing.assert_close(d.encode(x), r.sae.encode(x))
    assert d.lineage["store.path"] == f"memory:{source.fingerprint}"
    assert d.lineage["store.fingerprint"] == source.fingerprint
    assert d.lineage["source.model"] == "synthetic"
    assert d.metrics["fvu"] == pytest.approx(r.metrics["fvu"])
    with pytest.raises(SAERegistryError, match="held in memory"):  # cards cannot reopen what was never written
        from sae_registry.analysis.cards import cards_for

        cards_for("in-memory@champion", tracking_uri=uri, log=False)
