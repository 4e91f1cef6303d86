r"""Stability thresholds of optimizer update maps, as bounds on :math:`\eta\lambda_{max}`.

On a quadratic with Hessian eigenvalue :math:`\lambda`, PyTorch's update rules are linear recurrences; they stay
bounded iff :math:`\eta\lambda` is below (β = momentum, d = dampening):

- SGD: :math:`2`; heavy ball: :math:`(2 + 2\beta)/(1 - d)`; Nesterov: :math:`(2 + 2\beta)/(1 + 2\beta)`;
- Adam/AdamW with frozen second moment, on the preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}`,
  :math:`P = \mathrm{diag}(\sqrt{\hat v} + \epsilon)`: :math:`(2 + 2\beta_1)/(1 - \beta_1)`.
"""

from __future__ import annotations

from typing import Any

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
    step (no second moment yet). Parameters the optimizer does not hold get 0 (they do not move)."""
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
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        parts.append((v_hat.sqrt() + group["eps"]).rsqrt().reshape(-1))
    return torch.cat(parts)
