r"""Mini-batch gradient noise in low-rank form, and the Lipschitz dynamics it drives (Luo et al.).

From per-sample gradients :math:`g_i` (``[B, P]``), mean :math:`\bar g` and centred rows :math:`\Omega_i = g_i -
\bar g`: the per-sample covariance :math:`\Sigma = \Omega^\top\Omega/(B-1)` (never formed: its non-zero spectrum
is the one of the ``B x B`` Gram matrix), the mini-batch noise covariance :math:`\Sigma_B = \Sigma/B`. Sampling is
treated as with replacement unless a ``batch_size`` says otherwise: without replacement from ``N`` examples
:math:`\Sigma_B` shrinks by :math:`(N-B)/(N-1)` (to 0 for full-batch steps).

For a layer :math:`W = \sum_j \sigma_j u_j v_j^\top` and a step :math:`\Delta W = M + N`, mean step ``M`` and noise
``N`` with per-sample deviations :math:`N_i` (the centred gradients mapped through the step, e.g. :math:`-\eta
\Omega_i` for SGD), the top singular value moves by

- drift :math:`\mu = \langle u_1v_1^\top, M\rangle + \frac12\nabla^2\sigma_1[M, M] + \frac{1}{2B(B-1)}\sum_i
  \nabla^2\sigma_1[N_i, N_i]` (first order, second order, noise curvature);
- diffusion :math:`s^2 = \frac{1}{B(B-1)}\sum_i \langle \nabla\sigma_1(W + M), N_i\rangle^2`, the gradient taken at the
  end of the mean step, :math:`\nabla\sigma_1(W+M) \approx u_1v_1^\top + \nabla^2\sigma_1[M, \cdot]` (the
  correction matters when the mean step is large, as with momentum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoiseStatistics:
    r"""Statistics of the gradient noise of one batch (0-dim float64 tensors unless stated).

    Attributes:
        batch_size: ``B``.
        trace: :math:`\mathrm{tr}\,\Sigma`, per-sample covariance.
        grad_norm_sq: :math:`\|\bar g\|^2`.
        grad_norm_sq_unbiased: :math:`\|\bar g\|^2 - \mathrm{tr}\,\Sigma/B`, unbiased for :math:`\|G\|^2`.
        scale: simple noise scale :math:`B_{noise} = \mathrm{tr}\,\Sigma / \|G\|^2` (McCandlish et al. 2018), ``inf``
            when the unbiased :math:`\|G\|^2` is not positive (noise dominates).
        top_eigenvalues: ``[min(k, B, P)]`` largest eigenvalues of :math:`\Sigma`, descending.
        effective_rank: :math:`(\mathrm{tr}\,\Sigma)^2/\|\Sigma\|_F^2`, between 1 and ``min(B - 1, P)``.
    """

    batch_size: int
    trace: Tensor
    grad_norm_sq: Tensor
    grad_norm_sq_unbiased: Tensor
    scale: Tensor
    top_eigenvalues: Tensor
    effective_rank: Tensor


def centred(grads: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[P]`` and centred rows ``[B, P]`` of per-sample gradients ``grads`` ``[B, P]``, in at least float32:
    half-precision gradients are converted first (the centring cancels their leading digits)."""
    grads = grads.to(torch.promote_types(grads.dtype, torch.float32))
    mean = grads.mean(0)
    return mean, grads - mean


def gram_spectrum(omega: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigenvalues (descending, ``[B]``, float64) and eigenvectors (``[B, B]`` columns) of the Gram matrix
    :math:`K = \Omega\Omega^\top/(B-1)`, which has the non-zero eigenvalues of :math:`\Sigma`; NaN if ``omega`` is
    not finite."""
    gram = (omega @ omega.T).double() / (omega.shape[0] - 1)  # the B x P product in the input precision
    if not torch.isfinite(gram).all():
        nan = torch.full_like(gram, torch.nan)
        return nan[0], nan
    mu, q = torch.linalg.eigh(gram)
    return mu.flip(0), q.flip(1)


def noise_statistics(grads: Tensor, k: int = 5) -> NoiseStatistics:
    """Noise statistics of per-sample gradients ``grads`` ``[B, P]``, ``B >= 2``, from the ``B x B`` Gram matrix."""
    b = grads.shape[0]
    if b < 2:
        raise ValueError(f"The noise needs at least 2 samples, got {b}.")
    mean, omega = centred(grads)
    mu, _ = gram_spectrum(omega)
    mu = mu.clamp_min(0)
    trace = mu.sum()
    norm_sq = mean.double().square().sum()
    unbiased = norm_sq - trace / b
    scale = trace / unbiased if unbiased > 0 else torch.tensor(torch.inf, dtype=torch.float64)
    effective_rank = trace.square() / mu.square().sum() if trace > 0 else torch.zeros((), dtype=torch.float64)
    return NoiseStatistics(b, trace, norm_sq, unbiased, scale, mu[: min(k, b, grads.shape[1])], effective_rank)


def noise_factor(omega: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""Top-``k`` eigenpairs of :math:`\Sigma` without forming it: eigenvalues ``[r]`` and orthonormal eigenvectors
    ``[P, r]`` :math:`\Omega^\top q_j/\sqrt{(B-1)\mu_j}`, ``r = min(k, B - 1, P)``: :math:`\Sigma` has rank at most
    ``min(B - 1, P)``, and the eigenvectors of its zero eigenvalues are not in the factor.
    (:math:`\Omega^\top/\sqrt{B-1}` itself is an exact square root factor.)"""
    b, p = omega.shape
    mu, q = gram_spectrum(omega)
    r = min(k, b - 1, p)
    mu, q = mu[:r], q[:, :r]
    vectors = omega.double().T @ q / ((b - 1) * mu.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    return mu, vectors


def layer_snr(mean: Tensor, omega: Tensor) -> Tensor:
    r"""Signal-to-noise ratio of a layer's mini-batch gradient, :math:`\|\bar g_l\|^2 / \mathrm{tr}\,\Sigma_{B,l}`,
    from its mean ``[P_l]`` and centred rows ``[B, P_l]``; above 1 the batch gradient is mostly signal."""
    b = omega.shape[0]
    noise = omega.square().sum().double() / ((b - 1) * b)
    return mean.square().sum().double() / noise


def sigma_hessian(u: Tensor, s: Tensor, v: Tensor, e: Tensor, f: Tensor | None = None) -> Tensor:
    r"""Second derivative :math:`\nabla^2\sigma_1[E, F]` of the top singular value of :math:`W = U\,\mathrm{diag}(s)
    V^\top`, a symmetric bilinear form in the directions (:math:`F = E` by default).

    Args:
        u: ``[m, r]`` left singular vectors, ``r = min(m, n)``.
        s: ``[r]`` singular values, descending, :math:`\sigma_1 > \sigma_2` (the value is not differentiable else).
        v: ``[n, r]`` right singular vectors.
        e, f: ``[..., m, n]`` directions (broadcast against each other).

    Returns:
        ``[...]``; for ``E = F``: :math:`\sum_{j\ge2}\frac{\sigma_1(\alpha_j^2+\beta_j^2)+2\sigma_j\alpha_j\beta_j}
        {\sigma_1^2-\sigma_j^2} + \frac{\|Ev_1\|^2-\|\alpha\|^2+\|E^\top u_1\|^2-\|\beta\|^2}{\sigma_1}` with
        :math:`\alpha_j = u_j^\top E v_1`, :math:`\beta_j = u_1^\top E v_j`; non-negative (:math:`\sigma_1` is
        convex).
    """
    ev, etu = e @ v[:, 0], u[:, 0] @ e  # [..., m], [..., n]
    fv, ftu = (ev, etu) if f is None else (f @ v[:, 0], u[:, 0] @ f)
    ae, be, af, bf = ev @ u, etu @ v, fv @ u, ftu @ v  # alpha_j and beta_j of E and F, [..., r]
    s1, sj = s[0], s[1:]
    coupled = s1 * (ae * af + be * bf)[..., 1:] + sj * (ae * bf + be * af)[..., 1:]
    coupled = (coupled / (s1 * s1 - sj * sj)).sum(-1)
    outside = (ev * fv).sum(-1) - (ae * af).sum(-1) + (etu * ftu).sum(-1) - (be * bf).sum(-1)
    return coupled + outside / s1


@dataclass
class SigmaDynamics:
    r"""Predicted change of one layer's top singular value over one step (0-dim float64 unless stated).

    Attributes:
        first_order: :math:`\langle u_1 v_1^\top, M\rangle`.
        second_order: :math:`\frac12\nabla^2\sigma_1[M, M]`.
        noise_curvature: :math:`\frac12\mathrm{tr}(\mathrm{Cov}(N)\nabla^2\sigma_1) \ge 0`.
        drift: :math:`\mu`, the sum of the three.
        diffusion: :math:`s^2`, variance of the change.
        projections: ``[n]`` :math:`\langle u_1 v_1^\top, N_i\rangle + \nabla^2\sigma_1[M, N_i]`, the noise seen by the
            gradient of :math:`\sigma_1` at the end of the mean step; for cross-layer covariances.
    """

    first_order: Tensor
    second_order: Tensor
    noise_curvature: Tensor
    drift: Tensor
    diffusion: Tensor
    projections: Tensor


def sigma_dynamics(
    u: Tensor, s: Tensor, v: Tensor, mean_step: Tensor, noise_steps: Tensor, batch_size: float | None = None
) -> SigmaDynamics:
    r"""Drift and diffusion of :math:`\sigma_1(W)` under the step :math:`M + N`.

    Args:
        u, s, v: the SVD of ``W`` as in :func:`sigma_hessian` (float64 recommended).
        mean_step: ``[m, n]`` mean step ``M``.
        noise_steps: ``[n, m, n]`` per-sample deviations :math:`N_i` of ``n`` samples, centred.
        batch_size: samples averaged by the step, default ``n``; the step's noise covariance is
            :math:`\sum_i N_i N_i^\top / ((n-1)\,\mathrm{batch\_size})`. Pass :math:`B(N-1)/(N-B)` for batches
            drawn without replacement from ``N`` examples (``inf``: full batch, no noise).
    """
    scale = 1.0 / ((noise_steps.shape[0] - 1) * (batch_size or noise_steps.shape[0]))
    u1, v1 = u[:, 0], v[:, 0]
    first = u1 @ mean_step @ v1
    second = 0.5 * sigma_hessian(u, s, v, mean_step)
    curvature = 0.5 * scale * sigma_hessian(u, s, v, noise_steps).sum()
    projections = torch.einsum("m,bmn,n->b", u1, noise_steps, v1) + sigma_hessian(u, s, v, mean_step, noise_steps)
    diffusion = scale * projections.square().sum()
    return SigmaDynamics(first, second, curvature, first + second + curvature, diffusion, projections)


def operator_sigma_dynamics(
    apply: Callable[[Tensor, Tensor], Tensor],
    weight: Tensor,
    u: Tensor,
    sigma: Tensor,
    v: Tensor,
    mean_step: Tensor,
    noise_steps: Tensor,
    batch_size: float | None = None,
    max_iter: int = 300,
    tol: float = 1e-10,
    curvature_samples: int | None = None,
    solve_dtype: torch.dtype | None = None,
) -> SigmaDynamics:
    r""":func:`sigma_dynamics` for the top singular value of a linear map given as a function, not a matrix (a
    convolution's true operator), without its SVD.

    The second derivative comes from the augmented symmetric operator :math:`B = [[0, A], [A^\top, 0]]`, whose top
    eigenpair is :math:`(\sigma_1, x = (u; v)/\sqrt2)`: :math:`\nabla^2\sigma_1[E, F] = 2\,y_E^\top(\sigma_1 I -
    B)^+ y_F` with :math:`y_E = (I - xx^\top)(A(E)v;\,A(E)^\top u)/\sqrt2`, solved by conjugate gradients on
    :math:`x^\perp` (batched over the directions; the condition number is :math:`2\sigma_1/(\sigma_1-\sigma_2)`).

    Args:
        apply: ``apply(W, x) -> A(W) x``, linear in the weight ``W`` and in one sample ``x``.
        weight: the current weight ``W``.
        u, sigma, v: the top singular triplet of ``A(W)`` (output shape, 0-dim, input shape), converged.
        mean_step, noise_steps: as in :func:`sigma_dynamics`, shaped like the weight (``[n, *weight]``).
        batch_size: as in :func:`sigma_dynamics`.
        max_iter, tol: conjugate-gradient cap and relative residual tolerance.
        curvature_samples: estimate the noise-curvature sum from this many of the ``n`` deviations (scaled by
            ``n / curvature_samples``: unbiased for exchangeable samples), solving ``1 + curvature_samples`` systems
            instead of ``1 + n``; ``None``: all. The cross terms :math:`\nabla^2\sigma_1[M, N_i]` need only the
            mean step's solve and stay exact.
        solve_dtype: dtype of the conjugate gradients (``None``: the weight's), e.g. ``torch.float32`` in a
            float64 problem: 2-5x faster convolutions on CPU, accurate enough for a ``tol`` of 1e-3, which the
            second-order terms tolerate (their error is about the condition number times ``tol**2``; the cross
            terms' about the condition number times ``tol``, relative).
    """
    n = noise_steps.shape[0]
    scale = 1.0 / ((n - 1) * (batch_size or n))
    k = n if curvature_samples is None else min(n, curvature_samples)
    solved = torch.cat([mean_step[None], noise_steps[:k]])
    ev = torch.func.vmap(lambda e: apply(e, v))(solved)  # A(E) v
    etu = torch.func.vmap(lambda e: _adjoint(lambda x: apply(e, x), v, u))(solved)  # A(E)^T u
    y = _project((ev / math.sqrt(2), etu / math.sqrt(2)), u, v)
    z = _solve_shifted(apply, weight, u, sigma, v, y, max_iter, tol, solve_dtype or weight.dtype)
    quad = 2 * (_dot(y[0], z[0]) + _dot(y[1], z[1]))  # nabla^2 sigma[E, E] per solved direction
    # Over all n noise directions, as inner products in weight space: u^T A(N_i) v, and (z_M in x-perp, symmetry)
    # nabla^2 sigma[M, N_i] = 2 z_M^T y_i = sqrt(2) (z_M,out^T A(N_i) v + u^T A(N_i) z_M,in).
    grad_first = _weight_gradient(apply, weight, [(u, v)])
    grad_cross = _weight_gradient(apply, weight, [(z[0][0], v), (u, z[1][0])])
    first = (mean_step * grad_first).sum()
    projections = noise_steps.flatten(1) @ (grad_first + math.sqrt(2) * grad_cross).flatten()
    second, curvature = 0.5 * quad[0], 0.5 * scale * quad[1:].sum() * (n / k)
    return SigmaDynamics(
        first, second, curvature, first + second + curvature, scale * projections.square().sum(), projections
    )


def _weight_gradient(
    apply: Callable[[Tensor, Tensor], Tensor], weight: Tensor, pairs: list[tuple[Tensor, Tensor]]
) -> Tensor:
    r"""The weight-shaped :math:`G` with :math:`\langle E, G\rangle = \sum_{(a, x)} a^\top A(E)\,x` for every
    ``E``: the gradient in ``W`` of that sum, the same at every ``W`` (``apply`` is linear in it)."""
    return torch.func.grad(lambda w: sum((a * apply(w, x)).sum() for a, x in pairs))(weight)


def _adjoint(operator: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    r""":math:`A^\top y` of the linear ``operator`` (evaluated at ``x``, any point of its input space)."""
    return torch.func.vjp(operator, x)[1](y)[0]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner products of two ``[k, ...]`` batches."""
    return (a * b).flatten(1).sum(1)


def _project(pair: tuple[Tensor, Tensor], u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""Remove the component along :math:`x = (u; v)/\sqrt2` from a batch of pairs ``(a [k, *out], b [k, *in])``."""
    a, b = pair
    c = (_dot(a, u.expand_as(a)) + _dot(b, v.expand_as(b))) / 2
    return a - c.view(-1, *[1] * u.dim()) * u, b - c.view(-1, *[1] * v.dim()) * v


def _solve_shifted(
    apply: Callable[[Tensor, Tensor], Tensor],
    weight: Tensor,
    u: Tensor,
    sigma: Tensor,
    v: Tensor,
    rhs: tuple[Tensor, Tensor],
    max_iter: int,
    tol: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`(\sigma I - B)z = y` on :math:`x^\perp` for a batch of right-hand sides by conjugate gradients
    in ``dtype`` (:math:`\sigma I - B` is positive definite there when :math:`\sigma_1 > \sigma_2`); ``z`` in the
    right-hand sides' dtype."""
    out = rhs[0].dtype
    weight, u, sigma, v = (t.to(dtype) for t in (weight, u, sigma, v))
    rhs = (rhs[0].to(dtype), rhs[1].to(dtype))
    forward = torch.func.vmap(lambda x: apply(weight, x))
    backward = torch.func.vmap(torch.func.vjp(lambda x: apply(weight, x), v)[1])

    def shifted(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a, b = pair
        return _project((sigma * a - forward(b), sigma * b - backward(a)[0]), u, v)

    def dot(p: tuple[Tensor, Tensor], q: tuple[Tensor, Tensor]) -> Tensor:
        return _dot(p[0], q[0]) + _dot(p[1], q[1])

    z = (torch.zeros_like(rhs[0]), torch.zeros_like(rhs[1]))
    r, p = rhs, rhs
    rs = dot(r, r)
    stop = (tol * tol) * rs
    for _ in range(max_iter):
        if bool((rs <= stop).all()):
            break
        kp = shifted(p)
        alpha = torch.where(rs > 0, rs / dot(p, kp), torch.zeros_like(rs))
        z = tuple(zi + _bcast(alpha, zi) * pi for zi, pi in zip(z, p))
        r = tuple(ri - _bcast(alpha, ri) * ki for ri, ki in zip(r, kp))
        rs_new = dot(r, r)
        beta = torch.where(rs > 0, rs_new / rs, torch.zeros_like(rs))
        p = tuple(ri + _bcast(beta, ri) * pi for ri, pi in zip(r, p))
        rs = rs_new
    return z[0].to(out), z[1].to(out)


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.view(-1, *[1] * (like.dim() - 1))


def log_lipschitz_dynamics(
    sigmas: Tensor, drifts: Tensor, diffusions: Tensor, projections: Tensor, batch_size: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Drift and variance of :math:`\log K = \sum_l \log\sigma_l` over one step.

    Args:
        sigmas, drifts, diffusions: ``[L]`` per-layer :math:`\sigma_l`, :math:`\mu_l`, :math:`s_l^2`.
        projections: ``[L, n]`` per-layer :attr:`SigmaDynamics.projections`.
        batch_size: as in :func:`sigma_dynamics`.

    Returns:
        ``(drift, variance, variance_block_diagonal)``: drift :math:`\sum_l \mu_l/\sigma_l - s_l^2/(2\sigma_l^2)`
        (Itô); the variance from the per-sample projections :math:`\frac{1}{(n-1)B}\sum_i(\sum_l
        p_{il}/\sigma_l)^2`, cross-layer terms included; and :math:`\sum_l s_l^2/\sigma_l^2`, the paper's
        independent-layer approximation.
    """
    n = projections.shape[1]
    drift = (drifts / sigmas - diffusions / (2 * sigmas * sigmas)).sum()
    variance = (projections / sigmas[:, None]).sum(0).square().sum() / ((n - 1) * (batch_size or n))
    return drift, variance, (diffusions / (sigmas * sigmas)).sum()


def lipschitz_forecast(k0: float, drift: float, variance: float, steps: int) -> tuple[float, float]:
    r"""Mean and standard deviation of :math:`K` after ``steps`` steps with the per-step ``drift`` and ``variance``
    of :math:`\log K` frozen (log-normal): :math:`E K = K_0 e^{t(\mathrm{drift} + \mathrm{variance}/2)}`
    :math:`= K_0 e^{t\sum_l\mu_l/\sigma_l}`, :math:`\mathrm{Var} K = (EK)^2(e^{t\,\mathrm{variance}} - 1)`."""
    mean = k0 * math.exp(steps * (drift + variance / 2))
    return mean, mean * math.sqrt(math.expm1(steps * variance))
