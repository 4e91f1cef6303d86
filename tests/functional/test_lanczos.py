import math

import pytest
import torch

from lightning_lip.functional.lanczos import lanczos, slq_density, warm_start


def random_symmetric(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    return (A + A.T) / 2


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_and_min_match_eigvalsh(seed, k):
    A = random_symmetric(60, seed)
    ref = torch.linalg.eigvalsh(A)
    res = lanczos(lambda x: A @ x, torch.randn(60, dtype=torch.float64), k=k, max_iter=60, tol=1e-10, require_min=True)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, ref.flip(0)[:k], rtol=1e-9, atol=0)
    assert res.lambda_min.item() == pytest.approx(ref[0].item(), rel=1e-9)
    # residual bounds are honest: |theta - lambda| <= residual
    assert ((res.eigenvalues - ref.flip(0)[:k]).abs() <= res.residuals + 1e-12).all()
    # Ritz vectors are eigenvectors
    for lam, y in zip(res.eigenvalues, res.eigenvectors):
        assert (A @ y - lam * y).norm().item() <= 1e-9 * ref.abs().max().item() * 10


def test_breakdown_restarts_and_finds_top():
    # start vector inside an invariant subspace that misses the top eigenvector
    A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    v0 = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    res = lanczos(lambda x: A @ x, v0, max_iter=4, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.eigenvalues.item() == pytest.approx(5.0, rel=1e-12)
    assert res.lambda_min.item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("k", [1, 6])
def test_a_basis_that_spans_the_whole_space_is_converged(k):
    """With ``n`` steps the Ritz values are the eigenvalues (a model with 6 parameters, ``k`` up to 6): converged,
    though the top ``k`` had no previous step of the same size to compare with (``k = n``) or moved more than ``tol``
    at the last step."""
    A = random_symmetric(6, 0)
    res = lanczos(lambda x: A @ x, torch.randn(6, dtype=torch.float64), k=k, max_iter=30, tol=1e-12)
    assert res.converged and res.n_matvec == 6
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:k], rtol=1e-12, atol=1e-12)


def test_nonfinite_operator_returns_nan_not_converged():
    res = lanczos(lambda x: x * float("nan"), torch.ones(5))
    assert not res.converged and torch.isnan(res.eigenvalues).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=0), "k"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=0.0), "tol"),
        (dict(residual_factor=0.0), "residual_factor"),
        (dict(residual_factor=1.5), "residual_factor"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos(lambda x: x, torch.ones(4), **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        lanczos(lambda x: x, torch.ones(2, 2))


def spectrum_matrix(eigenvalues, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T, Q


@pytest.mark.parametrize("tol", [1e-3, 1e-4, 1e-6])
def test_converged_is_never_reported_above_tolerance_near_degenerate(tol):
    # lambda2 / lambda1 = 0.99 and a bulk below, many seeds and start vectors
    for seed in range(30):
        A, _ = spectrum_matrix([1.0, 0.99] + torch.linspace(-0.3, 0.9, 98).tolist(), seed)
        v0 = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + seed))
        res = lanczos(lambda x: A @ x, v0, max_iter=100, tol=tol)
        if res.converged:
            assert abs(res.eigenvalues[0].item() - 1.0) <= tol


def test_start_nearly_orthogonal_to_top_does_not_stop_on_lambda2():
    A, Q = spectrum_matrix([1.0, 0.9] + torch.linspace(-0.5, 0.8, 48).tolist(), 0)
    v0 = Q[:, 1] + 1e-3 * Q[:, 0] + 1e-3 * Q[:, 2:].sum(1)
    res = lanczos(lambda x: A @ x, v0, max_iter=50, tol=1e-4)
    assert res.converged and res.eigenvalues[0].item() == pytest.approx(1.0, abs=1e-4)


def test_random_starts_never_certify_lambda2_of_a_close_pair():
    """lambda_2/lambda_1 = 0.99 above a network-like spectrum, 400 Gaussian starts (diagonal operator: a random
    start in any eigenbasis), with HessianEigenMonitor's residual bar for cold starts, tol/100. With the default
    tol/10, seed 304 certifies lambda_2 (its start has |c_1/c_2| = 3e-3)."""
    n, tol = 300, 1e-3
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        A = torch.diag(torch.cat([torch.tensor([1.0, 0.99]), torch.rand(n - 2, generator=g) * 0.8 - 0.02]).double())
        res = lanczos(
            lambda x: A @ x, torch.randn(n, dtype=torch.float64, generator=g), max_iter=n, tol=tol, residual_factor=0.01
        )
        assert res.converged and abs(res.eigenvalues[0].item() - 1.0) <= tol, seed


@pytest.mark.parametrize("hard", [False, True])
def test_warm_start_with_residual_at_tol_stays_within_tol(hard):
    """The monitor's warm start (previous eigenvector + 10% noise, residual bar = tol) after the operator moved:
    lambda_2/lambda_1 = 0.99, the top eigenvector rotated by 0.05 rad and lambda_max scaled by 1.01, with a
    network-like spectrum below or (``hard``) a dense one up to 0.95."""
    n, tol = 300, 1e-3
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        rest = torch.rand(n - 2, generator=g) * 1.25 - 0.3 if hard else torch.rand(n - 2, generator=g) * 0.8 - 0.02
        eigs = torch.cat([torch.tensor([1.0, 0.99]), rest]).tolist()
        _, Q = spectrum_matrix(eigs, seed)
        c, s = math.cos(0.05), math.sin(0.05)
        Q2 = Q.clone()
        Q2[:, 0], Q2[:, 2] = c * Q[:, 0] + s * Q[:, 2], -s * Q[:, 0] + c * Q[:, 2]
        A2 = Q2 @ torch.diag(torch.tensor([1.01] + eigs[1:], dtype=torch.float64)) @ Q2.T
        noise = torch.randn(n, dtype=torch.float64, generator=g)
        v0 = Q[:, 0] + 0.1 * noise / noise.norm()  # the previous top eigenvector
        res = lanczos(lambda x: A2 @ x, v0, max_iter=n, tol=tol, residual_factor=1.0)
        assert res.converged and abs(res.eigenvalues[0].item() - 1.01) <= tol * 1.01


def test_warm_start_follows_a_changed_top_direction():
    # The old top eigenvector is orthogonal to the new one; mixed with 10% noise (the monitor's warm start) the
    # solver still finds the new lambda_max.
    A_old, Q = spectrum_matrix([2.0, 1.0] + [0.1] * 30, 1)
    A_new = A_old + 3.0 * torch.outer(Q[:, 5], Q[:, 5])  # new top: 3.1 along Q[:, 5]
    noise = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v0 = Q[:, 0] + 0.1 * noise / noise.norm()
    res = lanczos(lambda x: A_new @ x, v0, max_iter=32, tol=1e-8)
    assert res.eigenvalues[0].item() == pytest.approx(3.1, rel=1e-8)
    # with the monitor's warm-start rule (residual bar = tol = 1e-3) too
    res = lanczos(lambda x: A_new @ x, v0, max_iter=32, tol=1e-3, residual_factor=1.0)
    assert res.converged and res.eigenvalues[0].item() == pytest.approx(3.1, rel=1e-3)


def test_quadrature_is_exact_for_low_degree_polynomials():
    """Gauss quadrature of m Lanczos steps integrates x^p exactly for p < 2m: q0^T A^p q0, to rounding."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(-1, 2, 60, dtype=torch.float64)) @ q.T
    v = torch.randn(60, generator=g, dtype=torch.float64)
    res = lanczos(lambda x: A @ x, v, max_iter=8, tol=math.inf, min_iter=8)
    q0 = v / v.norm()
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    for p in range(16):
        exact = q0 @ torch.linalg.matrix_power(A, p) @ q0
        assert (res.weights * res.nodes**p).sum().item() == pytest.approx(exact.item(), abs=1e-10)


def test_slq_density_matches_the_exact_spectrum():
    g = torch.Generator().manual_seed(1)
    n = 400
    eigs = torch.cat([torch.randn(300, generator=g) * 0.1, 3 + torch.randn(100, generator=g) * 0.2]).double()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(eigs) @ q.T
    density = slq_density(lambda x: A @ x, n, n_vectors=20, n_steps=40, generator=g)
    grid = torch.linspace(-1, 4, 201, dtype=torch.float64)
    exact = torch.exp(-0.5 * ((grid[:, None] - eigs) / 0.2) ** 2).sum(1) / (n * 0.2 * math.sqrt(2 * math.pi))
    got = density.smoothed(grid, 0.2)
    # Hutchinson-type estimate with 20 vectors: trace errors ~ 1/sqrt(20 n); 5% of the peak is a ~4 sigma bound
    assert (got - exact).abs().max() < 0.05 * exact.max()
    assert torch.trapezoid(got, grid).item() == pytest.approx(1.0, abs=1e-3)
    assert (density.nodes.max() - eigs.max()).abs() < 1e-6  # 40 steps resolve the extremes
    edges, mass = density.histogram(bins=10)
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-12) and edges.shape == (11,)
    high = mass[edges[:-1] >= 2.0].sum().item()
    assert high == pytest.approx(0.25, abs=0.03)  # a quarter of the eigenvalues sit near 3


@pytest.mark.parametrize("n", [1, 2, 50])
@pytest.mark.parametrize("mix", [1e-3, 0.1, 1.0, 3.0])
def test_warm_start_cannot_cancel_the_warm_vector(n, mix):
    """Noise opposite to the warm vector (the only other unit vector in one dimension, where it made half the
    audits of a ``Linear(1, m)`` start from zero): its sign flips, its part orthogonal to the warm vector stays."""
    g = torch.Generator().manual_seed(n)
    warm = torch.randn(n, generator=g, dtype=torch.float64)
    w = warm / warm.norm()
    for noise in (-warm * 2.0, torch.randn(n, generator=g, dtype=torch.float64)):
        start = warm_start(warm, noise, mix)
        along = torch.dot(start, w).item()
        assert along >= 1.0
        nu = noise / noise.norm()
        assert along == pytest.approx(1 + mix * abs(torch.dot(nu, w).item()), rel=1e-12)
        orthogonal = lambda x: x - torch.dot(x, w) * w  # noqa: E731
        assert torch.allclose(orthogonal(start).abs(), mix * orthogonal(nu).abs(), rtol=0, atol=1e-12)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    torch.testing.assert_close(warm_start(zero, noise, mix), mix * noise / noise.norm(), rtol=1e-14, atol=0)
