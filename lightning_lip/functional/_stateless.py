"""A module's loss as a pure function of its parameters, for the ``torch.func`` transforms of this package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]


def trainable_parameters(module: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` of the parameters that require grad, detached."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def stateless_loss(module: nn.Module, loss_fn: LossFn) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """``loss(params, batch)``: ``loss_fn(module, batch)`` with ``module``'s parameters named in ``params`` swapped.

    Parameters not in ``params`` keep their values. Buffers are passed as fresh copies on every call, so that a
    train-mode BatchNorm cannot update the module's running statistics.
    """
    call = _LossCall(module, loss_fn)
    buffers = {f"module.{name}": b.detach() for name, b in module.named_buffers()}

    def loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        state = {f"module.{n}": p for n, p in params.items()} | {k: b.clone() for k, b in buffers.items()}
        return torch.func.functional_call(call, state, (batch,))

    return loss


class _LossCall(nn.Module):
    """``forward(batch) = loss_fn(module, batch)``, so that ``functional_call`` can swap ``module``'s tensors."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)
