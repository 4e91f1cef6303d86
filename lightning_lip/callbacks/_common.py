"""Glue shared by the callbacks: one-time warnings, TensorBoard access, argument checks, measuring the loss."""

from __future__ import annotations

import copy
import math
import weakref
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping, MutableSequence, MutableSet
from contextlib import ExitStack, contextmanager
from functools import partial
from types import MethodType
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torchmetrics import Metric

from lightning_lip.functional._stateless import LossFn, trainable_parameters
from lightning_lip.functional.batch import batch_tree, leading_sizes
from lightning_lip.functional.spectral import Operator, layer_operator, sample_shape

T = TypeVar("T")


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


class WarnOnce:
    """Emits each distinct warning key once per instance (on rank zero)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self._seen:
            self._seen.add(key)
            rank_zero_warn(message, category=UserWarning)


def log_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], **kwargs: Any) -> bool:
    """``pl_module.log_dict(metrics, **kwargs)``, unless there is nothing to log or ``Trainer(barebones=True)``
    disables logging (where each call warns as if the user's own code logged). Returns whether they were logged."""
    if not metrics or trainer.barebones:
        return False
    pl_module.log_dict(metrics, **kwargs)
    return True


def log_on_logger_steps(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> bool:
    """Log per-step ``metrics`` only on the steps the loggers write (``log_every_n_steps``), like Lightning's
    ``LearningRateMonitor``: ``self.log`` costs ~0.5 ms a metric, more than these callbacks' own work on small
    models. Returns whether they were logged."""
    return trainer._logger_connector.should_update_logs and log_metrics(
        trainer, pl_module, metrics, on_step=True, on_epoch=False
    )


def log_for_monitors(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float] | None) -> None:
    """Hand the latest per-step ``metrics`` to what monitors a metric (``ModelCheckpoint``, ``EarlyStopping``,
    ``ReduceLROnPlateau``), which reads ``trainer.callback_metrics`` at the end of validation or of the epoch: call
    this at their start, as :func:`log_on_logger_steps` has not logged epochs shorter than ``log_every_n_steps``. Not
    to the loggers: they have the per-step curves. Every rank holds the same values: ``max`` syncs them exactly."""
    if metrics is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
        kwargs = dict(on_step=False, on_epoch=True, logger=False, reduce_fx="max", sync_dist=True)
        log_metrics(trainer, pl_module, metrics, **kwargs)


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


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` of ``trainer`` on global rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


#: The custom-scalars layout of every area, keyed by the callback class that logs it (regular expressions allowed).
_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "KappaBudgetProjection": {
        "kappa: Lipschitz bound": ["Multiline", ["lip/kappa/(.+/)?(audit_)?bound$"]],
        "kappa: layer norms and budgets": ["Multiline", ["lip/kappa/sigma/.*", "lip/kappa/kappa/.*"]],
    },
    "HessianEigenMonitor": {
        "stability: eta*lambda_max vs threshold": [
            "Multiline",
            ["lip/hessian/eta_lambda_max", "lip/hessian/threshold"],
        ],
        "hessian: extreme eigenvalues": ["Multiline", ["lip/hessian/lambda_max", "lip/hessian/lambda_min"]],
    },
    "GradientNoiseEstimator": {
        "noise: scale and trace": ["Multiline", ["lip/noise/scale", "lip/noise/trace", "lip/noise/grad_norm_sq"]],
        "noise: log Lipschitz drift and std": [
            "Multiline",
            ["lip/noise/log_lipschitz_drift", "lip/noise/log_lipschitz_std", "lip/noise/log_lipschitz_observed"],
        ],
        "noise: z-scores (observed vs predicted)": ["Multiline", ["lip/noise/.*zscore.*"]],
    },
    "CurvatureLRController": {
        "lr: scheduled vs effective": ["Multiline", ["lip/lr/scheduled", "lip/lr/effective"]],
        "lr: throttle and ratio": ["Multiline", ["lip/lr/throttle.*", "lip/lr/ratio", "lip/lr/bound"]],
    },
}


def write_tensorboard_layout(trainer: pl.Trainer) -> None:
    """Write the custom-scalars layout of all lightning_lip callbacks in ``trainer`` (one layout per run: every
    callback writes the same complete one, whichever comes first)."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    present = {type(c).__name__ for c in trainer.callbacks} | {
        base.__name__ for c in trainer.callbacks for base in type(c).__mro__
    }
    charts = {title: chart for name, area in _LAYOUT.items() if name in present for title, chart in area.items()}
    if charts:
        writer.add_custom_scalars({"lightning_lip": charts})


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


class LayerShapes:
    r"""One sample's input and output shapes of convolutions, recorded by forward hooks, and the layers' true
    operators on them.

    A convolution that runs on inputs of several sizes (variable-length sequences, random crops, larger images in
    validation, an image pyramid) is measured on the largest: the elementwise maximum of every shape seen, input and
    output (the output's maximum is that of the largest input, a transposed convolution's largest output padding
    included). With zero padding that norm bounds the norm at every size seen: the operator on a smaller input is a
    compression :math:`P A E` of the one on a larger input (:math:`E` pads the input with zeros at the end,
    :math:`P` keeps the first outputs), so :math:`\|P A E\|_2 \le \|A\|_2`. Other padding modes give no such
    order; :attr:`varied` names the layers whose sizes have varied.
    """

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.varied: set[str] = set()
        self._handles: dict[str, Any] = {}

    def attach(self, layers: dict[str, nn.Module]) -> None:
        """Hook the convolutions not hooked yet; a ``Linear``'s operator needs no shape (and a hook would slow every
        forward)."""
        for name, layer in layers.items():
            if not isinstance(layer, nn.Linear) and name not in self._handles:
                self._handles[name] = layer.register_forward_hook(partial(self._record, name), with_kwargs=True)

    def _record(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> None:
        x = args[0] if args else kwargs["input"]  # `conv(input=x)`
        self.update(name, (sample_shape(module, x), sample_shape(module, output)))

    def update(self, name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        """Take ``(input_shape, output_shape)`` of one sample of layer ``name`` into the elementwise maxima."""
        seen = self.shapes.get(name)
        if seen != shapes:
            if seen is not None:
                self.varied.add(name)
                shapes = tuple(tuple(map(max, old, new)) for old, new in zip(seen, shapes))  # type: ignore[assignment]
            self.shapes[name] = shapes

    def all_reduce(self, layers: dict[str, nn.Module], strategy: Strategy) -> None:
        """Take the maxima over every rank (one collective of a few integers), so that every rank measures each
        convolution on the same shape, the largest any rank has run it on."""
        dims = {name: len(layer.kernel_size) + 1 for name, layer in layers.items() if not isinstance(layer, nn.Linear)}
        if not dims:
            return
        local = [
            d for name, n in dims.items() for d in (sum(self.shapes[name], ()) if name in self.shapes else (0,) * 2 * n)
        ]
        merged = strategy.reduce(torch.tensor(local, device=strategy.root_device), reduce_op="max").tolist()
        for name, n in dims.items():
            part, merged = merged[: 2 * n], merged[2 * n :]
            if any(part):
                self.update(name, (tuple(part[:n]), tuple(part[n:])))

    def input_shape(self, name: str, layer: nn.Module) -> tuple[int, ...] | None:
        """One sample's input shape; ``None`` for a convolution that has not run yet."""
        if name in self.shapes:
            return self.shapes[name][0]
        return (layer.in_features,) if isinstance(layer, nn.Linear) else None

    def output_shape(self, name: str, layer: nn.Module) -> tuple[int, ...] | None:
        """One sample's output shape; ``None`` for a convolution that has not run yet."""
        if name in self.shapes:
            return self.shapes[name][1]
        return (layer.out_features,) if isinstance(layer, nn.Linear) else None

    def operator(self, name: str, layer: nn.Module, weight: Tensor | None = None) -> Operator | None:
        """The layer's true operator (with ``weight`` instead of its own if given); ``None`` before a convolution's
        first forward pass."""
        if name in self.shapes:
            return layer_operator(layer, *self.shapes[name], weight=weight)
        return layer_operator(layer, weight=weight) if isinstance(layer, nn.Linear) else None

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}


class LayerChains:
    """The layers that a training step applies several times in a chain, and the longest chain of each: an
    application whose input autograd's graph leads back to an earlier application's output of the same weight (a
    block in a loop, tied layers in sequence). Forward hooks from :meth:`start` to :meth:`stop`, then removed, so
    that they cost nothing after that step. A network applied to several inputs side by side (two views of a batch,
    a critic on real and generated samples) makes no chain. Not seen: the callbacks' own measurements, compiled
    regions (``torch.compile`` traces no graph walk), and chains through tensors without a graph (no parameter
    upstream requires grad)."""

    def __init__(self) -> None:
        self.longest: dict[str, int] = {}
        self._outputs: dict[str, dict[Any, int]] = {}  # per layer: grad_fn of each application's output -> its depth
        self._handles: list[Any] = []

    def start(self, groups: dict[str, list[nn.Module]]) -> None:
        """Follow the applications of each name's modules (a layer and the layers tied to it) from now on."""
        self.remove()
        self.longest = dict.fromkeys(groups, 0)
        self._outputs = {name: {} for name in groups}
        hooks = [(m, partial(self._record, name)) for name, group in groups.items() for m in group]
        self._handles = [m.register_forward_hook(hook, with_kwargs=True) for m, hook in hooks]

    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if _measuring or torch.compiler.is_compiling() or not isinstance(output, Tensor):
            return
        outputs = self._outputs[name]
        depth = 1 + (_depth_upstream((*args, *kwargs.values()), outputs) if outputs else 0)
        if output.grad_fn is not None:
            outputs[output.grad_fn] = depth
        self.longest[name] = max(self.longest[name], depth)

    @property
    def following(self) -> bool:
        return bool(self._handles)

    def stop(self) -> dict[str, int]:
        """Remove the hooks; return ``{name: k}`` of the layers applied ``k > 1`` times in a chain."""
        self.remove()
        return {name: k for name, k in self.longest.items() if k > 1}

    def remove(self) -> None:
        """Remove the hooks and drop the outputs followed (autograd nodes, which hold the step's activations)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}


def _depth_upstream(args: tuple[Any, ...], outputs: dict[Any, int]) -> int:
    """Depth of the nearest of ``outputs`` (autograd nodes) upstream of the tensors in ``args``, 0 if none is: a
    breadth-first walk of autograd's graph, which stops at the first one found (in a chain, the latest)."""
    frontier = deque(t.grad_fn for t in args if isinstance(t, Tensor) and t.grad_fn is not None)
    seen: set[Any] = set()
    while frontier:
        node = frontier.popleft()
        if node in outputs:
            return outputs[node]
        if node not in seen:
            seen.add(node)
            frontier.extend(upstream for upstream, _ in node.next_functions if upstream is not None)
    return 0


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


def check_loss_source(pl_module: pl.LightningModule, owner: str) -> None:
    """Raise at setup if :func:`module_loss` cannot work: with manual optimization ``training_step`` steps the
    optimizers itself, so the module must define ``lip_loss``."""
    if not pl_module.automatic_optimization and not callable(getattr(pl_module, "lip_loss", None)):
        raise ValueError(
            f"{owner} evaluates the loss of a batch, and with manual optimization `training_step` steps the "
            "optimizers itself: define `lip_loss(self, batch) -> Tensor` (the mean loss of `batch`) on the "
            "LightningModule."
        )


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
