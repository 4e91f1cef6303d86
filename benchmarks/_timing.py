"""Side-by-side step timing helpers for the benchmarks: medians over interleaved repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer


class StepTimer(Callback):
    """Wall time of every training batch, optimizer step and callbacks included (seconds)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


WARMUP_STEPS = 3  # steps left out of a median: the first calls pay one-time costs (allocations, cold starts)


def median_step(times: list[float], warmup: int = WARMUP_STEPS) -> float:
    return statistics.median(times[warmup:])


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary: only the work being measured."""
    return Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def overhead_ratios(
    fit: Callable[[list[Callback]], None], make_callback: Callable[[], Callback], repeats: int
) -> list[float]:
    """``repeats`` interleaved pairs of total step time with ``make_callback()`` over without, minus 1;
    ``fit(callbacks)`` trains once from a fresh model."""

    def total(callbacks: list[Callback]) -> float:
        torch.manual_seed(0)
        timer = StepTimer()
        fit([*callbacks, timer])
        return sum(timer.times)

    ratios = []
    for _ in range(repeats):
        base = total([])
        ratios.append(total([make_callback()]) / base - 1)
    return ratios
