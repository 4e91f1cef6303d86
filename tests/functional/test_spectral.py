import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_lip.functional.spectral import (
    _with_adjoint,
    absorb_fixed,
    alternating_power_iteration,
    is_supported,
    lanczos_svd,
    layer_operator,
    operator_norm,
    power_iteration,
    projection_scale,
    proportional_budget,
    random_start,
    rescale_weight,
    uniform_budget,
)
from tests.models import SamePaddingConv2d
from tests.reference import dense_operator, dense_operator_norm

# (layer factory, one-sample input shape): strides, paddings ('same', 'valid', ints), padding modes, dilations,
# groups, for every supported layer type.
CASES = [
    (lambda: nn.Linear(24, 17), (24,)),
    (lambda: nn.Linear(5, 40, bias=False), (5,)),
    (lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="replicate"), (2, 11)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=3, padding_mode="circular"), (4, 13)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 9)),
    (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), (4, 8, 8)),
    (lambda: nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="circular"), (2, 7, 6)),
    (lambda: nn.Conv2d(3, 6, 2, stride=(2, 1), padding="valid", groups=3), (3, 6, 5)),
    (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate", bias=False), (2, 6, 6)),
    (lambda: nn.Conv3d(2, 2, 3, stride=(1, 2, 1), padding=1), (2, 5, 6, 4)),
    (lambda: nn.Conv3d(2, 4, 2, dilation=2, groups=2, padding=1, padding_mode="reflect"), (2, 4, 4, 4)),
    (lambda: nn.ConvTranspose1d(4, 2, 3, stride=3, padding=1, groups=2, dilation=2), (4, 6)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 4, (2, 3), stride=(1, 2), groups=4, dilation=(2, 1)), (4, 4, 5)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 3, 3, 3)),
]
IDS = [f"case{i}" for i in range(len(CASES))]


@pytest.mark.parametrize(("make", "shape"), CASES, ids=IDS)
def test_operator_is_the_layer_minus_bias(make, shape):
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    expected = layer(x.unsqueeze(0))[0] - layer(torch.zeros_like(x).unsqueeze(0))[0]
    torch.testing.assert_close(layer_operator(layer, shape)(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("make", "shape"), [CASES[0], CASES[5], CASES[13]], ids=["linear", "conv", "conv_transpose"])
def test_operator_of_a_pruned_layer_is_that_of_its_next_forward_pass(make, shape):
    """``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` before each forward pass: after a
    step on ``weight_orig`` the attribute is stale, and the operator is the one the next forward pass applies."""
    layer = make().double()
    prune.l1_unstructured(layer, "weight", amount=0.4)
    with torch.no_grad():
        layer.weight_orig.add_(torch.randn_like(layer.weight_orig))
    operator = layer_operator(layer, shape)
    x = torch.randn(shape, dtype=torch.float64)
    expected = layer(x.unsqueeze(0))[0] - layer(torch.zeros_like(x).unsqueeze(0))[0]
    torch.testing.assert_close(operator(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("make", "shape"), CASES, ids=IDS)
def test_operator_norm_matches_dense(make, shape, dtype):
    layer = make().to(dtype)
    ref = dense_operator_norm(layer, shape)
    sigma = operator_norm(layer, shape, tol=1e-7).item()
    # Lanczos stops with a Ritz residual <= 1e-7 * sigma^2, bounding the error of sigma by ~5e-8; float32
    # arithmetic adds ~1e-6 relative. The issue asks for 1e-3; these bounds are far tighter.
    assert sigma == pytest.approx(ref, rel=1e-10 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize(("make", "shape"), CASES, ids=IDS)
def test_singular_vectors_satisfy_definition(make, shape):
    layer = make().double()
    t = lanczos_svd(layer_operator(layer, shape), random_start(shape, layer.weight), max_iter=200, tol=1e-12)
    A = dense_operator(layer, shape)
    torch.testing.assert_close(A @ t.v.flatten(), t.sigma * t.u.flatten(), rtol=0, atol=1e-8)
    torch.testing.assert_close(A.T @ t.u.flatten(), t.sigma * t.v.flatten(), rtol=0, atol=1e-5 * t.sigma.item())


def test_kernel_norm_underestimates_conv_operator():
    # The reshaped-kernel norm (what torch's spectral_norm constrains) is only a lower bound of the true norm.
    layer = nn.Conv2d(3, 8, 3, padding=1)
    kernel = torch.linalg.matrix_norm(layer.weight.detach().reshape(8, -1), ord=2).item()
    assert operator_norm(layer, (3, 12, 12)).item() > 1.5 * kernel


@pytest.mark.parametrize(("make", "shape"), CASES[:1] + CASES[4:6] + CASES[12:13], ids=["lin", "c2", "c2g", "ct2"])
@pytest.mark.parametrize("move", [1e-3, 1e-2])
def test_one_warm_iteration_tracks_a_small_step(make, shape, move):
    """The per-step tolerance: one iteration warm-started from the previous vector after a step that moves W by
    ``move`` (relative, Frobenius) is within 1e-6 (move 1e-3) / 1e-4 (move 1e-2) of the dense norm."""
    layer = make().double()
    v = lanczos_svd(layer_operator(layer, shape), random_start(shape, layer.weight), tol=1e-10).v
    for _ in range(10):
        moved = copy.deepcopy(layer)
        with torch.no_grad():
            noise = torch.randn_like(layer.weight)
            moved.weight.add_(move * layer.weight.norm() * noise / noise.norm())
        sigma = power_iteration(layer_operator(moved, shape), v, n_iter=1).sigma.item()
        ref = dense_operator_norm(moved, shape)
        assert sigma <= ref * (1 + 1e-12)  # always a lower bound
        assert sigma == pytest.approx(ref, rel=1e-6 if move == 1e-3 else 1e-4)


@pytest.mark.parametrize(("make", "shape"), CASES[:1] + CASES[4:6] + CASES[12:13], ids=["lin", "c2", "c2g", "ct2"])
@pytest.mark.parametrize("move", [1e-3, 1e-2])
@pytest.mark.parametrize("adjoint_first", [False, True], ids=["forward", "adjoint"])
def test_one_alternating_step_tracks_a_small_step(make, shape, move, adjoint_first):
    """The per-step tolerance of the κ projection: one product from the converged pair (u, v) after a step that
    moves W by ``move`` (relative, Frobenius) is a lower bound within 3e-6 (move 1e-3) / 3e-4 (move 1e-2) of the
    dense norm, about twice the error of a full iteration (the operator is read once instead of twice; the adjoint
    step of a convolution is a full iteration). The convergence indicator (σ - σ_prev)/σ is second order in the
    move: below 1e-6 (1e-4) where σ itself moves by ~3e-4 (~3e-3), because the move cancels from it to first order.
    """
    layer = make().double()
    start = lanczos_svd(layer_operator(layer, shape), random_start(shape, layer.weight), tol=1e-10)
    for _ in range(10):
        moved = copy.deepcopy(layer)
        with torch.no_grad():
            noise = torch.randn_like(layer.weight)
            moved.weight.add_(move * layer.weight.norm() * noise / noise.norm())
        t = alternating_power_iteration(layer_operator(moved, shape), start.u, start.v, 1, adjoint_first)
        ref = dense_operator_norm(moved, shape)
        assert t.sigma.item() <= ref * (1 + 1e-12)
        assert t.sigma.item() == pytest.approx(ref, rel=3e-6 if move == 1e-3 else 3e-4)
        assert (t.sigma - t.sigma_prev).item() / t.sigma.item() < (1e-6 if move == 1e-3 else 1e-4)


@pytest.mark.parametrize(("make", "shape"), CASES[:1] + CASES[4:6] + CASES[12:13], ids=["lin", "c2", "c2g", "ct2"])
def test_warm_lanczos_refinement_after_a_large_move(make, shape):
    """The κ projection's refinement: after a move of 10 % (Frobenius; AdamW's steps move small weights by several
    %), Lanczos from the old top vector plus 1e-3 of noise, with the warm-start residual rule (residual_factor=1,
    min_iter=2), is within ``tol`` = 1e-4 of the dense norm, in fewer products than the cold rule (min_iter=5,
    residual_factor=0.1) from the old vector mixed with as much noise."""
    g = torch.Generator().manual_seed(0)
    layer = make().double()
    v = lanczos_svd(layer_operator(layer, shape), random_start(shape, layer.weight, g), tol=1e-10).v
    warm_steps, cold_steps = [], []
    for _ in range(10):
        moved = copy.deepcopy(layer)
        with torch.no_grad():
            noise = torch.randn(layer.weight.shape, generator=g, dtype=torch.float64)
            moved.weight.add_(0.1 * layer.weight.norm() * noise / noise.norm())
        op, ref = layer_operator(moved, shape), dense_operator_norm(moved, shape)
        warm = lanczos_svd(op, v + 1e-3 * random_start(shape, layer.weight, g), tol=1e-4, residual_factor=1, min_iter=2)
        cold = lanczos_svd(op, v + random_start(shape, layer.weight, g), tol=1e-4)
        assert warm.sigma.item() <= ref * (1 + 1e-12) and warm.sigma.item() == pytest.approx(ref, rel=1e-4)
        warm_steps.append(warm.n_iter)
        cold_steps.append(cold.n_iter)
    assert sum(warm_steps) < sum(cold_steps), (warm_steps, cold_steps)


def test_alternating_power_iteration_on_a_fixed_matrix():
    """On a fixed matrix each product's estimate is a monotone lower bound converging to the dense norm,
    ``sigma_prev`` is exactly the previous product's estimate, and an even number of products from (u, v) equals
    :func:`power_iteration` from v, ``sigma_prev`` included."""
    A = torch.randn(30, 20, dtype=torch.float64)
    ref = torch.linalg.matrix_norm(A, 2).item()
    layer = nn.Linear(20, 30, bias=False).double().requires_grad_(False)
    layer.weight.copy_(A)
    operator = layer_operator(layer)  # the explicit adjoint
    first = power_iteration(operator, torch.randn(20, dtype=torch.float64))
    t, sigmas = first, [first.sigma.item()]
    for i in range(40):
        t = alternating_power_iteration(operator, t.u, t.v, adjoint_first=i % 2 == 0)
        assert t.sigma_prev.item() == pytest.approx(sigmas[-1], rel=1e-13)
        sigmas.append(t.sigma.item())
    assert all(s <= ref * (1 + 1e-14) for s in sigmas)
    assert all(b >= a * (1 - 1e-14) for a, b in zip(sigmas, sigmas[1:]))
    assert sigmas[-1] == pytest.approx(ref, rel=1e-6)
    paired = alternating_power_iteration(operator, first.u, first.v, n_steps=6)
    full = power_iteration(operator, first.v, n_iter=3)
    torch.testing.assert_close(paired.v, full.v, rtol=1e-12, atol=1e-14)
    assert paired.sigma.item() == pytest.approx(full.sigma.item(), rel=1e-14)
    assert paired.sigma_prev.item() == pytest.approx(full.sigma_prev.item(), rel=1e-12)
    with pytest.raises(ValueError, match="n_steps"):
        alternating_power_iteration(operator, first.u, first.v, n_steps=0)


def test_power_iteration_is_monotone_lower_bound():
    A = torch.randn(30, 20, dtype=torch.float64)
    ref = torch.linalg.matrix_norm(A, 2).item()
    v = torch.randn(20, dtype=torch.float64)
    sigmas = []
    for _ in range(30):
        t = power_iteration(lambda x: A @ x, v, n_iter=1)
        v = t.v
        sigmas.append(t.sigma.item())
    assert all(s <= ref * (1 + 1e-14) for s in sigmas)
    assert all(b >= a * (1 - 1e-14) for a, b in zip(sigmas, sigmas[1:]))


def test_power_iteration_on_nonfinite_operator_gives_nan():
    A = torch.full((3, 3), float("nan"))
    assert math.isnan(power_iteration(lambda x: A @ x, torch.ones(3)).sigma.item())


def test_power_iteration_rejects_zero_iterations():
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration(lambda x: x, torch.ones(3), n_iter=0)


def test_layer_operator_validates():
    with pytest.raises(ValueError, match="input_shape"):
        layer_operator(nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="LayerNorm"):
        layer_operator(nn.LayerNorm(3))


def test_transposed_conv_with_output_size_uses_recorded_output_shape():
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    out = layer(x, output_size=[8, 8])  # one extra row/column of output padding
    assert out.shape[-2:] == (8, 8)
    op = layer_operator(layer, (2, 4, 4), tuple(out.shape[1:]))

    def f(z):
        return (
            layer(z.unsqueeze(0), output_size=[8, 8])[0]
            - layer(torch.zeros_like(z).unsqueeze(0), output_size=[8, 8])[0]
        )

    J = torch.func.jacrev(f)(torch.zeros(2, 4, 4, dtype=torch.float64)).reshape(-1, 32)
    ref = torch.linalg.matrix_norm(J, 2).item()
    t = lanczos_svd(op, random_start((2, 4, 4), layer.weight), tol=1e-12)
    assert t.sigma.item() == pytest.approx(ref, rel=1e-9)


def test_projection_scale():
    assert projection_scale(2.0, 3.0) == 1.0
    assert projection_scale(4.0, 2.0) == 0.5


def test_uniform_budget():
    kappas = uniform_budget(["a", "b", "c"], 8.0)
    assert kappas == pytest.approx({"a": 2.0, "b": 2.0, "c": 2.0})
    assert uniform_budget([], 8.0) == {}


def test_proportional_budget_under_and_over():
    under = {"a": 1.5, "b": 2.0}
    assert proportional_budget(under, 10.0) == under  # under budget: untouched
    over = {"a": 4.0, "b": 9.0, "c": 0.5}  # product 18
    kappas = proportional_budget(over, 2.0)
    assert math.prod(kappas.values()) == pytest.approx(2.0, rel=1e-12)
    ratios = [kappas[k] / over[k] for k in over]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)  # same shrink of every log sigma


@pytest.mark.parametrize("max_lipschitz", [0.5, 100.0], ids=["over", "under"])
def test_proportional_budget_gives_zero_layers_the_room_left(max_lipschitz):
    """A zero-norm layer (zero-initialized) gets a positive budget: the room the others leave under ``L_max``."""
    sigmas = {"a": 4.0, "zero1": 0.0, "b": 0.5, "zero2": 0.0}
    kappas = proportional_budget(sigmas, max_lipschitz)
    assert list(kappas) == list(sigmas)
    assert math.prod(kappas.values()) == pytest.approx(max_lipschitz, rel=1e-12)
    assert kappas["zero1"] == kappas["zero2"] >= 1.0
    assert kappas["a"] / kappas["b"] == pytest.approx(8.0, rel=1e-12)  # the others as without the zero layers
    assert kappas["a"] == pytest.approx(proportional_budget({"a": 4.0, "b": 0.5}, max_lipschitz)["a"], rel=1e-12)
    assert proportional_budget({"a": 0.0, "b": 0.0}, 4.0) == {"a": 2.0, "b": 2.0}


def test_absorb_fixed_gives_the_fixed_layers_excess_to_the_others():
    sigmas = {"a": 4.0, "b": 9.0, "c": 0.5, "d": 3.0}  # product 54
    kappas = absorb_fixed(proportional_budget(sigmas, 2.0), sigmas, {"b"})
    assert kappas["b"] == 9.0  # keeps its norm
    free = proportional_budget({k: s for k, s in sigmas.items() if k != "b"}, 2.0 / 9.0)
    assert {k: kappas[k] for k in free} == pytest.approx(free, rel=1e-12)  # proportional under L_max / sigma_b
    uniform = uniform_budget(list(sigmas), 16.0)  # 2 each: b and d exceed theirs by 4.5 and 1.5
    kappas = absorb_fixed(uniform, sigmas, {"b", "d"})
    assert kappas == pytest.approx({"a": 2 / 6.75**0.5, "b": 9.0, "c": 2 / 6.75**0.5, "d": 3.0}, rel=1e-12)
    assert math.prod(kappas.values()) == pytest.approx(16.0, rel=1e-12)
    assert absorb_fixed(uniform, sigmas, {"c"}) == uniform  # under its budget: nothing to give
    assert absorb_fixed({"a": 1.0}, {"a": 3.0}, {"a"}) == {"a": 3.0}  # no free layer: over budget, as it must be


class _Doubled(nn.Module):
    """A parametrization without ``right_inverse``."""

    def forward(self, weight):
        return 2 * weight


def _parametrized(kind: str) -> nn.Module:
    layer = nn.Conv2d(2, 3, 3) if kind == "weight_norm_conv" else nn.Linear(4, 4)
    P = nn.utils.parametrizations
    make = {
        "plain": lambda: layer,
        "pruned": lambda: prune.l1_unstructured(layer, "weight", amount=0.5),
        "weight_norm": lambda: P.weight_norm(layer),
        "weight_norm_conv": lambda: P.weight_norm(layer),
        "spectral_norm": lambda: P.spectral_norm(layer),  # training mode: every read advances its power iteration
        "orthogonal": lambda: P.orthogonal(layer),  # right_inverse moves its trivialization base
        "orthogonal_fixed": lambda: P.orthogonal(layer, use_trivialization=False),  # right_inverse raises
        "no_right_inverse": lambda: nn.utils.parametrize.register_parametrization(
            layer, "weight", _Doubled(), unsafe=True
        ),
    }
    return make[kind]()


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "pruned",
        "weight_norm",
        "weight_norm_conv",
        "spectral_norm",
        "orthogonal",
        "orthogonal_fixed",
        "no_right_inverse",
    ],
)
def test_rescale_weight(kind):
    """Plain, pruned (through ``weight_orig``) and weight-normalized weights are rescaled in place (the parameters keep
    their storage); parametrizations that cannot take the rescaled weight back (renormalizing, raising, or without
    ``right_inverse``) leave the module bit-identical, buffers included, and say so."""
    layer = _parametrized(kind)
    params = dict(layer.named_parameters())
    target = layer.weight.detach() * 0.3  # a read: before the snapshot (spectral_norm's vectors move)
    before, pointers = copy.deepcopy(layer.state_dict()), {n: p.data_ptr() for n, p in params.items()}
    rescaled = rescale_weight(layer, 0.3)
    assert rescaled == (kind in ("plain", "pruned", "weight_norm", "weight_norm_conv"))
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == pointers
    if rescaled:  # float32: the right inverse and the parametrization round trip in a few ulps
        torch.testing.assert_close(layer.weight, target, rtol=1e-6, atol=1e-7)
        layer(torch.zeros(1, 4) if isinstance(layer, nn.Linear) else torch.zeros(1, 2, 3, 3))  # recomputed: the same
        torch.testing.assert_close(layer.weight, target, rtol=1e-6, atol=1e-7)
        assert torch.equal(layer.bias, before["bias"])
    else:
        assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_linear_operator_adjoint_is_the_transpose():
    """The explicit adjoint of a Linear's operator is the transpose of the dense Jacobian."""
    layer = nn.Linear(7, 5).double()
    operator = layer_operator(layer)
    v, u = torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y, adjoint = _with_adjoint(operator, v)
    torch.testing.assert_close(y, layer.weight.detach() @ v, rtol=1e-15, atol=1e-15)
    dense = dense_operator(layer, (7,))  # jacrev of the module's own forward
    torch.testing.assert_close(adjoint(u), dense.T @ u, rtol=1e-14, atol=1e-14)


class _StandardizedConv2d(nn.Conv2d):  # timm's StdConv2d, in short: the weight standardized before it is applied
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean((1, 2, 3), keepdim=True)), bias)


class _Marked(nn.Linear):  # as torch's NonDynamicallyQuantizableLinear: a subclass that computes the same
    pass


def test_a_subclass_with_its_own_forward_is_not_supported():
    """Its operator is another: the kernel-based one is 2.4 % below the dense norm of timm's ``Conv2dSame`` here."""
    torch.manual_seed(0)
    same = SamePaddingConv2d(1, 4, 3, stride=2)
    plain = nn.Conv2d(1, 4, 3, stride=2)
    plain.load_state_dict(same.state_dict())
    assert dense_operator_norm(plain, (1, 8, 8)) < 0.99 * dense_operator_norm(same, (1, 8, 8))
    assert not is_supported(same) and not is_supported(_StandardizedConv2d(1, 4, 3)) and is_supported(plain)
    with pytest.raises(ValueError, match="SamePaddingConv2d"):
        layer_operator(same, (1, 8, 8))
    weight_normalized = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3))
    assert is_supported(_Marked(2, 2)) and is_supported(nn.LazyConv2d(4, 3)) and is_supported(weight_normalized)
    assert is_supported(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) and is_supported(
        nn.ConvTranspose3d(1, 1, 2)
    )
    assert not is_supported(nn.Bilinear(2, 2, 2)) and not is_supported(nn.Embedding(3, 2))
