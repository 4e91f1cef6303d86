"""What the optimizers step and how: the parameters they hold, a ZeroRedundancyOptimizer's whole view, the
GradScaler, and hooks on their steps that follow a switch of optimizers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

from lightning_lip.functional._stateless import trainable_parameters


def stepped_parameters(pl_module: pl.LightningModule, optimizers: list[torch.optim.Optimizer]) -> dict[str, Tensor]:
    """``{name: parameter}`` (detached) of the trainable parameters that ``optimizers`` step, the variables of their
    updates (a backbone left out of the optimizer does not move, trainable or not); without optimizers, all."""
    params = trainable_parameters(pl_module)
    if not optimizers:
        return params
    held = held_parameters(optimizers, pl_module)
    named = dict(pl_module.named_parameters())
    return {name: p for name, p in params.items() if id(named[name]) in held}


def held_parameters(optimizers: list[torch.optim.Optimizer], module: nn.Module) -> set[int]:
    """Identities of the parameters of ``module`` that ``optimizers`` step, from their current param groups; all of
    them where the optimizers hold none (a strategy whose optimizer steps copies of them)."""
    held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    own = {id(p) for p in module.parameters()}
    return (held & own) or own


def unsharded(optimizer: torch.optim.Optimizer, state: bool = True) -> torch.optim.Optimizer:
    """``optimizer``; for a ``ZeroRedundancyOptimizer``, whose ranks each step their shard of the parameters with a
    local optimizer of the class it wraps, a view of that local optimizer over every param group, from which what
    the class decides (thresholds, preconditioners, step maps) is read. The view holds, where ``state``, the state
    of every rank's shard, gathered (a collective: every rank of its group must call), else its rank's own."""
    if not torch.distributed.is_available():
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer
    local = optimizer.optim
    view = object.__new__(type(local))
    view.__dict__.update(local.__dict__)
    view.param_groups = optimizer.param_groups
    if state:
        view.state = _gathered_state(optimizer)
    return view


def _gathered_state(optimizer: Any) -> dict[Tensor, dict[str, Any]]:
    """The state of every parameter of a ``ZeroRedundancyOptimizer``, gathered from the ranks of its process group
    (through the CPU); tensors of a parameter's shape on its device, scalars (``step``) on the CPU."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    own = {index[id(p)]: tree_map(_on_cpu, dict(state)) for p, state in optimizer.optim.state.items()}
    shards: list[Any] = [None] * optimizer.world_size
    torch.distributed.all_gather_object(shards, own, group=optimizer.process_group)
    return {
        params[i]: tree_map(partial(_on_device_of, params[i]), state) for shard in shards for i, state in shard.items()
    }


def _on_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value


def _on_device_of(param: Tensor, value: Any) -> Any:
    return value.to(param.device) if isinstance(value, Tensor) and value.dim() else value


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` of ``trainer``'s precision plugin (``precision="16-mixed"``), or ``None``. It
    multiplies the loss before ``on_before_backward`` sees it, and skips the optimizer steps whose gradients
    overflow, lowering its scale."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


class StepHooks:
    """A callback's hooks on the steps of the Trainer's optimizers, moved to the optimizers that replace them during
    fit: a callback that switches optimizers (``trainer.strategy.optimizers = [...]`` in ``on_train_epoch_start``,
    Adam to LBFGS, say) would otherwise leave the hooks on an optimizer that no longer steps. Call :meth:`follow` at
    the start of fit and of every training batch."""

    def __init__(self) -> None:
        self.optimizers: tuple[torch.optim.Optimizer, ...] = ()
        self._handles: list[RemovableHandle] = []

    def follow(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        pre: Callable[..., None] | None = None,
        post: Callable[..., None] | None = None,
        post_first: bool = False,
    ) -> bool:
        """Register ``pre`` and ``post`` as step pre- and post-hooks of each of ``optimizers`` (``post`` before the
        post-hooks there already where ``post_first``), unless these are the optimizers hooked already; remove them
        from the others. Returns whether the optimizers changed."""
        if len(optimizers) == len(self.optimizers) and all(map(operator.is_, optimizers, self.optimizers)):
            return False
        self.remove()
        self.optimizers = tuple(optimizers)
        for optimizer in self.optimizers:
            if pre is not None:
                self._handles.append(optimizer.register_step_pre_hook(pre))
            if post is not None:
                handle = optimizer.register_step_post_hook(post)
                if post_first:
                    optimizer._optimizer_step_post_hooks.move_to_end(handle.id, last=False)
                self._handles.append(handle)
        return True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.optimizers = [], ()
