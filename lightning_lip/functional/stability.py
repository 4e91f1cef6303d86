r"""Stability thresholds of optimizer update maps, as bounds on :math:`\eta\lambda_{max}`.

On a quadratic with Hessian eigenvalue :math:`\lambda`, PyTorch's update rules are linear recurrences; they stay
bounded iff :math:`\eta\lambda` is below (β = momentum, d = dampening):

- SGD: :math:`2`; heavy ball: :math:`(2 + 2\beta)/(1 - d)`; Nesterov: :math:`(2 + 2\beta)/(1 + 2\beta)`;
- Adam/AdamW with frozen second moment, on the preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}`,
  :math:`P = \mathrm{diag}(\sqrt{\hat v} + \epsilon)`: :math:`(2 + 2\beta_1)/(1 - \beta_1)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


def stability_threshold(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float | None:
    """The bound on ``lr * lambda_max`` of ``optimizer``'s param ``group``; ``None`` for unknown optimizers."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = group["betas"][0]
        return (2 + 2 * beta1) / (1 - beta1)
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
        if beta == 0:
            return 2.0
        if group.get("nesterov", False):
            return (2 + 2 * beta) / (1 + 2 * beta)
        return (2 + 2 * beta) / (1 - dampening)
    return None


def is_preconditioned(optimizer: torch.optim.Optimizer) -> bool:
    """Whether stability is judged on the preconditioned Hessian (Adam, AdamW)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Tensor | None:
    r"""Flat :math:`P^{-1/2} = (\sqrt{\hat v} + \epsilon)^{-1/2}` over ``params``, or ``None`` before Adam's first
    step (no second moment yet). Parameters the optimizer does not hold get 0 (they do not move), and so do
    coordinates whose gradient has stayed below Adam's resolution, :math:`\sqrt{\hat v} \le \epsilon` (a bias
    before a BatchNorm, the weights of a dead unit): a perturbation would raise :math:`\hat v` with the gradient it
    causes, so Adam takes sign-like steps of size :math:`\sim\eta` there, bounded, not the linear map of a frozen
    :math:`P`, whose :math:`1/\epsilon` would otherwise swamp :math:`\lambda_{max}` with rounding noise."""
    parts = []
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        if "exp_avg_sq" not in state:
            return None
        denominator = _adam_denominator(state, group)
        seen = denominator > 2 * group["eps"]  # sqrt(v_hat) > eps
        parts.append(torch.where(seen, denominator, torch.inf).rsqrt().reshape(-1))
    return torch.cat(parts)


def _adam_denominator(state: dict[str, Any], group: dict[str, Any], grad: Tensor | None = None) -> Tensor:
    r""":math:`\sqrt{\hat v} + \epsilon` from Adam's second moment (the running max with ``amsgrad``): the current
    one, or with ``grad`` (weight decay included) the one the next step computes."""
    beta2, step, v = group["betas"][1], float(state["step"]), state["exp_avg_sq"]
    if grad is not None:
        v, step = beta2 * v + (1 - beta2) * grad * grad, step + 1
    if group.get("amsgrad", False):
        v = torch.maximum(state["max_exp_avg_sq"], v)
    return (v / (1 - beta2**step)).sqrt() + group["eps"]


GradientMap = tuple[Tensor | float, Tensor | float]
r"""``(a, b)``: the affine map :math:`g \mapsto a \odot g + b` of a gradient; ``a``, ``b`` scalars or of its shape."""


def gradient_clipping(grads: Sequence[Tensor], value: float, algorithm: str = "norm") -> list[GradientMap]:
    r"""Gradient clipping as Lightning applies it to an optimizer's gradients (``torch.nn.utils.clip_grad_norm_``,
    ``clip_grad_value_``), as an affine map of each gradient, frozen at ``grads`` (exact there).

    By ``"norm"`` every gradient is scaled by :math:`c = \min(1, \mathrm{value}/(\|g\|_2 + 10^{-6}))`,
    :math:`\|g\|_2` the norm of all of them together: :math:`a = c, b = 0`. By ``"value"`` the coordinates inside
    :math:`[-\mathrm{value}, \mathrm{value}]` pass (:math:`a = 1, b = 0`) and the others are held at the bound
    (:math:`a = 0, b = \pm\mathrm{value}`).

    Args:
        grads: the gradients of every parameter the optimizer steps (``.grad`` after backward, before clipping).
        value: ``gradient_clip_val``, ``> 0``.
        algorithm: ``"norm"`` or ``"value"``.

    Returns:
        One ``(a, b)`` per gradient, in order.
    """
    if algorithm == "value":
        return [((g.abs() <= value).to(g.dtype), g.clamp(-value, value) * (g.abs() > value)) for g in grads]
    if algorithm != "norm":
        raise ValueError(f"`algorithm` must be 'norm' or 'value', got {algorithm!r}.")
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    coefficient = min(1.0, value / (total + 1e-6))
    return [(coefficient, 0.0)] * len(grads)


class LinearStep(NamedTuple):
    r"""The next update of one parameter as an affine function of its gradient: :math:`\Delta p = o + c \odot g`.

    Attributes:
        offset: :math:`o`, the part that does not depend on the gradient (momentum, weight decay); ``p``'s shape.
        gain: :math:`c`, a 0-dim tensor or ``p``'s shape (Adam's per-coordinate step sizes).
    """

    offset: Tensor
    gain: Tensor


def linear_step(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    grad: Tensor | None = None,
    clip: GradientMap = (1.0, 0.0),
) -> LinearStep | None:
    r"""The step ``optimizer.step()`` is about to apply to ``param``, as an affine map of the gradient ``g``.

    Exact for SGD in all its forms (momentum, dampening, Nesterov, weight decay) given the current momentum buffer.
    Adam/AdamW are affine in ``g`` only with the second moment frozen: at the value the step computes from ``grad``
    (then exact at ``g = grad``, linearized around it), else at its current value. ``None`` before Adam's first
    step, for ``maximize=True``, for other optimizers and for parameters the optimizer does not hold.

    ``clip`` is what happens to the gradient between backward and the step, :math:`g \mapsto a \odot g + b` (gradient
    clipping, see :func:`gradient_clipping`): the optimizer then steps with :math:`a \odot g + b`, and the returned
    map takes the gradient of backward, ``grad`` too.
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None or group.get("maximize", False):
        return None
    scale, shift = clip
    step = _linear_step(optimizer, param, group, None if grad is None else scale * grad + shift)
    return None if step is None else LinearStep(step.offset + step.gain * shift, step.gain * scale)


def _linear_step(
    optimizer: torch.optim.Optimizer, param: Tensor, group: dict[str, Any], grad: Tensor | None
) -> LinearStep | None:
    """:func:`linear_step` in the gradient the optimizer receives."""
    p = param.detach()
    lr, wd, state = float(group["lr"]), float(group.get("weight_decay", 0.0)), optimizer.state.get(param, {})
    if isinstance(optimizer, torch.optim.SGD):
        beta, damp, buf = group["momentum"], group["dampening"], state.get("momentum_buffer")
        if beta == 0:
            a, carried = 1.0, 0.0
        elif buf is None:  # the first step copies the gradient into the buffer, undampened
            a, carried = (1.0 + beta if group["nesterov"] else 1.0), 0.0
        elif group["nesterov"]:
            a, carried = 1.0 + beta * (1 - damp), beta * beta * buf
        else:
            a, carried = 1.0 - damp, beta * buf
        return LinearStep(-lr * (carried + a * wd * p), torch.tensor(-lr * a, dtype=p.dtype, device=p.device))
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if "exp_avg_sq" not in state:
            return None
        beta1 = group["betas"][0]
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        coupled_wd = 0.0 if decoupled else wd
        grad = None if grad is None else grad + coupled_wd * p
        scale = lr / (1 - beta1 ** (float(state["step"]) + 1)) / _adam_denominator(state, group, grad)
        offset = -scale * (beta1 * state["exp_avg"] + (1 - beta1) * coupled_wd * p)
        if decoupled:
            offset = offset - lr * wd * p
        return LinearStep(offset, -scale * (1 - beta1))
    return None
