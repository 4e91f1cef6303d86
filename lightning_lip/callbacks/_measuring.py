"""Evaluating the model's loss on a batch from inside a callback: the loss, the step's batch, the module's state around
the measurement, and what to do when the loss cannot be differentiated."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, MutableMapping, MutableSequence, MutableSet
from contextlib import ExitStack, contextmanager
from types import MethodType
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torchmetrics import Metric

from lightning_lip.callbacks._logging import WarnOnce
from lightning_lip.functional._stateless import LossFn
from lightning_lip.functional.batch import batch_tree, leading_sizes

T = TypeVar("T")


class Differentiation:
    """How :class:`GradientNoiseEstimator` differentiates the model's loss per sample: with ``torch.func`` (``vmap``)
    until its transforms refuse the model (activation checkpointing's saved-tensor hooks, an ``autograd.Function``
    without ``setup_context``, ``.item()`` in ``training_step``, ...), from then on with plain ``torch.autograd``, a
    loop over the samples (warned once: slower), and not at all once that fails too (:attr:`failure`, the reasons,
    warned once): whatever the user's loss raises on batches of one or under ``vmap`` (an assertion on the batch
    size, a metric that needs two classes) stops the measurements, not training. Out-of-memory errors are raised
    again.

    Args:
        owner: the callback's name, for the warnings.
        warn: the callback's one-time warnings.
        generator: the callback's generator, set back to its state before a failed attempt for the retry, so that
            a measurement draws the same numbers whichever attempt succeeds.
        consequence: what the callback does once neither works, for the warning.
    """

    def __init__(self, owner: str, warn: WarnOnce, generator: torch.Generator, consequence: str) -> None:
        self.autograd = False
        self.failure: str | None = None
        self._owner, self._warn, self._generator, self._consequence = owner, warn, generator, consequence

    def __call__(self, attempt: Callable[[bool], T], pl_module: pl.LightningModule) -> T | None:
        """``attempt(autograd)``, retried with ``autograd=True`` where ``torch.func`` fails; ``None`` on failure."""
        state = self._generator.get_state()
        try:
            return attempt(self.autograd)
        except Exception as error:  # the user's loss, run on sub-batches, batches of one, under vmap
            if self.autograd:
                reason = first_line(error)
                self.failure = differentiation_failure(reason, self._owner, self._warn, self._consequence, pl_module)
                return None
            func_reason = first_line(error)
        self._generator.set_state(state)
        try:
            result = attempt(True)
        except Exception as error:
            reason = f"torch.func: {func_reason}; torch.autograd: {first_line(error)}"
            self.failure = differentiation_failure(reason, self._owner, self._warn, self._consequence, pl_module)
            return None
        self.autograd = True
        self._warn(
            "autograd",
            f"{self._owner}: torch.func cannot transform this model's loss ({func_reason}); per-sample "
            "gradients are taken with plain torch.autograd instead, a Python loop over the samples (slower).",
        )
        return result


def differentiation_failure(
    reason: str, owner: str, warn: WarnOnce, consequence: str, pl_module: pl.LightningModule
) -> str:
    """``reason``, warned once with ``consequence`` and the remedy: why the model's loss could not be
    differentiated."""
    hint = (
        ""
        if callable(getattr(pl_module, "lip_loss", None))
        else " If `training_step` is the obstacle (returning `None`, say), define `lip_loss(self, batch)` on the "
        "LightningModule, the mean loss of `batch`, for the callbacks to evaluate instead."
    )
    warn("transform", f"{owner} cannot differentiate this model's loss ({reason}); {consequence}{hint}")
    return reason


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message, after its type unless a ``RuntimeError`` (torch's errors, and what
    ``torch.func`` raises on what it cannot transform); out-of-memory errors are raised again."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        raise error
    line = next(iter(str(error).strip().splitlines()), "")
    if isinstance(error, RuntimeError) and line:
        return line
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def sample_count(batch: Any, owner: str, warn: WarnOnce, consequence: str) -> int | None:
    """The number of samples in ``batch``; ``None`` where no tensor in it has a leading batch dimension that the
    callbacks can reach (a graph library's batch keeps its tensors in private storage), warned once with
    ``consequence``."""
    sizes = leading_sizes(batch)
    if sizes:
        return sizes[0]
    warn(
        "samples",
        f"{owner} cannot find the samples of a {type(batch).__name__} batch: it holds no tensor with a leading batch "
        f"dimension in tuples, lists, mappings, dataclasses or public attributes; {consequence}",
    )
    return None


MEASUREMENT_BATCH_IDX = -1
"""The ``batch_idx`` the callbacks pass to ``training_step`` when they evaluate its loss: no batch of an epoch has
it, so the blocks a step runs on some batches only (``if batch_idx == 0:`` log the first batch's images) do not run
in the measurements, and a step can tell them apart (``batch_idx < 0``)."""


def module_loss(pl_module: pl.LightningModule) -> LossFn:
    """``loss(module, batch)``: ``module.lip_loss(batch)`` if the module defines it, else the loss (or ``"loss"``
    entry) that ``training_step(batch, MEASUREMENT_BATCH_IDX)`` returns (``training_step(batch)`` if it takes no
    ``batch_idx``, as Lightning allows). Each evaluation gets its own copy of ``batch`` (:func:`detached`): a step
    that changes its batch in place (``x /= 255``) changes neither the user's batch nor the next evaluation's."""
    if callable(getattr(pl_module, "lip_loss", None)):
        return lambda module, batch: module.lip_loss(detached(batch))
    takes_index = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
    index = (MEASUREMENT_BATCH_IDX,) if takes_index else ()

    def loss(module: pl.LightningModule, batch: Any) -> Tensor:
        out = module.training_step(detached(batch), *index)
        out = out["loss"] if isinstance(out, dict) else out
        if not isinstance(out, Tensor):
            raise RuntimeError(f"`training_step` returned {type(out).__name__}, not a loss tensor")
        return out

    return loss


class StepBatch:
    """The batch of a training step as the step received it, for the callbacks that evaluate its loss after the step.

    A ``training_step`` that changes its batch's tensors in place (``x /= 255``, ``y -= 1``) leaves them changed, and
    their loss is not the step's any more. The tensors' version counters tell: from the first change seen on, the
    batch of every step is copied (:func:`detached`) before the step; the measurement that saw the change has no
    copy and is skipped.
    """

    def __init__(self, owner: str, warn: WarnOnce) -> None:
        self.owner, self._warn = owner, warn
        self.copying = False
        self.batch: Any = None
        self._versions: list[int] | None = None  # of the batch's tensors at the start of the step; None for a copy

    def start(self, batch: Any) -> None:
        """At ``on_train_batch_start``: hold ``batch``, or a copy of it."""
        self.batch = detached(batch) if self.copying else batch
        self._versions = None if self.copying else _versions(batch)

    def changed(self, strategy: Strategy) -> bool:
        """Whether the held batch's tensors were changed in place since :meth:`start`, on any rank (the same answer on
        every rank: the measurement skipped holds collectives); if so, warn once, and copy the later batches."""
        changed = self._versions is not None and _versions(self.batch) != self._versions
        changed = bool(strategy.reduce_boolean_decision(changed, all=False))
        if changed:
            self.copying = True
            self._warn(
                "in_place",
                f"{self.owner}: the batch's tensors changed in place during the step (as `x /= 255` in "
                "`training_step` changes them), so their loss is not the step's any more. This measurement is "
                "skipped, and from now on each batch is copied before its step; change the batch out of place "
                "(`x = x / 255`) to save the copies.",
            )
        return changed


def _versions(batch: Any) -> list[int]:
    """The version counters of ``batch``'s tensors, which in-place operations advance (inference tensors have none:
    they cannot be changed outside inference mode)."""
    leaves = tree_leaves(batch_tree(batch)[0])
    return [t._version for t in leaves if isinstance(t, Tensor) and not t.is_inference()]


_measuring = 0  # measurement_mode contexts open (nested or not): the callbacks' own forward passes are running


def measuring() -> bool:
    """Whether the callbacks' own forward passes are running (inside :func:`measurement_mode`)."""
    return _measuring > 0


@contextmanager
def measurement_mode(pl_module: pl.LightningModule, batch_norm_train: bool = False) -> Iterator[None]:
    """Eval mode (dropout off, BatchNorm on running statistics unless ``batch_norm_train``), and ``training_step``'s
    side effects undone; every module's ``training`` flag is restored afterwards.

    Muted: ``log``/``log_dict``, and the ``forward``/``update`` of every torchmetrics ``Metric`` (they return
    ``None``), whose state would take in tensors from inside the measurements (``torch.func`` transforms, graphs
    being differentiated). Restored: the LightningModule's own public attributes, rebound or changed in place (a
    list, dict or set, such as Lightning's ``self.training_step_outputs.append(loss)``). With ``batch_norm_train`` a
    ``SyncBatchNorm`` takes its rank's own batch statistics: it synchronizes them in an ``autograd.Function`` with
    collectives inside, which the measurements do not differentiate through. Embeddings with ``sparse=True`` give
    dense gradients, the same values in the layout ``torch.func`` and double backward take. Its forward passes are
    not the training step's (:class:`LayerChains` ignores them).
    """
    global _measuring
    modes = {m: m.training for m in pl_module.modules()}
    sparse = [m for m in pl_module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    with ExitStack() as restore:
        changed = (m for m in pl_module.modules() if isinstance(m, (Metric, nn.SyncBatchNorm)))
        for m in [pl_module, *changed, *sparse]:
            restore.enter_context(_restored_attributes(m))
        _measuring += 1
        try:
            for m in sparse:
                m.sparse = False
            pl_module.eval()
            for m in pl_module.modules():
                if batch_norm_train and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                if batch_norm_train and isinstance(m, nn.SyncBatchNorm):
                    m.forward = MethodType(nn.modules.batchnorm._BatchNorm.forward, m)  # type: ignore[method-assign]
                if isinstance(m, Metric):
                    m.forward = m.update = _ignore  # type: ignore[method-assign]
            pl_module.log = pl_module.log_dict = _ignore  # type: ignore[method-assign]
            yield
        finally:
            _measuring -= 1
            for m, training in modes.items():
                m.training = training


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _restored_attributes(obj: object) -> Iterator[None]:
    """Restore ``obj``'s public instance attributes on exit: values rebound, attributes added deleted, and the
    contents of lists, dicts and sets (the same objects, which others may hold) put back."""
    saved = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    contents = {k: copy.copy(v) for k, v in saved.items() if isinstance(v, _CONTAINERS)}
    try:
        yield
    finally:
        attributes = vars(obj)
        for k in [k for k in attributes if not k.startswith("_") and k not in saved]:
            del attributes[k]
        attributes.update(saved)
        for k, old in contents.items():
            container = saved[k]
            container.clear()
            if isinstance(container, MutableMapping):
                container.update(old)
            elif isinstance(container, MutableSet):
                container |= old
            else:
                container.extend(old)


_CONTAINERS = (MutableSequence, MutableMapping, MutableSet)


def detached(batch: Any) -> Any:
    """A copy of ``batch``, in its own containers, with its tensors detached from any graph."""
    tree, rebuild = batch_tree(batch)
    return rebuild(tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, tree))
