import pytest
import torch

from sae_registry import SAERegistryError
from sae_registry.config.metrics import RECONSTRUCTION, metrics
from sae_registry.metrics import reconstruction as M


def test_fvu_and_mse():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    assert M.fvu(x, x) == 0
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    x_hat = x + torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, -0.5]])
    total = ((x - x.mean(0)) ** 2).sum()
    assert M.fvu(x, x_hat) == pytest.approx(0.5 / float(total))
    assert M.mse(x, x_hat) == pytest.approx(0.5 / 6)
    s = M.summary(x, x_hat, torch.ones(4, dtype=torch.float64))
    assert s["explained_variance"] == pytest.approx(1 - 0.5 / float(total))


def test_l0_and_dead_fraction_from_density():
    density = torch.tensor([2 / 3, 0, 0, 2 / 3], dtype=torch.float64)
    assert M.l0(density) == pytest.approx(4 / 3)
    assert M.dead_fraction(density) == 0.5
    s = M.summary(torch.ones(3, 2), torch.ones(3, 2), density)
    assert s["l0"] == pytest.approx(4 / 3) and s["dead_fraction"] == 0.5
    assert set(s) == {m.name for m in metrics(RECONSTRUCTION)}  # every row of the table's reconstruction part
    # summation error never lifts a top-k dictionary's L0 above k
    assert M.l0(torch.full((10,), 0.1, dtype=torch.float64)) == 1.0


def test_fire_counts_from_compact_codes():
    indices = torch.tensor([[0, 2], [2, 3], [0, 1]])
    active = torch.tensor([[True, True], [True, False], [False, True]])
    assert M.fire_counts(indices, active, 5).tolist() == [1, 1, 2, 0, 0]


@pytest.mark.parametrize("sparsity", ["top_k", "l1"])
def test_evaluate_matches_the_dense_definitions(sparsity):
    from sae_registry import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder.build(8, dict_size=32, top_k=4, sparsity=sparsity)
    x = torch.randn(300, 8)
    ev = M.evaluate(sae, x, batch_size=64)  # several batches: the sums must add up
    h = sae.encode(x)
    density = (h != 0).double().mean(0)
    torch.testing.assert_close(ev.density, density)
    torch.testing.assert_close(ev.l0_per_row, (h != 0).sum(-1).int())  # 4 bytes a row: all that grows with n
    assert ev.metrics["l0"] == pytest.approx(float(density.sum()))
    with torch.no_grad():
        assert ev.metrics["fvu"] == pytest.approx(M.fvu(x, sae.decode(h)), rel=1e-5)


def test_evaluate_streams_batches_and_agrees_with_the_whole_tensor(tmp_path):
    """A split read batch by batch from a store gives the numbers of the whole split at once."""
    from sae_registry import ActivationStore, SparseAutoencoder

    torch.manual_seed(0)
    x = torch.randn(1000, 8) * 3 + 10  # a large mean: the streamed total variance must not lose it
    with ActivationStore.create(tmp_path / "s.zarr", d=8, chunk_tokens=128, eval_fraction=0.5) as w:
        w.append(x)
    store = ActivationStore.open(tmp_path / "s.zarr")
    sae = SparseAutoencoder.build(8, dict_size=32, top_k=4)
    whole = M.evaluate(sae, store.read_split("eval"))
    streamed = M.evaluate(sae, store.batches(96, split="eval", shuffle=False))
    assert streamed.metrics == pytest.approx(whole.metrics, rel=1e-6)  # float32 products in other batch shapes
    assert torch.equal(streamed.density, whole.density) and torch.equal(streamed.l0_per_row, whole.l0_per_row)
    held_out = store.read_split("eval")
    with torch.no_grad():
        assert whole.metrics["fvu"] == pytest.approx(M.fvu(held_out, sae.decode(sae.encode(held_out))), rel=1e-6)
    with pytest.raises(SAERegistryError, match="no rows"):
        M.evaluate(sae, iter([]))


def test_the_frontier_plot_has_a_fidelity_panel_when_the_sweep_measured_one():
    from sae_registry.metrics import plots

    rows = [{"sparsity": s, "dict_size": 64, "l0": l0, "fvu": 1 / l0, "frontier": True, "fidelity": f}
            for s in ("top_k", "batch_top_k") for l0, f in ((4, 0.5), (8, 0.7))]
    fig = plots.frontier(rows)
    fvu_ax, fidelity_ax = fig.axes
    assert "fidelity" in fidelity_ax.get_ylabel()
    assert [line.get_label() for line in fidelity_ax.get_lines()] == ["batch_top_k dict_size 64", "top_k dict_size 64"]
    assert list(fidelity_ax.get_lines()[0].get_ydata()) == [0.5, 0.7]
    for row in rows:
        row["fidelity"] = None
    assert len(plots.frontier(rows).axes) == 1  # no fidelity: FVU only
