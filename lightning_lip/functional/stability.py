r"""Stability thresholds of optimizer update maps, as bounds on :math:`\eta\lambda_{max}`.

On a quadratic with Hessian eigenvalue :math:`\lambda`, PyTorch's update rules are linear recurrences; they stay
bounded iff :math:`\eta\lambda` is below (β = momentum, d = dampening):

- SGD: :math:`2`; heavy ball: :math:`(2 + 2\beta)/(1 - d)`; Nesterov: :math:`(2 + 2\beta)/(1 + 2\beta)`;
- diagonally preconditioned methods with their preconditioner :math:`P` frozen, on the preconditioned Hessian
  :math:`P^{-1/2} H P^{-1/2}`: Adam/AdamW (:math:`P = \sqrt{\hat v} + \epsilon`) and Adamax (:math:`P = u`, its
  running max) :math:`(2 + 2\beta_1)/(1 - \beta_1)`, an exponential moving average of the gradient being heavy
  ball with dampening :math:`\beta_1`; RMSprop (:math:`P = \sqrt{v} + \epsilon`, centred: :math:`\sqrt{v -
  \bar g^2} + \epsilon`) :math:`2 + 2\beta`; Adagrad (:math:`P = \sqrt{\sum g^2} + \epsilon`) :math:`2 (1 + t
  \cdot \mathrm{lr\_decay})` after :math:`t` steps, its step size being :math:`\eta / (1 + t \cdot
  \mathrm{lr\_decay})`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

_EMA_MOMENTUM = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax)  # m = beta1 m + (1 - beta1) g
_SECOND_MOMENT = {  # the state entry each preconditioner is computed from
    torch.optim.Adam: "exp_avg_sq",
    torch.optim.AdamW: "exp_avg_sq",
    torch.optim.Adamax: "exp_inf",
    torch.optim.RMSprop: "square_avg",
    torch.optim.Adagrad: "sum",
}
PRECONDITIONED = tuple(_SECOND_MOMENT)


def stability_threshold(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float | None:
    r"""The bound on ``lr * lambda_max`` of ``optimizer``'s param ``group`` (on the preconditioned Hessian for
    :data:`PRECONDITIONED` optimizers); ``None`` for other optimizers, and with ``maximize=True`` (gradient ascent
    is bounded by the smallest eigenvalue, :math:`-\lambda_{min}`, not :math:`\lambda_{max}`)."""
    if group.get("maximize", False):
        return None
    if isinstance(optimizer, _EMA_MOMENTUM):
        beta1 = group["betas"][0]
        return (2 + 2 * beta1) / (1 - beta1)
    if isinstance(optimizer, torch.optim.RMSprop):
        return 2 + 2 * group["momentum"]
    if isinstance(optimizer, torch.optim.Adagrad):
        steps = max((float(optimizer.state[p]["step"]) for p in group["params"] if p in optimizer.state), default=0)
        return 2 * (1 + steps * group["lr_decay"])
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
        if beta == 0:
            return 2.0
        if group.get("nesterov", False):
            return (2 + 2 * beta) / (1 + 2 * beta)
        return (2 + 2 * beta) / (1 - dampening)
    return None


def is_preconditioned(optimizer: torch.optim.Optimizer) -> bool:
    """Whether stability is judged on the preconditioned Hessian (:data:`PRECONDITIONED`: Adam, AdamW, Adamax,
    RMSprop, Adagrad)."""
    return isinstance(optimizer, PRECONDITIONED)


def preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Tensor | None:
    r"""Flat :math:`P^{-1/2}` over ``params`` for a :data:`PRECONDITIONED` optimizer (:math:`P = \sqrt{\hat v} +
    \epsilon` for Adam), or ``None`` before its first step (no second moment yet). Parameters the optimizer does not
    hold get 0 (they do not move), and so do coordinates whose gradient has stayed below the optimizer's
    resolution, :math:`P \le 2\epsilon` (for Adam :math:`\sqrt{\hat v} \le \epsilon`: a bias before a BatchNorm,
    the weights of a dead unit): a perturbation would raise :math:`\hat v` with the gradient it causes, so Adam
    takes sign-like steps of size :math:`\sim\eta` there, bounded, not the linear map of a frozen :math:`P`, whose
    :math:`1/\epsilon` would otherwise swamp :math:`\lambda_{max}` with rounding noise."""
    parts = []
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        if not _has_stepped(optimizer, state):
            return None
        denominator = _denominator(optimizer, state, group)
        seen = denominator > 2 * group["eps"]
        parts.append(torch.where(seen, denominator, torch.inf).rsqrt().reshape(-1))
    return torch.cat(parts)


def _has_stepped(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> bool:
    """Whether ``state`` holds a second moment from at least one step (Adagrad's exists from the start)."""
    key = next(key for cls, key in _SECOND_MOMENT.items() if isinstance(optimizer, cls))
    return key in state and float(state["step"]) > 0


def _initial_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """The state a :data:`PRECONDITIONED` optimizer's first step starts from (torch creates it in that step): zero
    moments, Adagrad's accumulator at ``initial_accumulator_value``."""
    zeros = torch.zeros_like(p)
    moments = dict.fromkeys(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "grad_avg"), zeros)
    return {"step": 0.0, "sum": torch.full_like(p, group.get("initial_accumulator_value", 0.0))} | moments


def _denominator(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], group: dict[str, Any], grad: Tensor | None = None
) -> Tensor:
    r"""The preconditioner :math:`P` of a :data:`PRECONDITIONED` optimizer: the current one, or with ``grad``
    (weight decay included) the one the next step computes."""
    eps = group["eps"]
    if isinstance(optimizer, torch.optim.Adamax):
        u = state["exp_inf"]
        return u if grad is None else torch.maximum(group["betas"][1] * u, grad.abs() + eps)
    if isinstance(optimizer, torch.optim.Adagrad):
        total = state["sum"] if grad is None else state["sum"] + grad * grad
        return total.sqrt() + eps
    if isinstance(optimizer, torch.optim.RMSprop):
        alpha, v, mean = group["alpha"], state["square_avg"], state.get("grad_avg")
        if grad is not None:
            v = alpha * v + (1 - alpha) * grad * grad
            mean = None if mean is None else alpha * mean + (1 - alpha) * grad
        return (v - mean * mean if group["centered"] else v).sqrt() + eps
    beta2, step, v = group["betas"][1], float(state["step"]), state["exp_avg_sq"]
    if grad is not None:
        v, step = beta2 * v + (1 - beta2) * grad * grad, step + 1
    if group.get("amsgrad", False):
        v = torch.maximum(state["max_exp_avg_sq"], v)
    return (v / (1 - beta2**step)).sqrt() + eps


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
    The :data:`PRECONDITIONED` optimizers (Adam, AdamW, Adamax, RMSprop, Adagrad) are affine in ``g`` only with
    their preconditioner frozen: at the value the step computes from ``grad`` (then exact at ``g = grad``,
    linearized around it; before their first step from the zero moments that step starts from), else at its current
    value (``None`` before their first step). ``None`` for ``maximize=True``, for other optimizers and for parameters
    the optimizer does not hold.

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
    if not isinstance(optimizer, (torch.optim.SGD, *PRECONDITIONED)):
        return None  # no step map known (nor, maybe, a number for the rate: Adafactor's relative step has none)
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
    if not _has_stepped(optimizer, state):
        if grad is None:  # no preconditioner yet, and none to compute for the first step
            return None
        state = state or _initial_state(p, group)
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    coupled_wd = 0.0 if decoupled else wd
    grad = None if grad is None else grad + coupled_wd * p
    denominator = _denominator(optimizer, state, group, grad)
    if isinstance(optimizer, torch.optim.RMSprop):  # p -= lr * (momentum * buf + g / P)
        buf = state.get("momentum_buffer")
        carried = 0.0 if group["momentum"] == 0 or buf is None else group["momentum"] * buf
        return LinearStep(-lr * (carried + coupled_wd * p / denominator), -lr / denominator)
    if isinstance(optimizer, torch.optim.Adagrad):  # p -= lr / (1 + t lr_decay) * g / P
        rate = lr / (1 + float(state["step"]) * group["lr_decay"])
        return LinearStep(-rate * coupled_wd * p / denominator, -rate / denominator)
    beta1 = group["betas"][0]  # p -= lr / (1 - beta1^t) * (beta1 m + (1 - beta1) g) / P
    scale = lr / (1 - beta1 ** (float(state["step"]) + 1)) / denominator
    offset = -scale * (beta1 * state["exp_avg"] + (1 - beta1) * coupled_wd * p)
    if decoupled:
        offset = offset - lr * wd * p
    return LinearStep(offset, -scale * (1 - beta1))
