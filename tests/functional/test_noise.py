import math

import pytest
import torch

from lightning_lip.functional.noise import (
    layer_snr,
    lipschitz_forecast,
    log_lipschitz_dynamics,
    noise_factor,
    noise_statistics,
    operator_sigma_dynamics,
    sigma_dynamics,
    sigma_hessian,
)

DT = torch.float64


def dense_covariance(grads):
    """Reference: the P x P per-sample covariance, formed explicitly (tiny P only)."""
    return torch.cov(grads.T, correction=1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("p", "k"), [(30, 4), (6, 10)], ids=["P>B", "P<k<B"])
def test_statistics_equal_dense_covariance(seed, p, k):
    """``k`` above the number of parameters: the ``P`` eigenvalues there are (the B x B Gram matrix has ``B``)."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(12, p, generator=g, dtype=DT) * torch.linspace(0.1, 2, p, dtype=DT) + 0.3
    sigma = dense_covariance(grads)
    dense_eigs = torch.linalg.eigvalsh(sigma).flip(0)
    stats = noise_statistics(grads, k=k)
    mean_sq = grads.mean(0).square().sum()
    torch.testing.assert_close(stats.trace, sigma.trace(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.grad_norm_sq, mean_sq, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.grad_norm_sq_unbiased, mean_sq - sigma.trace() / 12, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.scale, sigma.trace() / (mean_sq - sigma.trace() / 12), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.top_eigenvalues, dense_eigs[:k], rtol=1e-10, atol=1e-12)
    rank = sigma.trace() ** 2 / (sigma * sigma).sum()
    torch.testing.assert_close(stats.effective_rank, rank, rtol=1e-10, atol=0)
    for wanted, found in ((3, 3), (20, min(11, p))):  # rank <= min(B - 1, P)
        mu, vectors = noise_factor(grads - grads.mean(0), wanted)
        assert mu.shape == (found,) and vectors.shape == (p, found)
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(found, dtype=DT), rtol=0, atol=1e-10)
        torch.testing.assert_close(sigma @ vectors, vectors * mu, rtol=0, atol=1e-10)  # eigenpairs of the dense Sigma


def test_half_precision_gradients_are_converted_before_the_arithmetic():
    """bfloat16 per-sample gradients (a ``precision="bf16-true"`` run): the statistics of those very values, in
    float32 (rtol 1e-5: float32 rounding of 12 x 300 sums). Centring in bfloat16 would cancel most of their 8
    significant bits where the mean dominates, as it does here."""
    g = torch.Generator().manual_seed(0)
    grads = (1.0 + 0.05 * torch.randn(12, 300, generator=g)).bfloat16()
    got, exact = noise_statistics(grads, k=3), noise_statistics(grads.double(), k=3)
    for name in ("trace", "grad_norm_sq", "grad_norm_sq_unbiased", "top_eigenvalues", "effective_rank"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(exact, name), rtol=1e-5, atol=0)


def test_unbiased_grad_norm_is_unbiased_and_scale_is_inf_when_noise_dominates():
    g = torch.Generator().manual_seed(0)
    true_mean = torch.full((20,), 0.2, dtype=DT)
    draws = [noise_statistics(true_mean + torch.randn(8, 20, generator=g, dtype=DT)) for _ in range(4000)]
    unbiased = torch.stack([d.grad_norm_sq_unbiased for d in draws])
    # E = ||G||^2 = 0.8; the sample mean of 4000 draws has standard error ~ std / sqrt(4000)
    assert abs(unbiased.mean() - 0.8) < 4 * unbiased.std() / math.sqrt(4000)
    assert noise_statistics(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)).scale == math.inf  # mean 0
    with pytest.raises(ValueError, match="2 samples"):
        noise_statistics(torch.ones(1, 3))


def test_layer_snr():
    mean = torch.tensor([3.0, 4.0], dtype=DT)
    omega = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)  # tr Sigma = 2, tr Sigma_B = 1
    torch.testing.assert_close(layer_snr(mean, omega), torch.tensor(25.0, dtype=DT))


def svd(w):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh.T


def autograd_second_derivative(w, e):
    """Reference: d^2/dt^2 ||W + tE||_2 at t = 0, by double autograd through torch.linalg.matrix_norm."""
    t = torch.zeros((), dtype=DT, requires_grad=True)
    (d1,) = torch.autograd.grad(torch.linalg.matrix_norm(w + t * e, 2), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1, t)
    return d2


def finite_difference(w, e, h=1e-4):
    norm = lambda t: torch.linalg.matrix_norm(w + t * e, 2)  # noqa: E731
    return (norm(h) - 2 * norm(0.0) + norm(-h)) / h**2


@pytest.mark.parametrize("shape", [(6, 6), (7, 4), (3, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_sigma_hessian_equals_autograd_and_finite_differences(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=DT)
    es = torch.randn(5, *shape, generator=g, dtype=DT)
    got = sigma_hessian(*svd(w), es)
    for e, value in zip(es, got):
        # float64 autograd through the SVD: agreement to rounding (1e-10); the central difference has
        # truncation error O(h^2) ~ 1e-8 and rounding ~ eps / h^2 ~ 1e-8, so 1e-5 relative is safe
        torch.testing.assert_close(value, autograd_second_derivative(w, e), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(value, finite_difference(w, e), rtol=1e-5, atol=1e-7)
    assert (got >= 0).all()  # sigma_1 is convex


@pytest.mark.parametrize("shape", [(5, 5), (6, 3)])
def test_deterministic_prediction_error_is_third_order(shape):
    """One full-batch step W -> W + M: first + second order prediction is off by O(|M|^3)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g, dtype=DT)
    direction = torch.randn(*shape, generator=g, dtype=DT)
    u, s, v = svd(w)
    errors = []
    for eta in [0.04, 0.02, 0.01, 0.005]:
        step = -eta * direction
        pred = sigma_dynamics(u, s, v, step, torch.zeros(2, *shape, dtype=DT))
        observed = torch.linalg.matrix_norm(w + step, 2) - s[0]
        first_only = abs(observed - pred.first_order)
        errors.append(abs(observed - pred.drift).item())
        assert errors[-1] < 0.05 * first_only  # the second order term captures most of what the first misses
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(6.0 < r < 10.0 for r in ratios), ratios  # halving eta divides the error by ~8: O(eta^3)


def test_noise_terms_equal_brute_force_expectations():
    """Diffusion and noise curvature are expectations over the noise: check against an explicit covariance."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, generator=g, dtype=DT)
    u, s, v = svd(w)
    b = 6
    noise = torch.randn(b, 4, 3, generator=g, dtype=DT)
    noise = noise - noise.mean(0)
    cov_b = torch.einsum("bi,bj->ij", noise.reshape(b, -1), noise.reshape(b, -1)) / (b * (b - 1))
    dyn = sigma_dynamics(u, s, v, torch.zeros(4, 3, dtype=DT), noise)
    grad = torch.outer(u[:, 0], v[:, 0]).reshape(-1)
    torch.testing.assert_close(dyn.diffusion, grad @ cov_b @ grad, rtol=1e-12, atol=0)
    # tr(Cov H): the Hessian of sigma_1 as a 12 x 12 matrix, by autograd through matrix_norm
    hess = torch.autograd.functional.hessian(
        lambda x: torch.linalg.matrix_norm(w + x.reshape(4, 3), 2), torch.zeros(12, dtype=DT)
    )
    torch.testing.assert_close(dyn.noise_curvature, 0.5 * (cov_b * hess).sum(), rtol=1e-8, atol=0)


def test_log_lipschitz_variance_includes_cross_layer_terms():
    g = torch.Generator().manual_seed(3)
    b = 10
    sigmas = torch.tensor([2.0, 0.5], dtype=DT)
    p = torch.randn(b, generator=g, dtype=DT)
    p = p - p.mean()
    projections = torch.stack([p, p * 0.25])  # perfectly correlated layers
    diffusions = projections.square().sum(1) / (b * (b - 1))
    drift, var, var_block = log_lipschitz_dynamics(sigmas, torch.zeros(2, dtype=DT), diffusions, projections)
    std_each = diffusions.sqrt() / sigmas  # both equal here: the log-variances of perfectly correlated terms
    torch.testing.assert_close(var, (std_each.sum()) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(var_block, (std_each**2).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(drift, -(std_each**2).sum() / 2, rtol=1e-12, atol=0)


def test_forecast_is_lognormal():
    g = torch.Generator().manual_seed(4)
    k = 2.0 * torch.exp((0.001 + 0.01 * torch.randn(200_000, 50, generator=g, dtype=DT)).sum(1))
    mean, std = lipschitz_forecast(2.0, 0.001, 1e-4, 50)
    assert abs(k.mean().item() - mean) < 3 * k.std().item() / math.sqrt(200_000)
    assert abs(k.std().item() - std) / std < 0.01


def weight_and_steps(shape, n, seed):
    """A random weight, a mean step (scale 0.1) and ``n`` centred per-sample deviations (scale 0.05)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=DT)
    mean = 0.1 * torch.randn(*shape, generator=g, dtype=DT)
    noise = 0.05 * torch.randn(n, *shape, generator=g, dtype=DT)
    return w, mean, noise - noise.mean(0)


def test_operator_dynamics_equal_the_closed_form_for_a_matrix():
    w, mean, noise = weight_and_steps((7, 4), 6, seed=5)
    u, s, v = svd(w)
    ref = sigma_dynamics(u, s, v, mean, noise, batch_size=10)
    got = operator_sigma_dynamics(lambda m, x: m @ x, w, u[:, 0], s[0], v[:, 0], mean, noise, batch_size=10)
    for field in ["first_order", "second_order", "noise_curvature", "drift", "diffusion", "projections"]:
        # CG to a 1e-10 relative residual on a condition number ~2 s1 / (s1 - s2) ~ 10: 1e-9 relative is safe
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize(
    ("solve_dtype", "tol", "rtol"),
    [
        (None, 1e-10, 1e-8),
        # the callback's setting. With condition numbers 20-28 here, the quadratic terms' error is ~cond * tol^2
        # (3e-5); the cross terms inside the projections are linear in the solve's error (cond * tol), but they are
        # ~1e-2 of the projections: 1e-3 relative holds both (measured: 4e-4 at most).
        (torch.float32, 1e-3, 1e-3),
    ],
)
def test_operator_dynamics_of_a_conv_equal_the_dense_operator(padding_mode, solve_dtype, tol, rtol):
    """A conv's true operator, built densely by jacrev (tests/reference.py), then the closed form on matrices.
    (Not circular padding: its Fourier symmetry repeats the top singular value, where sigma_1 has no derivative.)"""
    from lightning_lip.functional.spectral import layer_operator
    from tests.reference import dense_operator

    torch.manual_seed(6)
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode=padding_mode).double()
    shape = (2, 6, 6)
    mean = 0.05 * torch.randn_like(conv.weight)
    noise = 0.02 * torch.randn(5, *conv.weight.shape, dtype=DT)
    noise = noise - noise.mean(0)

    def dense(kernel):
        c = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode=padding_mode, bias=False).double()
        c.weight.data.copy_(kernel)
        return dense_operator(c, shape)

    a = dense(conv.weight.detach())
    u, s, v = svd(a)
    ref = sigma_dynamics(u, s, v, dense(mean), torch.stack([dense(n) for n in noise]))
    out_shape = conv(torch.zeros(1, *shape, dtype=DT)).shape[1:]
    u1, v1 = u[:, 0].view(out_shape), v[:, 0].view(shape)
    got = operator_sigma_dynamics(
        lambda k, x: layer_operator(conv, shape, weight=k)(x),
        conv.weight.detach(),
        u1,
        s[0],
        v1,
        mean,
        noise,
        tol=tol,
        solve_dtype=solve_dtype,
    )
    for field in ["first_order", "second_order", "noise_curvature", "drift", "diffusion", "projections"]:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=rtol, atol=1e-14)


def test_subsampled_noise_curvature_is_unbiased_and_the_rest_exact():
    w, mean, noise = weight_and_steps((6, 5), 40, seed=8)
    u, s, v = svd(w)
    full = sigma_dynamics(u, s, v, mean, noise)
    apply = lambda m, x: m @ x  # noqa: E731
    estimates = []
    for seed in range(200):
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
        part = operator_sigma_dynamics(apply, w, u[:, 0], s[0], v[:, 0], mean, noise[perm], curvature_samples=8)
        torch.testing.assert_close(part.diffusion, full.diffusion, rtol=1e-9, atol=0)  # cross terms: exact
        torch.testing.assert_close(part.second_order, full.second_order, rtol=1e-9, atol=0)
        estimates.append(part.noise_curvature)
    est = torch.stack(estimates)
    # the mean of 200 subsample estimates: within 4 standard errors of the full sum
    assert abs(est.mean() - full.noise_curvature) < 4 * est.std() / math.sqrt(200)
