import inspect

import pytest
import torch

from lightning_lip.functional.stability import (
    gradient_clipping,
    linear_step,
    preconditioner,
    stability_threshold,
)


def run_quadratic(make_optimizer, lam, steps=3000):
    """Minimize lam/2 * theta^2 with a real torch optimizer (maximize, if it ascends); return |theta_T| / |theta_0|."""
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make_optimizer([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * theta**2).sum().backward()
        opt.step()
        if not torch.isfinite(theta).all() or theta.abs().item() > 1e12:
            return float("inf")
    return theta.abs().item()


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(momentum=0.9), dict(momentum=0.5, dampening=0.3), dict(momentum=0.9, nesterov=True)],
    ids=["sgd", "heavy-ball", "dampened", "nesterov"],
)
def test_sgd_thresholds_are_sharp(kwargs):
    lr, probe = 0.1, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **kwargs)
    threshold = stability_threshold(probe, probe.param_groups[0])
    below = run_quadratic(lambda p: torch.optim.SGD(p, lr=lr, **kwargs), 0.99 * threshold / lr)
    above = run_quadratic(lambda p: torch.optim.SGD(p, lr=lr, **kwargs), 1.01 * threshold / lr)
    assert below < 1e-3 and above > 1e3


def test_adam_threshold_value_and_unknown_optimizer():
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 0.999))
    assert stability_threshold(adam, adam.param_groups[0]) == pytest.approx(38.0)
    nadam = torch.optim.NAdam([torch.nn.Parameter(torch.zeros(1))])
    assert stability_threshold(nadam, nadam.param_groups[0]) is None


@pytest.mark.parametrize("make", [torch.optim.SGD, torch.optim.Adam])
def test_gradient_ascent_has_no_threshold_on_lambda_max(make):
    optimizer = make([torch.nn.Parameter(torch.zeros(1))], lr=0.1, maximize=True)
    assert stability_threshold(optimizer, optimizer.param_groups[0]) is None


def test_gradient_ascent_is_bounded_by_the_smallest_eigenvalue():
    """Why ``maximize=True`` has no threshold on ``lr * lambda_max``: ascending ``lam/2 theta^2`` with ``lam < 0``
    (``lambda_max = lambda_min = lam``) is stable iff ``lr * (-lambda_min) < 2``, while ``lr * lambda_max < 0``."""
    lr = 0.1
    below = run_quadratic(lambda p: torch.optim.SGD(p, lr=lr, maximize=True), -0.99 * 2 / lr)
    above = run_quadratic(lambda p: torch.optim.SGD(p, lr=lr, maximize=True), -1.01 * 2 / lr)
    assert below < 1e-3 and above > 1e3


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01),
        pytest.param(
            lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01, decoupled_weight_decay=True),
            marks=pytest.mark.skipif(
                "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters,
                reason="newer than torch 2.4",
            ),
        ),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, amsgrad=True),
        lambda ps: torch.optim.Adamax(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, weight_decay=0.01),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1),
    ],
)
def test_linear_step_is_the_step_the_optimizer_takes(make):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    optimizer = make([p])
    checked = 0
    for _ in range(4):
        grad = torch.randn(3, 4, generator=g, dtype=torch.float64)
        step = linear_step(optimizer, p, grad)
        before = p.detach().clone()
        p.grad = grad
        optimizer.step()
        torch.testing.assert_close(p.detach() - before, step.offset + step.gain * grad, rtol=1e-12, atol=1e-14)
        checked += 1
    assert checked == 4  # the first step too, from the state torch creates in it


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, amsgrad=True),
    ],
    ids=["nesterov", "adam", "adamw-amsgrad"],
)
@pytest.mark.parametrize(
    "algorithm, value, clip_",
    [
        ("norm", 0.5, lambda ps, v: torch.nn.utils.clip_grad_norm_(ps, v)),  # binds: the norm is ~4.9
        ("norm", 50.0, lambda ps, v: torch.nn.utils.clip_grad_norm_(ps, v)),  # does not bind
        ("value", 0.5, lambda ps, v: torch.nn.utils.clip_grad_value_(ps, v)),  # some coordinates held, some not
    ],
    ids=["norm", "norm-loose", "value"],
)
def test_clipped_linear_step_is_the_step_the_optimizer_takes_after_torch_clipping(make, algorithm, value, clip_):
    """The gradient clipping Lightning applies (torch's ``clip_grad_norm_`` / ``clip_grad_value_`` over all of an
    optimizer's parameters), frozen at the step's gradients, gives that step exactly in the gradients of backward."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64)) for shape in [(3, 4), (5,)]]
    optimizer = make(params)
    checked = 0
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        maps = gradient_clipping(grads, value, algorithm)
        steps = [linear_step(optimizer, p, grad, clip) for p, grad, clip in zip(params, grads, maps)]
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        clip_(params, value)
        optimizer.step()
        for p, b, step, grad in zip(params, before, steps, grads):
            torch.testing.assert_close(p.detach() - b, step.offset + step.gain * grad, rtol=1e-12, atol=1e-14)
        checked += 1
    assert checked == 4
    a, b = maps[0]
    if algorithm == "norm":
        assert b == 0.0 and (a < 0.2 if value == 0.5 else a == 1.0)
    else:
        assert 0 < float((a == 0).double().mean()) < 1 and torch.equal(b.abs() == value, a == 0)


def test_gradient_clipping_rejects_unknown_algorithm():
    with pytest.raises(ValueError, match="`algorithm` must be 'norm' or 'value'"):
        gradient_clipping([torch.ones(2)], 1.0, "max")


def test_linear_step_unknown_cases():
    p = torch.nn.Parameter(torch.ones(2))
    assert linear_step(torch.optim.NAdam([p]), p) is None
    assert linear_step(torch.optim.Adam([p]), p) is None  # before its first step, without the gradient it takes
    assert linear_step(torch.optim.SGD([p], lr=0.1, maximize=True), p) is None
    assert linear_step(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), p) is None


FROZEN = {  # optimizer with eps = 1, and its state long after the start (bias corrections = 1) at v = 0
    "adam": (torch.optim.Adam, dict(betas=(0.9, 0.999)), dict(exp_avg=0.0, exp_avg_sq=0.0)),
    "adam-beta0.5": (torch.optim.Adam, dict(betas=(0.5, 0.999)), dict(exp_avg=0.0, exp_avg_sq=0.0)),
    "adam-beta0": (torch.optim.Adam, dict(betas=(0.0, 0.999)), dict(exp_avg=0.0, exp_avg_sq=0.0)),
    "adamax": (torch.optim.Adamax, dict(betas=(0.9, 0.999)), dict(exp_avg=0.0, exp_inf=1.0)),
    "rmsprop": (torch.optim.RMSprop, dict(), dict(square_avg=0.0)),
    "rmsprop-momentum": (torch.optim.RMSprop, dict(momentum=0.9), dict(square_avg=0.0, momentum_buffer=0.0)),
    "rmsprop-centered": (
        torch.optim.RMSprop,
        dict(momentum=0.5, centered=True),
        dict(square_avg=0.0, momentum_buffer=0.0, grad_avg=0.0),
    ),
    "adagrad": (torch.optim.Adagrad, dict(), dict(sum=0.0)),
    "adagrad-decay": (torch.optim.Adagrad, dict(lr_decay=1e-6), dict(sum=0.0)),  # step 1e6: lr / 2, then ~constant
}


def run_frozen(case, lr, lam=1.0, steps=3000):
    """A preconditioned optimizer on lam/2 theta^2 with its preconditioner frozen: gradients (1e-12) far below
    eps = 1, so the preconditioner is the constant eps (Adamax: its running max, 1). Returns |theta_T| /
    |theta_0|."""
    cls, kwargs, state = FROZEN[case]
    theta = torch.nn.Parameter(torch.full((1,), 1e-12, dtype=torch.float64))
    opt = cls([theta], lr=lr, eps=1.0, **kwargs)
    opt.state[theta] = {"step": torch.tensor(1e6 if case == "adagrad-decay" else 1e8)}
    opt.state[theta] |= {key: torch.full_like(theta, value) for key, value in state.items()}
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * theta**2).sum().backward()
        opt.step()
        if theta.abs().item() > 1e-9:  # grew 1000x while v is still negligible: diverging
            return float("inf")
    return theta.abs().item() / 1e-12


@pytest.mark.parametrize("case", list(FROZEN))
def test_preconditioned_thresholds_are_sharp(case):
    """Real torch optimizers with their preconditioner frozen diverge 1 % above the threshold on lr * lambda / P and
    converge 1 % below it (Adagrad with lr_decay after 1e6 steps: its step is lr / 2 there, the threshold 4)."""
    cls, kwargs, state = FROZEN[case]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = cls([p], **kwargs)
    if case == "adagrad-decay":
        opt.state[p]["step"] = torch.tensor(1e6)
    threshold = stability_threshold(opt, opt.param_groups[0])
    if cls is torch.optim.RMSprop:
        assert threshold == 2 + 2 * kwargs.get("momentum", 0)
    elif cls is torch.optim.Adagrad:
        assert threshold == (4.0 if case == "adagrad-decay" else 2.0)
    else:
        assert threshold == pytest.approx((2 + 2 * kwargs["betas"][0]) / (1 - kwargs["betas"][0]))
    assert run_frozen(case, 0.99 * threshold) < 1e-3
    assert run_frozen(case, 1.01 * threshold) == float("inf")


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.0, 0.999)),
        lambda ps: torch.optim.Adamax(ps, lr=0.1, betas=(0.0, 0.999)),
        lambda ps: torch.optim.RMSprop(ps, lr=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=0.1, centered=True),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    ],
    ids=["adam", "adamax", "rmsprop", "rmsprop-centered", "adagrad"],
)
def test_preconditioner_is_the_scaling_of_the_real_step(make):
    r"""Without momentum a real step is :math:`\Delta p = -\eta P^{-1} g`, with ``P`` computed from the state the
    step leaves: ``preconditioner()**2`` is :math:`-\Delta p / (\eta g)`; ``None`` before the first step."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20, generator=g, dtype=torch.float64))
    optimizer = make([p])
    assert preconditioner(optimizer, [p]) is None
    for _ in range(3):
        grad = torch.randn(20, generator=g, dtype=torch.float64)
        before = p.detach().clone()
        p.grad = grad
        optimizer.step()
        expected = -(p.detach() - before) / (0.1 * grad)
        torch.testing.assert_close(preconditioner(optimizer, [p]) ** 2, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_preconditioner_leaves_out_coordinates_below_eps(eps):
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # not in the optimizer: does not move
    adam = torch.optim.Adam([p], eps=eps)
    assert preconditioner(adam, [p, q]) is None  # before the first step
    rms = torch.tensor([0.0, 0.5 * eps, eps, 2 * eps + 1e-9, 1.0], dtype=torch.float64)  # sqrt(v_hat)
    step = 10
    adam.state[p] = {"step": torch.tensor(float(step)), "exp_avg_sq": rms**2 * (1 - 0.999**step)}
    expected = torch.where(rms > eps, (rms + eps).rsqrt(), torch.zeros(()))
    torch.testing.assert_close(
        preconditioner(adam, [p, q]),
        torch.cat([expected, torch.zeros(2, dtype=torch.float64)]),
        rtol=1e-12,
        atol=0,
    )


def test_adam_on_a_coordinate_without_gradient_history_stays_bounded():
    """Why those coordinates are left out: with v = 0 a frozen preconditioner 1/eps puts lr * h / eps at 2.6e7 times
    the threshold, yet the real Adam, whose v follows the gradient the perturbation causes, stays within lr."""
    lr, h = 1e-3, 1e4
    theta = torch.nn.Parameter(torch.full((1,), 1e-12, dtype=torch.float64))
    adam = torch.optim.Adam([theta], lr=lr)
    largest = 0.0
    for _ in range(3000):
        adam.zero_grad()
        (0.5 * h * theta**2).sum().backward()
        adam.step()
        largest = max(largest, theta.abs().item())
    assert lr * h / 1e-8 / stability_threshold(adam, adam.param_groups[0]) > 1e7
    assert largest < lr
