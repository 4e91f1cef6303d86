"""State that the callbacks keep across fits, processes and checkpoints: their random generators, the module they
describe, their time budgets, a probe batch per DDP rank."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


class SpawnSafeGenerator(torch.Generator):
    """A CPU ``torch.Generator`` that pickles its state by value: a spawned process (``strategy="ddp_spawn"``) gets
    a plain generator's state tensor through shared memory, which fails on Linux (pytorch/pytorch#146828)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _generator_from_state, (bytes(self.get_state().numpy()),)


def _generator_from_state(state: bytes) -> SpawnSafeGenerator:
    generator = SpawnSafeGenerator()
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


class BoundModule:
    """The LightningModule whose training a callback's state describes. A fit on another module starts from fresh
    state (the state of a different network would not fit it); a fit that continues the same module keeps it.

    Holds the module weakly; a copy pickled into a spawned process (``strategy="ddp_spawn"``) forgets it, so that
    the module copy there counts as another one once a module has been bound."""

    def __init__(self) -> None:
        self._ref: weakref.ref[nn.Module] | None = None
        self._bound = False

    def bind(self, module: nn.Module, start_afresh: Callable[[], None]) -> None:
        """Bind ``module``, calling ``start_afresh`` first if another module was bound before."""
        if self._bound and (self._ref is None or self._ref() is not module):
            start_afresh()
        self._ref, self._bound = weakref.ref(module), True

    def __getstate__(self) -> dict[str, Any]:
        return {"_ref": None, "_bound": self._bound}


class TimeBudget:
    """Keeps a callback's own time within a fraction of the training time it rides on (both in seconds).

    The callback reports each stretch of its own work with :meth:`spend`; :meth:`allows` says whether one more
    measurement, assumed to cost as much as the last one (with its follow-ups), keeps
    ``own <= fraction * (wall - own)``, the overhead a side-by-side timing would show. Wall time runs from
    :meth:`start` to :meth:`stop` and adds up over the fits of one module and over resumed runs through the state
    dict.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.own = 0.0  # seconds spent by the callback
        self.last_cost = 0.0  # seconds of the last measurement and its follow-ups
        self._wall_before = 0.0  # wall seconds of earlier fits and (checkpointed) runs
        self._start: float | None = None

    def start(self, now: float) -> None:
        self._start = now

    def stop(self, now: float) -> None:
        self._wall_before, self._start = self.wall(now), None

    def wall(self, now: float) -> float:
        return self._wall_before + (0.0 if self._start is None else now - self._start)

    def overhead(self, now: float) -> float:
        """Own time over training time so far."""
        train = self.wall(now) - self.own
        return self.own / train if train > 0 else 0.0

    def allows(self, now: float) -> bool:
        return self.own + self.last_cost <= self.fraction * (self.wall(now) - self.own)

    def spend(self, seconds: float, new_measurement: bool = False) -> None:
        """Count ``seconds`` of own work: a new measurement's, or a follow-up of the last one."""
        self.own += seconds
        self.last_cost = seconds if new_measurement else self.last_cost + seconds

    def state_dict(self, now: float) -> dict[str, float]:
        return {"own": self.own, "last_cost": self.last_cost, "wall": self.wall(now)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.own, self.last_cost, self._wall_before = state["own"], state["last_cost"], state["wall"]


def gather_rank_probes(trainer: pl.Trainer, state: dict[str, Any] | None) -> None:
    """Under DDP, add every rank's probe to ``state``, a monitor's state in a checkpoint being saved: each rank
    measures its own share of the probe, and Lightning writes rank 0's callback states only. A collective: Lightning
    saves checkpoints on every rank."""
    if trainer.world_size == 1 or state is None or not torch.distributed.is_initialized():
        return
    leaves = [[leaf.cpu() if isinstance(leaf, Tensor) else leaf for leaf in batch] for batch in state["probe_leaves"]]
    probes: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(probes, (leaves, state["probe_size"]))
    state["rank_probes"] = probes


def select_rank_probe(trainer: pl.Trainer, state: dict[str, Any] | None) -> None:
    """Before ``load_state_dict``: this rank's probe in ``state``, from a checkpoint that :func:`gather_rank_probes`
    saved (rank 0's probe where the saving run had fewer ranks)."""
    probes = None if state is None else state.pop("rank_probes", None)
    if probes and trainer.global_rank < len(probes):
        state["probe_leaves"], state["probe_size"] = probes[trainer.global_rank]
