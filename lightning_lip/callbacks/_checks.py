"""Checks of the callbacks' arguments and of the Trainer they join, each raising a ``ValueError`` that names what to
change."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


def check_fraction(name: str, value: float, closed: bool = True) -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1`` (``< 1`` unless ``closed``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and 0 < value and (value <= 1 if closed else value < 1)
    if not ok:
        raise ValueError(f"`{name}` must be a number in (0, 1{']' if closed else ')'}, got {value!r}.")


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_strategy(strategy: Strategy, owner: str) -> None:
    """Raise at setup under a sharded strategy, as Lightning's ``StochasticWeightAveraging`` does: each process
    holds shards of the parameters (``FSDPStrategy``, ``DeepSpeedStrategy``) or distributed tensors
    (``ModelParallelStrategy``), which the callbacks' measurements cannot read whole."""
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{owner} does not support sharded models (`strategy={type(strategy).__name__}`): it measures whole "
            'parameters. Train on one device or with `strategy="ddp"` (or "ddp_spawn", "ddp_fork").'
        )


def check_alone(trainer: pl.Trainer, kind: type[pl.Callback]) -> None:
    """Raise at setup if ``trainer`` holds more than one ``kind`` callback: their registry entries and logged metrics
    would overwrite each other's."""
    count = sum(isinstance(callback, kind) for callback in trainer.callbacks)
    if count > 1:
        raise ValueError(
            f"A Trainer takes one {kind.__name__}, got {count}: their registry entries and logged metrics would "
            "overwrite each other's."
        )


def check_loss_source(pl_module: pl.LightningModule, owner: str) -> None:
    """Raise at setup if :func:`module_loss` cannot work: with manual optimization ``training_step`` steps the
    optimizers itself, so the module must define ``lip_loss``."""
    if not pl_module.automatic_optimization and not callable(getattr(pl_module, "lip_loss", None)):
        raise ValueError(
            f"{owner} evaluates the loss of a batch, and with manual optimization `training_step` steps the "
            "optimizers itself: define `lip_loss(self, batch) -> Tensor` (the mean loss of `batch`) on the "
            "LightningModule."
        )
