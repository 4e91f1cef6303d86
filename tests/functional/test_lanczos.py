import pytest
import torch

from lightning_lip.functional.lanczos import lanczos


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


def test_nonfinite_operator_returns_nan_not_converged():
    res = lanczos(lambda x: x * float("nan"), torch.ones(5))
    assert not res.converged and torch.isnan(res.eigenvalues).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(k=0), "k"), (dict(max_iter=0), "max_iter"), (dict(tol=0.0), "tol")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos(lambda x: x, torch.ones(4), **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        lanczos(lambda x: x, torch.ones(2, 2))
