import json
import os

import pytest
import torch

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.training.loop import TrainConfig, geometric_median, train


def test_recovers_a_known_sparse_dictionary(synthetic_store, tmp_path):
    store, true_directions = synthetic_store
    cfg = TrainConfig(tokens=500_000, batch_size=1024, lr=3e-3, eval_every=100, dead_after_tokens=20_000)
    result = train(store, SAEConfig(32, 128, 3), cfg, tmp_path / "run", progress=False)
    assert result.metrics["fvu"] < 0.1
    cosines = true_directions @ result.sae.W_dec.detach().T  # rows are unit norm
    matched = (cosines.max(dim=1).values > 0.9).float().mean()
    assert matched >= 0.9, f"only {matched:.0%} of the true directions were found"
    # what was saved is what was trained
    loaded = SparseAutoencoder.load(tmp_path / "run")
    x = store.read_split("eval")
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["store"]["fingerprint"] == store.fingerprint
    assert saved["metrics"]["fvu"] == pytest.approx(result.metrics["fvu"])
    assert saved["train"]["lr"] == 3e-3


def test_l1_mode_trains_and_the_penalty_sparsifies(synthetic_store, tmp_path):
    store, _ = synthetic_store
    base = dict(tokens=60_000, batch_size=1024, lr=3e-3, eval_every=50)
    weak = train(store, SAEConfig(32, 64, sparsity="l1"), TrainConfig(l1_coeff=1e-4, **base), tmp_path / "a", progress=False)
    strong = train(store, SAEConfig(32, 64, sparsity="l1"), TrainConfig(l1_coeff=3e-2, **base), tmp_path / "b", progress=False)
    assert strong.metrics["l0"] < weak.metrics["l0"]
    assert weak.metrics["fvu"] < 0.5


def test_resume_continues_exactly_where_it_stopped(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=40 * 1024, batch_size=1024, lr=1e-3, eval_every=5, checkpoint_every=10,
                      dead_after_tokens=4096)
    sae_cfg = SAEConfig(32, 64, 4)
    whole = train(store, sae_cfg, cfg, tmp_path / "whole", progress=False)

    class Killed(Exception):
        pass

    def die_at_step_25(step, _metrics, _checkpoint):
        if step == 25:
            raise Killed

    with pytest.raises(Killed):
        train(store, sae_cfg, cfg, tmp_path / "cut", callback=die_at_step_25, progress=False)
    seen = []
    resumed = train(store, sae_cfg, cfg, tmp_path / "cut", resume=True, progress=False,
                    callback=lambda step, _m, _c: seen.append(step))
    assert seen[0] == 25  # the last checkpoint was at step 20: 5 steps redone, not 25
    for a, b in zip(whole.sae.state_tensors().values(), resumed.sae.state_tensors().values()):
        torch.testing.assert_close(a, b)
    assert resumed.metrics == pytest.approx(whole.metrics)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]


def test_resume_refuses_a_checkpoint_of_another_run(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=4 * 1024, batch_size=1024, eval_every=2, checkpoint_every=2)
    train(store, SAEConfig(32, 64, 4), cfg, tmp_path / "r", progress=False)
    with pytest.raises(SAERegistryError, match="made with other options: top_k was 4, now 8;"):
        train(store, SAEConfig(32, 64, 8), cfg, tmp_path / "r", resume=True, progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tokens=0), "tokens must be a positive integer"),
        (dict(batch_size=-1), "batch_size must be a positive integer"),
        (dict(lr=0.0), "lr must be > 0, got 0"),
        (dict(lr="fast"), "lr must be a finite number, got 'fast'"),
        (dict(l1_coeff=-1.0), "l1_coeff must be >= 0, got -1"),
        (dict(lr_decay_fraction=1.5), "lr_decay_fraction must be <= 1, got 1.5"),
        (dict(l1_warmup_fraction="0.1"), "l1_warmup_fraction must be a finite number, got '0.1'"),
        (dict(aux_coeff=float("nan")), "aux_coeff must be a finite number, got nan"),
        (dict(normalize_inputs="yes"), "normalize_inputs must be true or false"),
        (dict(b_dec_init="median"), "b_dec_init must be one of"),
        (dict(encoder_init="xavier"), "encoder_init must be one of"),
        (dict(device="tpu"), "device must be"),
        (dict(precision="fp8"), "precision must be one of float32, bfloat16"),
        (dict(sparse_backward=1), "sparse_backward must be true or false"),
        (dict(encoder_init_scale=0), "encoder_init_scale must be > 0, got 0"),
    ],
)
def test_bad_training_options_raise_our_error(options, message):
    with pytest.raises(SAERegistryError, match=message):
        TrainConfig(**options)


def test_mismatches_with_the_store_are_clear(synthetic_store, tmp_path):
    store, _ = synthetic_store
    with pytest.raises(SAERegistryError, match="input_size"):
        train(store, SAEConfig(16, 64, 4), TrainConfig(tokens=1024), tmp_path, progress=False)
    with pytest.raises(SAERegistryError, match="fewer than one batch"):
        train(store, SAEConfig(32, 64, 4), TrainConfig(batch_size=10**6), tmp_path, progress=False)
    with pytest.raises(SAERegistryError, match="unknown training options"):
        TrainConfig.from_dict({"tokenz": 5})


def test_defaults_follow_the_dictionary_shape():
    top_k = TrainConfig().resolved(SAEConfig(384, 16384, 32))
    assert top_k.lr == pytest.approx(5e-4) and top_k.l1_coeff == 0 and top_k.aux_k == 192
    assert top_k.device == "cpu"
    l1 = TrainConfig().resolved(SAEConfig(384, 4096, sparsity="l1"))
    assert l1.l1_coeff > 0 and l1.lr == pytest.approx(1e-3) and l1.encoder_init_scale == 0.1


def test_encoder_init_option(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = dict(tokens=1024, batch_size=1024, lr=1e-12, lr_decay_fraction=0.0, b_dec_init="zeros")
    tied = train(store, SAEConfig(32, 64, 4), TrainConfig(**cfg), tmp_path / "a", progress=False).sae
    free = train(store, SAEConfig(32, 64, 4), TrainConfig(encoder_init="kaiming", **cfg), tmp_path / "b",
                 progress=False).sae
    torch.testing.assert_close(tied.encoder.encoder.weight, tied.W_dec, atol=1e-6, rtol=0)
    assert not torch.allclose(free.encoder.encoder.weight, free.W_dec, atol=1e-3)


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()


def test_a_pack_trains_each_member_exactly_as_alone(synthetic_store, tmp_path):
    from sae_registry.training.loop import train_pack

    store, _ = synthetic_store
    base = dict(tokens=10 * 1024, batch_size=1024, eval_every=5, dead_after_tokens=4096)
    members = [
        (SAEConfig(32, 64, 4), TrainConfig(lr=1e-3, **base)),
        (SAEConfig(32, 128, 8), TrainConfig(lr=2e-3, **base)),
        (SAEConfig(32, 64, sparsity="l1"), TrainConfig(l1_coeff=1e-3, **base)),
    ]
    packed = train_pack(store, [(s, c, tmp_path / f"p{i}") for i, (s, c) in enumerate(members)], progress=False)
    for i, ((sae_cfg, cfg), result) in enumerate(zip(members, packed)):
        alone = train(store, sae_cfg, cfg, tmp_path / f"a{i}", progress=False)
        for a, b in zip(alone.sae.state_tensors().values(), result.sae.state_tensors().values()):
            torch.testing.assert_close(a, b)
        assert (tmp_path / f"p{i}" / "sae.safetensors").exists()
    with pytest.raises(SAERegistryError, match="must share batch_size"):
        train_pack(store, [(SAEConfig(32, 64, 4), TrainConfig(batch_size=512), tmp_path / "x"),
                           (SAEConfig(32, 64, 4), TrainConfig(batch_size=1024), tmp_path / "y")], progress=False)


def test_a_pack_resumes_members_left_at_different_steps(synthetic_store, tmp_path):
    from sae_registry.training.loop import train_pack

    store, _ = synthetic_store
    cfg = TrainConfig(tokens=20 * 1024, batch_size=1024, eval_every=5, checkpoint_every=5, lr=1e-3)
    shapes = [SAEConfig(32, 64, 4), SAEConfig(32, 64, 8)]
    whole = train_pack(store, [(s, cfg, tmp_path / f"w{i}") for i, s in enumerate(shapes)], progress=False)

    class Killed(Exception):
        pass

    def die(step, _m, _c):
        if step == 15:
            raise Killed

    # the first member dies at its step-15 report: it has checkpointed step 15, the second only step 10
    with pytest.raises(Killed):
        train_pack(store, [(s, cfg, tmp_path / f"c{i}") for i, s in enumerate(shapes)], callbacks=[die, None],
                   progress=False)
    steps = [json.loads((tmp_path / f"c{i}" / "checkpoint" / "state.json").read_text())["step"] for i in range(2)]
    assert steps == [15, 10]
    resumed = train_pack(store, [(s, cfg, tmp_path / f"c{i}") for i, s in enumerate(shapes)], resume=True,
                         progress=False)
    for w, r in zip(whole, resumed):
        for a, b in zip(w.sae.state_tensors().values(), r.sae.state_tensors().values()):
            torch.testing.assert_close(a, b)
        assert [h["step"] for h in r.history] == [h["step"] for h in w.history]


@pytest.mark.slow
@pytest.mark.parametrize("dict_size,k", [(256, 8), (512, 32)])
def test_the_sparse_backward_trains_to_the_dense_backwards_fvu(minilm_store, tmp_path, dict_size, k):
    """Speed must not cost quality: on real activations the sparse top-k path reaches the FVU and
    L0 that plain autograd through the dense product reaches, step for step."""
    base = dict(tokens=60 * 1024, batch_size=1024, eval_every=20, dead_after_tokens=8192)
    sae_cfg = SAEConfig(minilm_store.d, dict_size, k)
    sparse = train(minilm_store, sae_cfg, TrainConfig(**base), tmp_path / "sparse", progress=False)
    dense = train(minilm_store, sae_cfg, TrainConfig(sparse_backward=False, **base), tmp_path / "dense",
                  progress=False)
    assert sparse.metrics["fvu"] < 0.5  # it learned something
    assert sparse.metrics["fvu"] == pytest.approx(dense.metrics["fvu"], rel=0.01)
    assert sparse.metrics["l0"] == pytest.approx(dense.metrics["l0"], abs=0.5)
    for a, b in zip(sparse.history, dense.history):
        assert a["eval/fvu"] == pytest.approx(b["eval/fvu"], rel=0.02)


@pytest.mark.slow
def test_bfloat16_selection_trains_to_nearly_the_same_fvu(minilm_store, tmp_path):
    base = dict(tokens=40 * 1024, batch_size=1024, eval_every=20)
    sae_cfg = SAEConfig(minilm_store.d, 512, 16)
    exact = train(minilm_store, sae_cfg, TrainConfig(**base), tmp_path / "f32", progress=False)
    low = train(minilm_store, sae_cfg, TrainConfig(precision="bfloat16", **base), tmp_path / "bf16", progress=False)
    assert low.metrics["fvu"] == pytest.approx(exact.metrics["fvu"], rel=0.03)
    with pytest.raises(SAERegistryError, match="precision: bfloat16 needs sparsity top_k"):
        train(minilm_store, SAEConfig(minilm_store.d, 512, sparsity="l1"), TrainConfig(precision="bfloat16", **base),
              tmp_path / "l1", progress=False)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_threads_follow_the_cpus_the_process_may_use_and_come_back():
    from sae_registry.training.loop import threads_fit_to_cpus

    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {min(cpus)})
        torch.set_num_threads(2)
        with threads_fit_to_cpus() as n:
            assert n == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2  # the caller's setting is theirs: restored after the call
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(1)
        with threads_fit_to_cpus() as n:
            assert n == 1  # never raised: one thread may have been chosen on purpose
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_training_leaves_the_callers_thread_count_alone(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    seen = []
    try:
        os.sched_setaffinity(0, {min(cpus)})
        torch.set_num_threads(2)
        train(store, SAEConfig(store.d, 64, 4), TrainConfig(tokens=2048, batch_size=1024, eval_every=1),
              tmp_path / "t", progress=False, callback=lambda *_: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}  # fitted while training
        assert torch.get_num_threads() == 2  # and given back
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
