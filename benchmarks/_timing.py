"""Side-by-side step timing helpers for the benchmarks: medians over interleaved repeats."""

from __future__ import annotations

import statistics
import time

from lightning.pytorch import Callback


class StepTimer(Callback):
    """Wall time of every training batch, optimizer step and callbacks included (seconds)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def median_step(times: list[float], warmup: int = 3) -> float:
    return statistics.median(times[warmup:])
