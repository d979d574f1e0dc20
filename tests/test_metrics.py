import pytest
import torch

from sae_registry import metrics as M


def test_fvu_mse_and_explained_variance():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    assert M.fvu(x, x) == 0
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    x_hat = x + torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, -0.5]])
    total = ((x - x.mean(0)) ** 2).sum()
    assert M.fvu(x, x_hat) == pytest.approx(0.5 / float(total))
    assert M.mse(x, x_hat) == pytest.approx(0.5 / 6)
    assert M.explained_variance(x, x_hat) == pytest.approx(1 - 0.5 / float(total))


def test_l0_density_and_dead_fraction():
    h = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.5, 0.0, 0.0, 0.0]])
    assert M.l0(h) == pytest.approx(4 / 3)
    torch.testing.assert_close(M.feature_density(h), torch.tensor([2 / 3, 0, 0, 2 / 3], dtype=torch.float64))
    assert M.dead_fraction(h) == 0.5
    s = M.summary(torch.ones(3, 2), torch.ones(3, 2), M.feature_density(h))
    assert s["l0"] == pytest.approx(M.l0(h)) and s["dead_fraction"] == 0.5
    assert set(s) == {"mse", "fvu", "explained_variance", "l0", "dead_fraction"}
