import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lip.functional.hvp import flatten, hvp_operator, trainable_parameters, unflatten
from lightning_lip.functional.lanczos import lanczos
from tests.models import Aliased, OldStyleReLU, TinyTransformer, cnn, mlp
from tests.reference import dense_hessian


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def split_batch(x, y, sizes):
    """``(x, y)`` as consecutive batches of ``sizes`` samples."""
    return list(zip(x.split(sizes), y.split(sizes)))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: mlp((6, 10, 10, 3)), (6,)), (lambda: cnn(classes=3), (1, 8, 8)), (TinyTransformer, (5, 8))],
    ids=["mlp", "cnn", "transformer"],
)
@pytest.mark.parametrize("split", [[8, 12], [20]], ids=["two-batches", "one-batch-graph-kept"])
def test_hvp_equals_dense_hessian_with_weighted_batches(make, shape, split):
    """Also through ``nn.TransformerEncoderLayer``, whose fused attention kernel has no second derivative: the
    products run attention on its math backend (they failed with "derivative ... not implemented"). With one batch
    the gradient's graph is built once and every product goes back through it."""
    net = make().double()
    x, y = torch.randn(20, *shape, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = dense_hessian(net, F.cross_entropy, x, y)
    hvp = hvp_operator(net, ce, split_batch(x, y, split), batch_sizes=split)
    for _ in range(3):
        v = torch.randn(H.shape[0], dtype=torch.float64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [[5, 7], [12]], ids=["two-batches", "one-batch-graph-kept"])
def test_a_random_loss_is_differentiated_at_one_draw_and_leaves_the_global_rng_alone(split):
    """Noise augmentation inside the loss: every product replays the draw of the random state the operator was made
    with, so the operator is the dense Hessian at that draw (not a new draw per product), and the global state is
    where it was: training goes on as if no product had run."""
    net = mlp((6, 10, 3)).double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    batches = split_batch(x, y, split)

    def noisy(module, batch):
        return ce(module, (batch[0] + 0.3 * torch.randn_like(batch[0]), batch[1]))

    torch.manual_seed(3)
    hvp = hvp_operator(net, noisy, batches, batch_sizes=split)
    state = torch.get_rng_state()
    n = sum(p.numel() for p in net.parameters())
    columns = torch.stack([hvp(e) for e in torch.eye(n, dtype=torch.float64)], 1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    drawn = torch.cat([b[0] + 0.3 * torch.randn_like(b[0]) for b in batches])  # the draws, in the loss's order
    torch.testing.assert_close(columns, dense_hessian(net, F.cross_entropy, drawn, y), rtol=1e-10, atol=1e-12)


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
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    hvp_operator(net, ce, [(x, y)])(v)
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("split", [[8, 12], [20]], ids=["two-batches", "one-batch-graph-kept"])
def test_a_module_registered_under_two_names_keeps_its_own_tensors(split):
    """``functional_call`` swapped the attributes of a module reached by two names twice, and left the swapped-in
    tensors in it: leaves in place of its parameters, a buffer's copy in place of a BatchNorm's statistics."""
    net = Aliased().double().eval()
    before = {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers(remove_duplicate=False))}
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = dense_hessian(copy.deepcopy(net), F.cross_entropy, x, y)  # the reference's functional_call leaves them too
    hvp = hvp_operator(net, ce, split_batch(x, y, split), batch_sizes=split)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    after = {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers(remove_duplicate=False))}
    assert after.keys() == before.keys() and all(t is before[name] for name, t in after.items())


class _ClampNoJvp(torch.autograd.Function):
    """``relu`` as an ``autograd.Function`` usable by ``torch.func`` but without a forward-mode (``jvp``) rule."""

    @staticmethod
    def forward(x):
        return x.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _NoJvpReLU(nn.Module):
    def forward(self, x):
        return _ClampNoJvp.apply(x)


@pytest.mark.parametrize(
    ("make", "loss"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), F.mse_loss),  # ZeroTensor error
        (lambda: nn.Sequential(nn.Linear(4, 3), _NoJvpReLU(), nn.Linear(3, 2)), F.mse_loss),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), F.huber_loss),
    ],
    ids=["mse_loss", "function_without_jvp", "huber_loss"],
)
def test_ops_without_a_forward_mode_formula(make, loss):
    """Forward-over-reverse fails on these (F.mse_loss's double backward in torch 2.13, a custom autograd.Function
    without ``jvp``, ``huber_loss_backward``); the products, reverse over reverse, are the dense H v."""
    net = make().double()
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    hvp = hvp_operator(net, lambda m, b: loss(m(b[0]), b[1]), [(x, t)])
    H = dense_hessian(net, loss, x, t)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_weight_norm_hessian_is_exact(style):
    """Weight normalization's fused kernel has no forward-mode formula and a wrong double backward in torch 2.13
    (so ``dense_hessian`` of the module itself is wrong too): the reference is ``torch.autograd.functional.hessian``
    of the same network written with ``g * v / ||v||``. Both versions of ``weight_norm`` (the parametrization and the
    deprecated forward pre-hook) are covered."""
    apply = nn.utils.parametrizations.weight_norm if style == "parametrization" else nn.utils.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated hook version
        net = nn.Sequential(apply(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)).double()
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = trainable_parameters(net)
    g_name, v_name = {
        "parametrization": ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1"),
        "hook": ("0.weight_g", "0.weight_v"),
    }[style]
    order = list(params)

    def explicit(*values):
        p = dict(zip(order, values))
        g, v = p[g_name], p[v_name]
        w = g * v / v.norm(dim=1, keepdim=True)
        return F.mse_loss(F.linear(torch.tanh(F.linear(x, w, p["0.bias"])), p["2.weight"], p["2.bias"]), t)

    blocks = torch.autograd.functional.hessian(explicit, tuple(params.values()))
    sizes = [p.numel() for p in params.values()]
    H = torch.cat([torch.cat([b.reshape(m, n) for b, n in zip(row, sizes)], 1) for row, m in zip(blocks, sizes)])
    hvp = hvp_operator(net, lambda m, b: F.mse_loss(m(b[0]), b[1]), [(x, t)])
    for _ in range(3):
        v = torch.randn(H.shape[0], dtype=torch.float64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    # why the decomposition is needed: torch's own second derivative through the fused kernel is wrong
    fused = lambda g, v: torch._weight_norm(v, g, 0)  # noqa: E731
    g0, v0 = torch.rand(3, 1, dtype=torch.float64) + 0.5, torch.randn(3, 4, dtype=torch.float64)
    assert not torch.autograd.gradgradcheck(fused, (g0.requires_grad_(), v0.requires_grad_()), raise_exception=False)


class _Obstacle(nn.Module):
    """``inner`` behind what torch.func cannot transform: non-reentrant activation checkpointing, an old-style
    ``autograd.Function``."""

    def __init__(self, inner, obstacle):
        super().__init__()
        self.inner, self.obstacle = inner, obstacle

    def forward(self, x):
        if self.obstacle == "checkpoint":
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
        return self.inner(OldStyleReLU()(x) if self.obstacle == "function" else x)


@pytest.mark.parametrize("obstacle", ["checkpoint", "function"])
def test_differentiates_what_torch_func_cannot_transform(obstacle):
    """The products equal the dense Hessian of the same network without the obstacle (the old-style function is
    ``relu``); ``torch.func`` refuses these models (the products used to be ``torch.func``'s)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _Obstacle(mlp((6, 5, 3)), obstacle)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    plain = nn.Sequential(net[0], net[1], nn.ReLU() if obstacle == "function" else nn.Identity(), net[2].inner)
    H = dense_hessian(plain, F.cross_entropy, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp_operator(net, ce, [(x, y)])(v), H @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):  # torch.func's gradient of the same loss
        torch.func.grad(lambda p: ce(lambda inputs: torch.func.functional_call(net, p, (inputs,)), (x, y)))(
            dict(net.named_parameters())
        )
