import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lip.functional.hvp import flatten, hvp_operator, trainable_parameters, unflatten
from lightning_lip.functional.lanczos import lanczos
from tests.models import cnn, mlp
from tests.reference import dense_hessian


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


@pytest.mark.parametrize(("make", "shape"), [(lambda: mlp((6, 10, 10, 3)), (6,)), (lambda: cnn(classes=3), (1, 8, 8))])
def test_hvp_equals_dense_hessian_with_weighted_batches(make, shape):
    net = make().double()
    x, y = torch.randn(20, *shape, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = dense_hessian(net, F.cross_entropy, x, y)
    hvp = hvp_operator(net, ce, [(x[:8], y[:8]), (x[8:], y[8:])], batch_sizes=[8, 12])
    for _ in range(3):
        v = torch.randn(H.shape[0], dtype=torch.float64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_excluded():
    net = mlp((4, 5, 3)).double()
    net[0].weight.requires_grad_(False)
    params = trainable_parameters(net)
    assert list(params) == ["0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = dense_hessian(net, F.cross_entropy, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp_operator(net, ce, [(x, y)])(v), H @ v)


def test_flatten_unflatten_round_trip():
    ts = [torch.randn(2, 3), torch.randn(4), torch.randn(())]
    back = unflatten(flatten(ts), ts)
    assert all(torch.equal(a, b) for a, b in zip(ts, back))


@pytest.mark.parametrize("seed", range(5))
def test_least_squares_closed_form(seed):
    # L = ||X w - y||^2 / N has H = 2 X^T X / N exactly.
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lin = nn.Linear(8, 1, bias=False).double()
    hvp = hvp_operator(lin, lambda m, b: (m(b[0]).squeeze(1) - b[1]).pow(2).mean(), [(X, y)])
    exact = torch.linalg.eigvalsh(2 * X.T @ X / 50)
    res = lanczos(hvp, torch.randn(8, dtype=torch.float64, generator=g), max_iter=8, tol=1e-10, require_min=True)
    assert res.eigenvalues[0].item() == pytest.approx(exact[-1].item(), rel=1e-10)
    assert res.lambda_min.item() == pytest.approx(exact[0].item(), rel=1e-10)


def test_train_mode_batchnorm_buffers_untouched():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    hvp_operator(net, ce, [(x, y)])(torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mse_loss_falls_back_to_reverse_over_reverse():
    """F.mse_loss has no working forward-over-reverse formula in torch 2.13 (ZeroTensor error): same H v anyway."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    hvp = hvp_operator(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), [(x, t)])
    H = dense_hessian(net, torch.nn.functional.mse_loss, x, t)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)
