"""A tiny random BERT as a local model folder, and the checks the harvest tests share (tests/harvest,
tests/store/test_s3.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sae_registry import ActivationStore
from sae_registry.store.layout import PROVENANCE

OPTIONS = dict(layer=1, max_length=32, batch_size=4, chunk_tokens=64, progress=False, device="cpu")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sae_registry.harvest.local import default_model_path

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(path)
    return path


def same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert np.array_equal(a._array[:], b._array[:])
    for name in PROVENANCE:
        assert np.array_equal(a.provenance()[name], b.provenance()[name]), name
    for key in ("n_tokens", "fingerprint", "mean", "mean_norm", "total_variance", "source", "d", "dtype"):
        assert a.metadata[key] == b.metadata[key], key
