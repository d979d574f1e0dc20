"""Feature cards: statistics, contexts from token provenance, promoted tokens, HTML in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import chromium

from sae_registry import ActivationStore, SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.analysis.cards import (
    Cards,
    Context,
    FeatureCard,
    LatentStats,
    choose_features,
    describe_choice,
    latent_stats,
    load_tokenizer,
    make_cards,
    promoted_tokens,
    token_pieces,
)
from sae_registry.analysis.cards_page import band_of
from sae_registry.harvest.local import default_model_path


class WordTokenizer:
    """Token ``i`` is the word ``w<i>``; token 7 is markup, to prove the page escapes what it shows."""

    @staticmethod
    def word(i: int) -> str:
        return "<b>&amp;" if i == 7 else f"w{i}"

    def decode(self, ids) -> str:
        return " ".join(self.word(int(i)) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return self.word(ids) if isinstance(ids, int) else [self.word(int(i)) for i in ids]


def _store(path, n=3000, d=32, provenance=True, window=10):
    """Random rows; row i is token ``i % 50`` at position ``i % window + 1`` of window ``i // window``."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    i = np.arange(n)
    with ActivationStore.create(path, d=d, chunk_tokens=512, provenance=provenance, source={"model": "words"}) as s:
        for start in range(0, n, 700):
            stop = min(start + 700, n)
            prov = {"token_id": i[start:stop] % 50, "seq": i[start:stop] // window, "pos": i[start:stop] % window + 1}
            s.append(x[start:stop], prov if provenance else None)
    return ActivationStore.open(path)


def _sae(d=32, size=64, k=4) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder.build(d, size, top_k=k)


def test_latent_stats_match_one_dense_pass(tmp_path):
    store, sae = _store(tmp_path / "s.zarr"), _sae()
    stats = latent_stats(sae, store, split="all", n_top=5, batch_size=333)  # batches across chunks
    with torch.no_grad():
        codes = sae.encode(store.read()).numpy()
    active = codes > 0
    np.testing.assert_array_equal(stats.count, active.sum(0))
    assert stats.n_tokens == 3000
    np.testing.assert_allclose(stats.frequency, active.mean(0))
    np.testing.assert_allclose(stats.mean_active, codes.sum(0) / np.maximum(active.sum(0), 1), rtol=1e-5)
    for f in range(64):
        want = np.sort(codes[:, f])[::-1][:5]
        np.testing.assert_allclose(stats.top_values[f], want, rtol=1e-6)
        fired = stats.top_rows[f] >= 0
        np.testing.assert_allclose(codes[stats.top_rows[f][fired], f], stats.top_values[f][fired], rtol=1e-6)
    assert choose_features(stats, top=3, select="frequent") == [int(f) for f in np.argsort(-active.sum(0),
                                                                                           kind="stable")[:3]]
    with pytest.raises(SAERegistryError, match=r"latent indices in 0..63; got \[64\]"):
        choose_features(stats, [1, 64])


def test_cards_show_each_top_token_in_its_own_window(tmp_path):
    store, sae = _store(tmp_path / "s.zarr"), _sae()
    cards = make_cards(sae, store, features=[3, 7, 3], n_contexts=4, window=3, split="all", tokenizer=WordTokenizer())
    assert [c.feature for c in cards.cards] == [3, 7]
    assert "no unembedding" in cards.unembedding_note
    prov = store.provenance()
    for card in cards.cards:
        assert len(card.contexts) == 4
        assert [c.activation for c in card.contexts] == sorted((c.activation for c in card.contexts), reverse=True)
        assert card.max_activation == pytest.approx(card.contexts[0].activation, rel=1e-5)
        for ctx in card.contexts:
            words = [t.strip() for t in ctx.tokens]
            assert words[ctx.center] == WordTokenizer.word(int(prov["token_id"][ctx.row]))
            assert ctx.activations[ctx.center] == pytest.approx(ctx.activation, rel=1e-4)
            assert ctx.seq == prov["seq"][ctx.row] and ctx.pos == prov["pos"][ctx.row]
            # never more than `window` tokens either side, and never outside the row's window
            assert ctx.center <= 3 and len(ctx.tokens) - ctx.center - 1 <= 3
            first = ctx.row - ctx.center
            assert set(prov["seq"][first : first + len(ctx.tokens)]) == {ctx.seq}
    page = cards.to_html()
    assert page.count('<section class="card"') == 2 and 'id="f7"' in page
    assert page.count('<mark class="top"') == 8
    assert "<b>&" not in page and "<script" not in page and "http" not in page  # escaped, self-contained
    markup = Cards("a <title>", {"x": "<i>"}, [FeatureCard(1, 0.5, 1.0, 2.0, [Context(0, 0, 1, 2.0, [" <b>&amp;", " w1"], [2.0, 0.5], 0)])])
    escaped = markup.to_html()
    assert "<b>&" not in escaped and "<i>" not in escaped and "<title>a &lt;title&gt;</title>" in escaped
    assert '<mark class="top" title="2.000"> &lt;b&gt;&amp;amp;</mark>' in escaped
    out = cards.write(tmp_path / "cards")
    data = json.loads((out / "cards.json").read_text())
    assert [f["feature"] for f in data["features"]] == [3, 7] and data["info"]["split"] == "all"
    assert "[[" in cards.text() and "feature 7" in cards.text()


def test_cards_need_token_provenance(tmp_path):
    store = _store(tmp_path / "old.zarr", provenance=False)
    with pytest.raises(SAERegistryError, match="without token provenance.*re-harvest"):
        make_cards(_sae(), store, tokenizer=WordTokenizer())
    with pytest.raises(SAERegistryError, match="reads 16-wide activations but .* 32-wide"):
        latent_stats(_sae(d=16), store)


def test_promoted_tokens_are_the_decoder_directions_top_logits():
    W_U = torch.randn(100, 8)
    directions = torch.randn(3, 8)
    values, ids = promoted_tokens(directions, W_U, k=5)
    logits = directions @ W_U.T
    torch.testing.assert_close(values, logits.sort(dim=1, descending=True).values[:, :5])
    assert ids.shape == (3, 5) and all(logits[i, ids[i, 0]] == logits[i].max() for i in range(3))


def test_printed_cards_cannot_drive_the_terminal():
    from sae_registry.analysis.cards import Cards, Context, FeatureCard

    hostile = ["\x1b]0;owned\x07", "\x1b[2J", "\u202egnp.exe", "\x9b31m", "ok"]
    card = FeatureCard(3, 0.5, 1.0, 2.0, [Context(0, 0, 0, 2.0, hostile, [0.0] * 5, 4)],
                       promoted=[("\x1b[31mred", 1.0)])
    text = Cards("t", {}, [card]).text()
    assert not any(ch in text for ch in "\x1b\x07\x9b\u202e")
    assert "\\x1b]0;owned\\x07" in text and "\\u202egnp.exe" in text and "[[ok]]" in text


def test_token_pieces_rebuild_the_decoded_text():
    tok = load_tokenizer({"model_path": str(default_model_path())})
    ids = tok("Feature cards highlight tokenization.", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids)
    assert token_pieces(tok, ids[3:])[0] == tok.decode(ids[3:4]).removeprefix("##")  # starts mid-word
    with pytest.raises(SAERegistryError, match="cannot load the store's tokenizer"):
        load_tokenizer({"model_path": "/nonexistent/model"})


# -- end to end: a registered dictionary, the CLI, MLflow, headless Chromium ------------------------------


def _dump_dom(page: Path, profile: Path) -> str:
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_cards_command_logs_a_page_that_renders_in_headless_chromium(minilm_store, tmp_path):
    import mlflow
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.registry.runs import train_and_register
    from sae_registry.registry.tracking import Tracking
    from sae_registry.training.loop import TrainConfig

    assert minilm_store.has_provenance
    recorded = train_and_register(minilm_store, SAEConfig(384, 256, 8),
                                  TrainConfig(tokens=20_000, batch_size=1024, eval_every=10), tmp_path / "run",
                                  family="cards-test", alias="champion", progress=False)
    r = CliRunner().invoke(main, ["cards", "cards-test@champion", "--top", "3", "--select", "frequent", "--contexts", "4", "--window", "6",
                                  "--print", "--out", str(tmp_path / "cards")])
    assert r.exit_code == 0, r.output
    assert "3 feature cards written" in r.output and r.output.count("[[") == 12
    assert "logged on the dictionary's run" in r.output

    # the run carries the page, where the MLflow UI's artifact viewer finds it
    client = mlflow.MlflowClient(tracking_uri=Tracking.resolve().uri)
    logged = {a.path for a in client.list_artifacts(recorded.run_id, "cards")}
    assert logged == {"cards/index.html", "cards/cards.json"}
    page = Path(mlflow.artifacts.download_artifacts(run_id=recorded.run_id, artifact_path="cards/index.html",
                                                    dst_path=str(tmp_path / "fetched")))
    features = [f["feature"] for f in json.loads((tmp_path / "cards" / "cards.json").read_text())["features"]]
    assert len(features) == 3

    dom = _dump_dom(page, tmp_path / "chromium-profile")
    assert "<title>Feature cards: cards-test/1</title>" in dom
    for f in features:  # listed in the index and as a card
        assert f'href="#f{f}"' in dom and f'data-feature="{f}"' in dom and f"Feature {f}</h2>" in dom
    marks = re.findall(r'<mark class="top" title="[0-9.]+">([^<]+)</mark>', dom)
    assert len(marks) == 12 and all(m.strip() for m in marks)  # a highlighted token in every context
    assert "Top activating contexts" in dom and "no unembedding" in dom  # MiniLM is an encoder: no W_U
    shot = tmp_path / "cards.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}",
                    "--window-size=1000,800", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


@pytest.mark.slow
def test_cards_show_promoted_tokens_where_the_model_has_an_unembedding(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_registry.harvest.local import demo_texts, harvest

    model_dir = tmp_path / "tiny-gpt2"  # a small causal LM with an LM head, sharing MiniLM's vocabulary
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=128, n_embd=32, n_layer=2, n_head=2)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, model_dir / name)
    store = harvest(tmp_path / "g.zarr", demo_texts()[:20], model_path=model_dir, layer=1, max_tokens=800,
                    progress=False)
    sae = _sae(d=32, size=64, k=4)
    cards = make_cards(sae, store, features=[0, 1], n_contexts=3, window=4, split="all")
    W_U = GPT2LMHeadModel.from_pretrained(model_dir).get_output_embeddings().weight.detach()
    want = (sae.W_dec[[0, 1]].detach() @ W_U.T).topk(10, dim=1).indices
    tok = load_tokenizer(store.source)
    for card, ids in zip(cards.cards, want):
        assert [t for t, _ in card.promoted] == tok.convert_ids_to_tokens(ids.tolist())
    assert cards.unembedding_note == "" and "<code title=" in cards.to_html()


def _stats_with_bands() -> LatentStats:
    """10,000 tokens; latents 0-3 dense, 4-43 common, 44-143 rare, 144-149 dead."""
    count = np.array([5000, 3000, 2000, 1500] + [500 - 10 * i for i in range(40)] + [9 - i % 9 for i in range(100)]
                     + [0] * 6)
    n = len(count)
    return LatentStats(10_000, count, count * 1.0, np.ones((n, 1)), np.zeros((n, 1), dtype=np.int64))


def test_cards_sample_across_frequency_bands_by_default_and_say_so():
    stats = _stats_with_bands()
    chosen = choose_features(stats, top=12)
    bands = [band_of(stats.frequency[f]) for f in chosen]
    assert bands == ["dense"] * 4 + ["common"] * 4 + ["rare"] * 4  # as evenly as the bands allow, dense first
    assert choose_features(stats, top=12) == chosen and choose_features(stats, top=12, seed=1) != chosen  # seeded
    assert not set(chosen) & set(range(144, 150))  # never a dead latent
    assert choose_features(stats, top=3, select="frequent") == [0, 1, 2]  # the old way, on request
    how = describe_choice(stats, chosen, None, "bands", 0)
    assert "across frequency bands" in how and "dense (>= 10% of tokens): 4 of 4" in how
    assert "common (0.1-10% of tokens): 4 of 40" in how and "rare (< 0.1% of tokens): 4 of 100" in how
    assert "6 never fire" in how
    assert len(choose_features(stats, top=1000)) == 144  # every live latent, no more
    with pytest.raises(SAERegistryError, match="select must be one of bands, frequent"):
        choose_features(stats, top=3, select="top")


def test_the_cards_index_and_text_say_how_latents_were_chosen(tmp_path):
    import html

    store, sae = _store(tmp_path / "s.zarr"), _sae()
    cards = make_cards(sae, store, top=6, tokenizer=WordTokenizer())
    assert cards.info["chosen"].startswith("a random sample (seed 0) of 6 latents across frequency bands")
    assert cards.text().splitlines()[0] == f"chosen: {cards.info['chosen']}"
    assert html.escape(cards.info["chosen"]) in cards.to_html()
    frequent = make_cards(sae, store, top=6, select="frequent", tokenizer=WordTokenizer())
    assert frequent.info["chosen"] == "the 6 most frequent latents (--select frequent)"
