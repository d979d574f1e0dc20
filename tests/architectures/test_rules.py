"""The sparsity rules: selection, sparse steps equal to dense ones, estimators, files, defaults, bad input."""

import json

import pytest
import torch

from sae_registry import SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.architectures.catalogue import SPARSE_BELOW, k_rules, names, rule_of
from sae_registry.training.loop import TrainConfig, train

NEW_RULES = ("batch_top_k", "jumprelu", "matryoshka")


def _sae(sparsity: str, d: int = 8, n: int = 32, k: int = 3, seed: int = 0, **kw) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d, n, k, sparsity, **kw))
    with torch.no_grad():
        sae.encoder.encoder.bias.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
        if sparsity == "jumprelu":
            sae.encoder.threshold.uniform_(0.2, 0.8)
    return sae


def _grads(sae, x, sparse: bool, cfg: TrainConfig):
    sae.zero_grad()
    sae.active_fraction = 0.0 if sparse else 1.0
    out = sae.forward_train(x, sparse_backward=sparse, cfg=cfg)
    loss, _ = sae.rule.loss(sae, x, out, cfg, 1.0, torch.zeros(0, dtype=torch.long))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparsity", ["l1", "batch_top_k", "jumprelu", "matryoshka"])
def test_the_sparse_step_gives_the_dense_steps_numbers(sparsity):
    sae = _sae(sparsity, prefixes="4,12,32" if sparsity == "matryoshka" else None)
    x = torch.randn(16, 8)
    cfg = TrainConfig(l1_coeff=0.01 if sparsity == "l1" else None, aux_coeff=0.0,
                      **({"l0_coeff": 0.05, "jumprelu_bandwidth": 0.3} if sparsity == "jumprelu" else {})
                      ).resolved(sae.cfg)
    dense_loss, dense = _grads(sae, x, False, cfg)
    sparse_loss, sparse = _grads(sae, x, True, cfg)
    torch.testing.assert_close(sparse_loss, dense_loss)
    assert dense.keys() == sparse.keys() and "encoder.encoder.weight" in dense
    if sparsity == "jumprelu":
        assert dense["encoder.threshold"].abs().sum() > 0  # the estimator reached the thresholds
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)


@pytest.mark.parametrize("target", [2.0, 30.0])
def test_jumprelu_target_l0_is_a_quadratic_penalty_per_token_on_both_paths(target):
    sae = _sae("jumprelu")
    x = torch.randn(16, 8)
    cfg = TrainConfig(l0_coeff=0.05, jumprelu_bandwidth=0.3, target_l0=target).resolved(sae.cfg)
    dense_loss, dense = _grads(sae, x, False, cfg)
    sparse_loss, sparse = _grads(sae, x, True, cfg)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)
    with torch.no_grad():
        pre = sae.encoder.encoder(x - sae.b_dec)
        per_token = (pre > sae.encoder.threshold).sum(-1).float()
        mse = (sae(x) - x).pow(2).mean()
    assert 2 < per_token.mean() < 30  # one target below the batch's L0, one above
    torch.testing.assert_close(dense_loss, mse + 0.05 * (2 / target * (per_token - target) ** 2).mean())
    # the penalty alone moves the thresholds towards the target: up when L0 is above it, down below
    sae.zero_grad()
    out = sae.forward_train(x, sparse_backward=False, cfg=cfg)
    loss, _ = sae.rule.loss(sae, x, out, cfg, 1.0, torch.zeros(0, dtype=torch.long))
    mse_only = (out.reconstruction - x).pow(2).mean()
    (loss - mse_only).backward()
    push = sae.encoder.threshold.grad.sum()
    assert (push < 0) if target < per_token.mean() else (push > 0)


def test_l1_turns_sparse_only_when_few_codes_are_active():
    sae = _sae("l1")
    x = torch.randn(16, 8)
    assert sae.forward_train(x).rows is None  # first step: dense, and measures the fraction
    sae.active_fraction = SPARSE_BELOW / 2
    out = sae.forward_train(x)
    assert out.rows is not None and out.hidden_acts.ndim == 1


def test_batch_top_k_keeps_k_times_batch_codes_over_the_batch():
    sae = _sae("batch_top_k", n=32, k=3)
    x = torch.randn(16, 8)
    out = sae.forward_train(x, cfg=TrainConfig())
    assert len(out.hidden_acts) == 3 * 16
    per_row = torch.bincount(out.rows, minlength=16)
    assert per_row.sum() == 48 and per_row.max() > per_row.min()  # varies per row, mean k
    pre = torch.relu(sae.encoder.encoder(x - sae.b_dec))
    assert out.hidden_acts.min() >= pre.flatten().topk(48).values.min() - 1e-6


def test_batch_top_k_estimates_one_inference_threshold_and_uses_it():
    sae = _sae("batch_top_k")
    x = torch.randn(64, 8)
    assert float(sae.encoder.threshold) < 0  # not estimated: inference is the batch's own top k
    assert (sae.encode(x) > 0).sum() <= 3 * 64
    out = sae.forward_train(x, cfg=TrainConfig())
    sae.rule.after_step(sae, out, TrainConfig(), 0)
    t = float(sae.encoder.threshold)
    assert t == pytest.approx(float(out.hidden_acts.detach()[out.hidden_acts > 0].min()))
    pre = sae.encoder.encoder(x - sae.b_dec)
    torch.testing.assert_close(sae.encode(x), pre * (pre > t))


def test_jumprelu_estimator_matches_saelens():
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    pre = torch.randn(16, 32, requires_grad=True)
    t = torch.rand(32, requires_grad=True)
    sae = _sae("jumprelu", n=32)
    with torch.no_grad():
        sae.encoder.threshold.copy_(t)
    cfg = TrainConfig(jumprelu_bandwidth=0.2)
    ours = sae.rule.activate(sae, pre, cfg)
    upstream = torch.randn(16, 32)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (pre, sae.encoder.threshold))
    theirs = JumpReLU.apply(pre, t, 0.2, False)
    g_theirs = torch.autograd.grad((theirs * upstream).sum(), (pre, t))
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)
    from sae_registry.architectures.jumprelu import _Threshold

    step_ours = torch.autograd.grad(_Threshold.apply(pre, t, 0.2, True).sum(), t)[0]
    step_theirs = torch.autograd.grad(Step.apply(pre, t, 0.2, False).sum(), t)[0]
    torch.testing.assert_close(step_ours, step_theirs)


def test_matryoshka_loss_sums_the_prefixes_reconstructions():
    sae = _sae("matryoshka", prefixes=[4, 12, 32])
    x = torch.randn(16, 8)
    cfg = TrainConfig(aux_coeff=0.0).resolved(sae.cfg)
    out = sae.forward_train(x, cfg=cfg)
    assert out.prefixes.shape == (16, 3, 8)
    codes = torch.zeros(16, 32).index_put((out.rows, out.indices), out.hidden_acts.detach())
    for g, end in enumerate((4, 12, 32)):
        torch.testing.assert_close(out.prefixes[:, g].detach(), codes[:, :end] @ sae.W_dec[:end].detach() + sae.b_dec.detach())
    loss, _ = sae.rule.loss(sae, x, out, cfg, 1.0, torch.zeros(0, dtype=torch.long))
    expected = sum((out.prefixes[:, g] - x).pow(2).mean() for g in range(3))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("sparsity", names())
def test_every_rule_saves_and_loads_exactly(sparsity, tmp_path):
    sae = _sae(sparsity, prefixes="8,32" if sparsity == "matryoshka" else None)
    if sparsity in ("batch_top_k", "matryoshka"):
        sae.encoder.threshold.fill_(0.25)
    sae.save(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())["sae"]
    assert config["sparsity"] == sparsity
    assert ("prefixes" in config) == (sparsity == "matryoshka")
    loaded = SparseAutoencoder.load(tmp_path / "d")
    for name, tensor in sae.state_tensors().items():
        torch.testing.assert_close(loaded.state_tensors()[name], tensor, rtol=0, atol=0)
    x = torch.randn(10, 8)
    torch.testing.assert_close(loaded.encode(x), sae.eval().encode(x))
    assert loaded.cfg == SAEConfig.from_dict(config)


@pytest.mark.parametrize("sparsity", ["l1", *NEW_RULES])
def test_encode_topk_is_an_error_without_a_fixed_k(sparsity):
    with pytest.raises(SAERegistryError, match=f"encode_topk needs sparsity top_k.*{sparsity}"):
        _sae(sparsity).encode_topk(torch.randn(2, 8))


@pytest.mark.parametrize("sparsity", NEW_RULES)
def test_every_new_rule_trains_on_a_store(sparsity, synthetic_store, tmp_path):
    store, _ = synthetic_store
    options = {"l0_coeff": 0.1, "jumprelu_init_threshold": 0.3} if sparsity == "jumprelu" else {}
    cfg = TrainConfig(tokens=80 * 1024, batch_size=1024, lr=3e-3, eval_every=40, dead_after_tokens=20_000, **options)
    result = train(store, SAEConfig(32, 128, 3, sparsity), cfg, tmp_path / "run", progress=False)
    assert result.metrics["fvu"] < 0.7, result.metrics
    assert 1 < result.metrics["l0"] < 30, result.metrics  # k = 3; jumprelu: 18 at this l0_coeff, 64 without
    if sparsity != "jumprelu":
        assert float(result.sae.encoder.threshold) > 0  # estimated: never read as plain ReLU
    loaded = SparseAutoencoder.load(tmp_path / "run")
    x = store.read_split("eval")
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x))


def test_jumprelu_target_l0_penalty_is_saelens_quadratic_mode():
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = _sae("jumprelu")
    x = torch.randn(16, 8)
    cfg = TrainConfig(l0_coeff=0.05, jumprelu_bandwidth=0.3, target_l0=6.0).resolved(sae.cfg)
    out = sae.forward_train(x, sparse_backward=False, cfg=cfg)
    loss, _ = sae.rule.loss(sae, x, out, cfg, 1.0, torch.zeros(0, dtype=torch.long))
    ours = loss - (out.reconstruction - x).pow(2).mean()
    g_ours = torch.autograd.grad(ours, sae.encoder.threshold)[0]
    theirs_sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=8, d_sae=32, jumprelu_bandwidth=0.3, jumprelu_sparsity_loss_mode="quadratic", target_l0=6.0))
    with torch.no_grad():
        theirs_sae.threshold.copy_(sae.encoder.threshold)
        theirs_sae.W_dec.copy_(sae.W_dec)  # unit rows: SAELens's step mode no longer weights by their norms
    step = TrainStepInput(x, {"l0": 0.05}, None, 0, False)
    hidden_pre = out.pre_acts.detach()
    theirs = theirs_sae.calculate_aux_loss(step, torch.relu(hidden_pre), hidden_pre, x)["l0_loss"]
    g_theirs = torch.autograd.grad(theirs, theirs_sae.threshold)[0]
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


def test_jumprelu_with_a_target_l0_trains_to_it(synthetic_store, tmp_path):
    store, _ = synthetic_store
    reached = {}
    for target in (None, 40):  # without it, this coefficient stops at L0 about 12 on this store
        cfg = TrainConfig(tokens=60 * 1024, batch_size=1024, lr=1e-2, eval_every=30, l0_coeff=0.1, target_l0=target,
                          jumprelu_init_threshold=0.2)
        reached[target] = train(store, SAEConfig(32, 128, sparsity="jumprelu"), cfg, tmp_path / str(target),
                                progress=False).metrics["l0"]
    assert reached[None] < 20 and 36 < reached[40] < 44, reached


@pytest.mark.parametrize("build, message", [
    (lambda: SAEConfig(8, 32, sparsity="topk"), "sparsity must be one of"),
    (lambda: rule_of("no_such_rule"), "sparsity must be one of"),
    (lambda: SAEConfig(8, 32, sparsity="top_k", prefixes="8,32"), "prefixes applies to sparsity matryoshka only"),
    (lambda: SAEConfig(8, 32, sparsity="matryoshka", prefixes="16,8,32"), "prefixes must be increasing"),
    (lambda: SAEConfig(8, 32, sparsity="matryoshka", prefixes="8,16"), "prefixes must end at dict_size"),
    (lambda: SAEConfig(8, 32, sparsity="matryoshka", prefixes="8,x"), "prefixes must be comma-separated"),
    (lambda: SAEConfig(8, 32, top_k=33, sparsity="batch_top_k"), "top_k .33. cannot exceed dict_size"),
    (lambda: TrainConfig(l0_coeff=-1.0), "l0_coeff must be >= 0"),
    (lambda: TrainConfig(l0_coeff=0.1).resolved(SAEConfig(8, 32)), "l0_coeff applies to sparsity jumprelu only"),
    (lambda: TrainConfig(target_l0=0), "target_l0 must be > 0"),
    (lambda: TrainConfig(threshold_lr_scale=3.0).resolved(SAEConfig(8, 32)), "threshold_lr_scale applies to sparsity jumprelu only"),
    (lambda: TrainConfig(target_l0=8).resolved(SAEConfig(8, 32, sparsity="batch_top_k")),
     "target_l0 applies to sparsity jumprelu only"),
    (lambda: TrainConfig(threshold_lr=0.5).resolved(SAEConfig(8, 32, sparsity="l1")),
     "threshold_lr applies to sparsity batch_top_k or matryoshka only"),
])
def test_bad_rule_options_name_the_field(build, message):
    with pytest.raises(SAERegistryError, match=message):
        build()


def test_a_grid_crosses_each_rule_with_its_own_keys_only():
    from sae_registry.config.sweep import SweepSpec

    spec = SweepSpec.from_dict({"name": "x", "store": "s.zarr", "grid": [{
        "sparsity": list(names()), "dict_size": [64], "k": [4, 8], "l0_coeff": [0.01, 0.1],
        "prefixes": ["16,64", "8,32,64"]}]})
    configs = spec.configurations(16)
    by_rule = {}
    for sae_cfg, train_cfg in configs:
        by_rule.setdefault(sae_cfg.sparsity, []).append((sae_cfg, train_cfg))
    # k crosses the k rules, l0_coeff jumprelu, prefixes matryoshka; any other rule is one point
    expected = {r: 4 if r == "matryoshka" else 2 if r in k_rules() or r == "jumprelu" else 1 for r in names()}
    assert {r: len(c) for r, c in by_rule.items()} == expected
    assert {"top_k": 2, "l1": 1, "batch_top_k": 2, "jumprelu": 2, "matryoshka": 4}.items() <= expected.items()
    assert {t.l0_coeff for _, t in by_rule["jumprelu"]} == {0.01, 0.1}
    assert {s.prefixes for s, _ in by_rule["matryoshka"]} == {"16,64", "8,32,64"}
    assert all(t.l0_coeff is None for r, c in by_rule.items() if r != "jumprelu" for _, t in c)


def test_a_grid_key_of_another_rule_is_refused():
    from sae_registry.config.sweep import SweepSpec

    with pytest.raises(SAERegistryError, match="grid.l0_coeff: belongs to sparsity jumprelu"):
        SweepSpec.from_dict({"name": "x", "store": "s.zarr",
                             "grid": [{"sparsity": ["top_k"], "k": [4], "l0_coeff": [0.1]}]})


def test_every_dictionary_of_a_grid_across_rules_has_a_run_name_of_its_own():
    """A sweep finds its members' runs by name: two dictionaries of one grid may never share one."""
    from sae_registry.config.sweep import SweepSpec
    from sae_registry.sweep.trial import member_names

    spec = SweepSpec.from_dict({
        "name": "names", "store": "s.zarr", "pack": 1,
        "grid": [{"sparsity": ["top_k", "batch_top_k", "matryoshka"], "dict_size": [64, 128], "k": [4, 8]},
                 {"sparsity": ["matryoshka"], "dict_size": [64], "k": [4], "prefixes": ["16,64", "32,64"]},
                 {"sparsity": ["jumprelu"], "dict_size": [64], "l0_coeff": [0.01, 0.1]},
                 {"sparsity": ["jumprelu"], "dict_size": [64], "l0_coeff": [0.1], "target_l0": [8, 16]},
                 {"sparsity": ["l1"], "dict_size": [64], "l1_coeff": [0.01, 0.1]},
                 # keys no rule's name shows: named when they vary across the sweep
                 {"sparsity": ["top_k", "l1"], "dict_size": [256], "lr": [1e-3, 3e-3]},
                 {"sparsity": ["top_k"], "dict_size": [256], "k": [4], "l1_coeff": [0.001]}],
    })
    names = member_names(spec, spec.configurations(32))
    assert len(names) == 12 + 2 + 2 + 2 + 2 + 4 + 1 and len(set(names)) == len(names), names
    assert "jumprelu-d64-l0c0.1-l0t16-s0" in names
    assert {"topk-d256-k32-lr0.003-s0", "l1-d256-l1c0.005-lr0.003-s0", "topk-d256-k4-l1_coeff0.001-s0"} <= set(names)
    assert "topk-d64-k4-s0" in names  # the grids' usual members keep their names
    one = SweepSpec.from_dict({"name": "one", "store": "s.zarr", "grid": [
        {"sparsity": ["top_k", "jumprelu"], "dict_size": [64], "target_l0": [32], "threshold_lr_scale": [30]}]})
    assert member_names(one, one.configurations(32)) == ["topk-d64-k32-s0", "jumprelu-d64-l0c0.03125-l0t32-s0"]
    assert {n.split("-")[0] for n in names} == {"topk", "batchtopk", "matryoshka", "jumprelu", "l1"}
    assert "jumprelu-d64-l0c0.1-s0" in names and "matryoshka-d64-k4-p16.64-s0" in names


@pytest.mark.parametrize("sparsity", ["batch_top_k", "matryoshka"])
def test_a_batch_rule_calibrates_its_threshold_to_a_mean_l0_of_k(sparsity):
    sae = _sae(sparsity, n=64, k=4)
    sae.encoder.threshold.fill_(5.0)  # a stale estimate: far too high
    batches = [torch.randn(256, 8) for _ in range(4)]
    sae.rule.calibrate(sae, batches)
    l0 = torch.cat([(sae.encode(b) > 0).sum(-1) for b in batches]).float().mean()
    assert abs(float(l0) - 4) < 0.3, float(l0)
    # the mean of each batch's smallest selected value, under these weights
    pre = [torch.relu(sae.encoder.encoder(b - sae.b_dec)).flatten().topk(4 * 256).values.min() for b in batches]
    assert float(sae.encoder.threshold) == pytest.approx(float(torch.stack(pre).mean()), rel=1e-5)


def test_training_a_batch_rule_ends_with_inference_l0_near_k(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=40 * 1024, batch_size=1024, lr=3e-3, eval_every=40)
    result = train(store, SAEConfig(32, 128, 3, "batch_top_k"), cfg, tmp_path / "run", progress=False)
    assert abs(result.metrics["l0"] - 3) < 0.3, result.metrics


@pytest.mark.parametrize("sparsity", ["batch_top_k", "matryoshka"])
def test_the_batch_rules_default_to_three_times_top_ks_learning_rate(sparsity):
    top_k = TrainConfig().resolved(SAEConfig(8, 64, 4, "top_k")).lr
    assert TrainConfig().resolved(SAEConfig(8, 64, 4, sparsity)).lr == pytest.approx(3 * top_k)
    assert TrainConfig(lr=1e-3).resolved(SAEConfig(8, 64, 4, sparsity)).lr == 1e-3  # a given lr is kept


@pytest.mark.parametrize("sparsity, scale", [("batch_top_k", 3.0), ("matryoshka", 3.0), ("jumprelu", 3.0), ("top_k", 1.0),
                                             ("l1", 1.0)])
def test_the_decoder_learns_at_its_rules_multiple_of_the_learning_rate(synthetic_store, tmp_path, sparsity, scale):
    from sae_registry.training.loop import _Member

    store, _ = synthetic_store
    sae_cfg = SAEConfig(store.d, 64, 4, sparsity)
    assert TrainConfig().resolved(sae_cfg).decoder_lr_scale == scale
    for given in (None, 2.0):
        cfg = TrainConfig(tokens=4 * 256, batch_size=256, lr=1e-3, decoder_lr_scale=given, device="cpu").resolved(sae_cfg)
        (out := tmp_path / f"run-{given}").mkdir()
        member = _Member(store, sae_cfg, cfg, out, None, None)
        before = member.sae.W_dec.detach().clone()
        member.train_step(store.read(0, 256), 4)
        encoder, decoder = member.opt.param_groups[:2]  # (jumprelu: its thresholds third)
        assert [p is member.sae.W_dec for p in decoder["params"]] == [True]
        assert not any(p is member.sae.W_dec for p in encoder["params"])
        assert decoder["lr"] == pytest.approx((given or scale) * encoder["lr"]) and encoder["lr"] > 0
        assert not torch.equal(before, member.sae.W_dec)  # the decoder's group did step


def test_jumprelu_thresholds_learn_at_their_own_multiple_of_the_learning_rate(synthetic_store, tmp_path):
    from sae_registry.training.loop import _Member

    store, _ = synthetic_store
    sae_cfg = SAEConfig(store.d, 64, sparsity="jumprelu")
    cfg = TrainConfig(tokens=4 * 256, batch_size=256, lr=1e-3, threshold_lr_scale=10.0, jumprelu_init_threshold=0.05,
                      device="cpu").resolved(sae_cfg)
    member = _Member(store, sae_cfg, cfg, tmp_path, None, None)
    before = member.sae.encoder.threshold.detach().clone()
    member.train_step(store.read(0, 256), 4)
    rest, decoder, thresholds = member.opt.param_groups
    assert [p is member.sae.encoder.threshold for p in thresholds["params"]] == [True]
    assert not any(p is member.sae.encoder.threshold for p in rest["params"] + decoder["params"])
    assert thresholds["lr"] == pytest.approx(10 * rest["lr"]) and rest["lr"] > 0
    moved = (member.sae.encoder.threshold - before).abs().max()
    assert 5e-3 < moved <= 1e-2 * 1.01  # Adam's first step: about the group's rate, 10x the others'


def test_the_cost_model_prices_each_rule_by_its_own_measured_step():
    from sae_registry.config.sweep import estimated_cost

    def cost(sparsity):
        return estimated_cost(SAEConfig(384, 4096, 32, sparsity), TrainConfig(tokens=1000), 384)

    # batch_top_k's whole-batch selection and matryoshka's per-prefix decode cost more than top_k's step
    assert cost("top_k") < cost("batch_top_k") < cost("matryoshka")
    assert cost("jumprelu") < cost("l1")  # jumprelu's sparse step, not l1's dense one
