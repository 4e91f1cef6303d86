r"""
Curvature-aware learning-rate controller
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Throttles the learning rate so that :math:`\eta_{eff}\,L_G` stays under the optimizer's stability threshold, and
gives the learning rate back to the user's schedule as soon as it is safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_lip.callbacks._checks import (
    check_alone,
    check_choice,
    check_fraction,
    check_int,
    check_loss_source,
    check_strategy,
)
from lightning_lip.callbacks._logging import WarnOnce, log_for_monitors, log_on_logger_steps, write_tensorboard_layout
from lightning_lip.callbacks._optimizers import StepHooks, grad_scaler, unsharded
from lightning_lip.callbacks._state import BoundModule, gather_rank_probes, select_rank_probe
from lightning_lip.callbacks.hessian_monitor import HessianEigenMonitor
from lightning_lip.functional.stability import stability_threshold
from lightning_lip.registry import LipRegistry


@dataclass
class ThrottleState:
    r"""What the throttle policy knows about one param group.

    Attributes:
        throttle: current throttle ``s`` in ``[s_min, 1]``.
        bound: the bound the policy keeps the effective ratio :math:`s\,r` under (``margin`` in strict mode, 1 in
            guard mode, moving between them and ``max_ratio`` in adaptive mode).
        n_cuts: cuts so far (the policy lowered ``s``).
        n_recoveries: recovery steps so far (the policy raised ``s``).
        n_emergencies: emergency cuts on a non-finite loss or gradient.
    """

    throttle: float = 1.0
    bound: float = 1.0
    n_cuts: int = 0
    n_recoveries: int = 0
    n_emergencies: int = 0


class CurvatureLRController(Callback):
    r"""Keep :math:`\eta_{eff}\,\lambda_{max}` under the optimizer's stability threshold by throttling the LR.

    Before every optimizer step, for each param group, the ratio :math:`r = \eta_{sched}\lambda_{max}/\tau` of the
    scheduled learning rate times the curvature signal over the group's threshold :math:`\tau` (SGD 2, heavy ball
    :math:`(2+2\beta)/(1-d)`, Nesterov :math:`(2+2\beta)/(1+2\beta)`, Adam/AdamW/Adamax
    :math:`(2+2\beta_1)/(1-\beta_1)` on the preconditioned Hessian; :meth:`threshold`, for the
    :attr:`CONTROLLED_OPTIMIZERS`: RMSprop and Adagrad have thresholds too but are left alone unless a subclass adds
    them) goes to :meth:`throttle`, which returns
    :math:`s\in[s_{min}, 1]`; the step runs with :math:`\eta_{eff} = s\,\eta_{sched}` and the scheduled value is
    restored right after it, so schedulers never see the throttle: chainable ones (StepLR, ExponentialLR) do not
    compound it, closed-form ones (OneCycle, Lambda, Cosine) do not erase it, ReduceLROnPlateau works unchanged.

    Signal (``signal``): ``"hessian"`` reads ``hessian/lambda_max`` from the registry (a
    :class:`HessianEigenMonitor` must be in the Trainer); ``"probe"`` runs its own cheap one, a few warm-started
    Lanczos steps on a fixed probe set every ``probe_every_n_steps`` steps (an internal
    :class:`HessianEigenMonitor`, which publishes ``hessian/*`` itself); ``"auto"`` (default) picks ``"hessian"``
    when a monitor is present, else ``"probe"``. The probe is preferred over the same-batch secant
    :math:`\|\Delta g\|/\|\Delta\theta\|` of AdGD: the secant measures curvature along the last step only (a lower
    bound of :math:`\lambda_{max}`) and, between mini-batches, mixes gradient noise into :math:`\Delta g`. Signals
    older than ``max_age`` steps are ignored; without a signal the throttle holds. Before the first measurement the
    controller measures once itself on the first batch (a cold probe), so that the first steps are guarded too, or
    on the first one where there is something to measure (with Adam & co. the second: the preconditioner needs a step;
    with lazy modules the one after their first forward pass).
    Under DDP the signal is reduced with max, so every rank sets the same learning rate.

    Default policy: the throttle keeps :math:`s\,r` under a bound (:attr:`ThrottleState.bound`). Above it: fast cut
    straight to it; below ``hysteresis`` times it: slow multiplicative recovery by ``recovery`` per step, never past
    it. ``mode="strict"`` holds the bound at ``margin`` (< 1); ``mode="guard"`` at 1: it only acts above the
    threshold. ``mode="adaptive"`` (default) lets the evidence of the loss decide how close to the edge of
    stability training may run: the bound starts at ``margin``, grows by ``bound_growth`` per step while the loss is
    calm, up to ``max_ratio`` (above the linear threshold: mini-batch SGD trains best at the edge of stability,
    with :math:`\eta\lambda_{max}` near 3 on digits), and halves (not below ``margin``) on a loss spike, a step
    loss above ``spike_factor`` times the moving average of the previous ones, cutting that very step's learning
    rate if it is over the new bound. The loss is read every step, so a blow-up is caught one step after it starts,
    where :math:`\lambda_{max}` is measured every few; spikes need a positive loss (cross-entropy, MSE), and with a
    negative one the bound stays at ``margin``. A non-finite loss (any rank, any accumulated micro-batch)
    multiplies ``s`` by ``emergency_factor``; with ``skip_nonfinite=True`` the gradients are checked too (one fused
    pass over them) and the step's update is dropped (gradients set to ``None``), except under a GradScaler
    (``precision="16-mixed"``), which skips the steps whose gradients overflow by itself. Under DDP the step loss
    is the mean over ranks. The loss is read once a step (LBFGS: its first closure evaluation), without a
    GradScaler's scale, and acted on for that very step whether ``on_before_optimizer_step`` runs inside
    ``optimizer.step`` or before it (a GradScaler's order).

    Logged: ``lip/lr/effective``, ``scheduled``, ``throttle``, ``ratio`` (:math:`s\,r`, effective), ``bound``,
    ``threshold``, ``signal`` (with several param groups, for the least stable one, plus
    ``lip/lr/throttle/group_<i>``), and the event counters ``n_cuts``, ``n_recoveries``, ``n_emergencies``,
    ``n_spikes``, on the loggers' steps. Registry:
    ``lr/throttle``, ``lr/effective`` (lists per param group).

    Args:
        mode: ``"adaptive"``, ``"strict"`` or ``"guard"``.
        margin: bound on :math:`s\,r` in strict mode and the adaptive bound's floor, in ``(0, 1)``. The default 0.5
            leaves room for mini-batch Hessians sharper than the probe's and for curvature growing between
            measurements (measured in ``benchmarks/stability.py``: 0.9 let digits training collapse where 0.5 did
            not).
        max_ratio: the adaptive bound's ceiling, ``>= 1``.
        bound_growth: the adaptive bound's growth per calm step, ``>= 1``.
        spike_factor: a step loss above this many times the moving average of the previous ones is a spike,
            ``> 1``.
        s_min: smallest throttle, in ``(0, 1]``.
        recovery: multiplicative recovery per step, ``>= 1``.
        hysteresis: recover only while :math:`s\,r` is below this fraction of the bound, in ``(0, 1]``.
        emergency_factor: throttle multiplier on a non-finite loss or gradient, in ``(0, 1]``.
        skip_nonfinite: drop the update of a step with a non-finite loss or gradient.
        signal: ``"auto"``, ``"hessian"`` or ``"probe"``.
        max_age: ignore signals older than this many steps, ``>= 0``.
        probe_every_n_steps, probe_iterations, probe_samples: cadence, Lanczos steps (HVPs) and probe-set size of
            the own probe.

    Raises:
        ValueError: if an argument is out of range, or at setup if ``signal="hessian"`` and no
            :class:`HessianEigenMonitor` is among the Trainer's callbacks, if the module optimizes manually
            without ``lip_loss`` (the controller's own measurements evaluate the loss), or if the Trainer holds
            another ``CurvatureLRController``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HessianEigenMonitor(every_n_steps=20), CurvatureLRController()])
    """

    MODES = ("adaptive", "strict", "guard")
    SIGNALS = ("auto", "hessian", "probe")
    LOSS_EMA_DECAY = 0.9  # of the moving average spikes are judged against (a memory of ~10 steps)
    SPIKE_BACKOFF = 0.5  # the adaptive bound's factor on a spike
    # Throttled by default. RMSprop and Adagrad have thresholds too (HessianEigenMonitor reports their ratio), but
    # early in training their preconditioner is far from settled and they exceed the frozen-P threshold harmlessly:
    # on the digits CNN the throttle cost 1-2 accuracy points at good learning rates and protected nothing at 10x.
    CONTROLLED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
    )

    def __init__(
        self,
        mode: str = "adaptive",
        margin: float = 0.5,
        max_ratio: float = 3.0,
        bound_growth: float = 1.03,
        spike_factor: float = 1.5,
        s_min: float = 0.01,
        recovery: float = 1.05,
        hysteresis: float = 0.8,
        emergency_factor: float = 0.5,
        skip_nonfinite: bool = False,
        signal: str = "auto",
        max_age: int = 500,
        probe_every_n_steps: int = 50,
        probe_iterations: int = 5,
        probe_samples: int = 64,
    ) -> None:
        check_choice("mode", mode, self.MODES)
        check_fraction("margin", margin, closed=False)
        check_fraction("s_min", s_min)
        for name, value in (("max_ratio", max_ratio), ("bound_growth", bound_growth), ("recovery", recovery)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
                raise ValueError(f"`{name}` must be a finite number >= 1, got {value!r}.")
        if not (isinstance(spike_factor, (int, float)) and math.isfinite(spike_factor) and spike_factor > 1):
            raise ValueError(f"`spike_factor` must be a finite number > 1, got {spike_factor!r}.")
        check_fraction("hysteresis", hysteresis)
        check_fraction("emergency_factor", emergency_factor)
        check_choice("signal", signal, self.SIGNALS)
        check_int("max_age", max_age, 0)
        check_int("probe_every_n_steps", probe_every_n_steps, 1)
        check_int("probe_iterations", probe_iterations, 2)
        check_int("probe_samples", probe_samples, 1)
        self.mode = mode
        self.margin = margin
        self.max_ratio = max_ratio
        self.bound_growth = bound_growth
        self.spike_factor = spike_factor
        self.s_min = s_min
        self.recovery = recovery
        self.hysteresis = hysteresis
        self.emergency_factor = emergency_factor
        self.skip_nonfinite = skip_nonfinite
        self.signal = signal
        self.max_age = max_age
        self.probe_every_n_steps = probe_every_n_steps
        self.probe_iterations = probe_iterations
        self.probe_samples = probe_samples

        self._step_hooks = StepHooks()
        self._module = BoundModule()
        self._start_afresh()

    def _start_afresh(self) -> None:
        """The state of a new training run."""
        self.states: list[ThrottleState] = []
        self._probe: HessianEigenMonitor | None = None
        self._bootstrapped = False
        self._controls = False  # whether the threshold of any param group is known: else measuring is pointless
        self._last_signal: tuple[float, int] | None = None  # restored from a checkpoint
        self._registry: LipRegistry | None = None
        self._scheduled: list[float] | None = None
        self._rows: list[tuple[float, float | None, float | None]] = []  # this step's, to log
        self._last_rows: list[tuple[float, float | None, float | None]] = []  # the last step's, for the monitors
        self._loss_finite = True
        self._step_loss = 0.0  # sum over the step's micro-batches of the (accumulation-normalized) loss
        self._n_losses = 0  # and their number
        self._loss_step: int | None = None  # the global step whose loss was taken last
        self._nonfinite = False  # a non-finite loss or gradient waiting for the step's pre-hook
        self.loss_ema: float | None = None
        self.n_spikes = 0
        self._logged_counts: tuple[dict[str, float], int] | None = None  # the event counters last logged, epoch
        self._warn = WarnOnce()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, margin=self.margin, signal=self.signal)

    @property
    def initial_bound(self) -> float:
        """The bound on :math:`s\\,r` a param group starts with: 1 in guard mode, ``margin`` otherwise."""
        return 1.0 if self.mode == "guard" else self.margin

    def threshold(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float | None:
        """Stability threshold on :math:`\\eta\\lambda_{max}` for ``group`` (an override must return a finite number
        ``> 0``, else the step raises a ``ValueError``); ``None`` (no control) if unknown or ``optimizer`` is not one
        of :attr:`CONTROLLED_OPTIMIZERS`. For a ``ZeroRedundancyOptimizer``, ``optimizer`` is its rank's local
        optimizer, of the class it wraps, over every param group."""
        return stability_threshold(optimizer, group) if isinstance(optimizer, self.CONTROLLED_OPTIMIZERS) else None

    def throttle(self, ratio: float, state: ThrottleState) -> float:
        """The new throttle from the unthrottled ratio :math:`r = \\eta_{sched}\\lambda_{max}/\\tau` (finite, may be
        ``<= 0``) and the group's ``state``; the result is clipped to ``[s_min, 1]``. Override to change the policy.
        """
        bound, s = state.bound, state.throttle
        if ratio * s > bound:
            return bound / ratio  # fast cut to the bound
        if ratio * s < self.hysteresis * bound and s < 1.0:
            return min(1.0, s * self.recovery, bound / ratio if ratio > 0 else 1.0)  # slow recovery
        return s

    def adapt(self, spike: bool, state: ThrottleState) -> float:
        """The group's new bound on :math:`s\\,r` after a step whose loss did or did not ``spike``. Override to change
        the policy; the default moves it in adaptive mode only."""
        if self.mode != "adaptive":
            return state.bound
        if spike:
            return max(self.margin, state.bound * self.SPIKE_BACKOFF)
        return min(self.max_ratio, state.bound * self.bound_growth)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, type(self).__name__)
        check_alone(trainer, CurvatureLRController)
        self._module.bind(pl_module, self._start_afresh)
        check_loss_source(pl_module, type(self).__name__)  # the first measurement is its own (and maybe the probe)
        monitors = [c for c in trainer.callbacks if isinstance(c, HessianEigenMonitor)]
        if self.signal == "hessian" and not monitors:
            raise ValueError(
                "CurvatureLRController(signal='hessian') reads `hessian/lambda_max`: add a HessianEigenMonitor to "
                "the Trainer's callbacks, or use signal='probe' (or 'auto') for the controller's own probe."
            )
        if self.signal == "probe" or (self.signal == "auto" and not monitors):
            self._probe = self._probe or self._make_probe()
            rank_zero_info(
                f"CurvatureLRController: no HessianEigenMonitor in use; its own probe measures lambda_max every "
                f"{self.probe_every_n_steps} steps ({self.probe_iterations} HVPs on {self.probe_samples} samples)."
            )

    def _make_probe(self) -> HessianEigenMonitor:
        return HessianEigenMonitor(
            every_n_steps=self.probe_every_n_steps,
            max_iter=self.probe_iterations,
            tol=1e-2,
            num_samples=self.probe_samples,
            cold_every_n_runs=0,
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_tensorboard_layout(trainer)
        self._registry = registry = LipRegistry.of(trainer)
        self._loss_step = None
        if self._last_signal is not None and "hessian/lambda_max" not in registry:  # resumed: the signal it had
            registry.publish("hessian/lambda_max", *self._last_signal)
        self._follow_optimizer(trainer)

    def _follow_optimizer(self, trainer: Trainer) -> None:
        """Control the Trainer's first optimizer, also one that replaces it during fit, whose param groups take over
        the throttle states in order."""
        pre = partial(self._before_step, trainer)
        if self._step_hooks.follow(trainer.optimizers[:1], pre=pre, post=self._after_step) and trainer.optimizers:
            if len(trainer.optimizers) > 1:
                self._warn("optimizers", "CurvatureLRController controls the first optimizer only.")
            self._match_groups(trainer.optimizers[0])

    def _match_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """One throttle state per param group. A group added during training (as ``BackboneFinetuning`` adds the
        backbone's when it unfreezes it) starts unthrottled; states beyond the groups are kept (a resumed run whose
        groups are added back later)."""
        added = len(optimizer.param_groups) - len(self.states)
        self.states += [ThrottleState(bound=self.initial_bound) for _ in range(added)]
        rule = unsharded(optimizer, state=False)
        self._controls = any(self.threshold(rule, group) is not None for group in optimizer.param_groups)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._follow_optimizer(trainer)
        # No signal before the first measurement: measure once on this batch, so that the first steps are guarded too
        # (on the next batch again if there is nothing to measure yet: lazy modules, Adam before its first step; not
        # where measurements have stopped: no samples found in the batch).
        if self._controls and "hessian/lambda_max" not in LipRegistry.of(trainer) and not self._bootstrapped:
            probe = self._probe or self._make_probe()
            self._bootstrapped = probe.measure(trainer, pl_module, [batch]) is not None or probe.failure is not None
        if self._probe is not None and self._controls:
            self._probe.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _signal(self, trainer: Trainer, registry: LipRegistry, step: int) -> float | None:
        """``lambda_max`` no older than ``max_age`` steps at ``step``, max-reduced over ranks; ``None`` if absent or
        stale."""
        value = registry.get("hessian/lambda_max", max_age=self.max_age, step=step)
        lam = math.nan if value is None else float(value)
        if trainer.world_size > 1:
            lam_t = torch.tensor(lam, dtype=torch.float64, device=trainer.strategy.root_device)
            lam = float(trainer.strategy.reduce(lam_t, reduce_op="max"))
        return lam if math.isfinite(lam) else None

    def _before_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._scheduled is not None:  # an optimizer subclass whose step() calls super().step(): hooks run twice
            return
        if len(self.states) < len(optimizer.param_groups):
            self._match_groups(optimizer)
        if not all(isinstance(group["lr"], (float, int, Tensor)) for group in optimizer.param_groups):
            lrs = [group["lr"] for group in optimizer.param_groups]
            self._warn(
                "lr",
                f"CurvatureLRController: {type(optimizer).__name__}'s learning rates are {lrs}, not numbers (an "
                "optimizer that sets its own step size, as Adafactor with `relative_step`): no control.",
            )
            return
        registry, step = LipRegistry.of(trainer), trainer.global_step
        lam = self._signal(trainer, registry, step)
        self._scheduled = [float(group["lr"]) for group in optimizer.param_groups]
        rows, rule = [], unsharded(optimizer, state=False)
        for group, state, lr in zip(optimizer.param_groups, self.states, self._scheduled):
            threshold = self.threshold(rule, group)
            if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
                raise ValueError(
                    f"{type(self).__name__}.threshold must return None or a finite number > 0, got {threshold!r}."
                )
            if threshold is None:
                self._warn("threshold", _no_control(rule, group))
            elif lam is not None:
                self._update(state, lr * lam / threshold)
            _set_lr(group, lr * state.throttle)
            rows.append((lr, threshold, lam))
        self._rows = rows
        if self._nonfinite:  # seen by `on_before_optimizer_step` before this hook (a GradScaler's order)
            self._emergency(optimizer)
        registry.publish("lr/throttle", [s.throttle for _, s in zip(rows, self.states)], step)
        registry.publish("lr/effective", [r[0] * s.throttle for r, s in zip(rows, self.states)], step)

    def _update(self, state: ThrottleState, ratio: float) -> None:
        new = self.throttle(ratio, state)
        new = min(1.0, max(self.s_min, new)) if math.isfinite(new) else state.throttle
        if new < state.throttle:
            state.n_cuts += 1
        elif new > state.throttle:
            state.n_recoveries += 1
        state.throttle = new

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._scheduled is None:
            return
        for group, lr in zip(optimizer.param_groups, self._scheduled):
            _set_lr(group, lr)
        self._scheduled = None
        self._loss_finite, self._step_loss, self._n_losses = True, 0.0, 0  # closure evaluations after the first

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once a step: LBFGS runs this hook with every evaluation of its closure. It comes after the step pre-hook
        # (the closure runs inside `optimizer.step`), or before it where a GradScaler steps the optimizer after the
        # closure (precision="16-mixed"): then the pre-hook applies what it finds here.
        if optimizer is not trainer.optimizers[0]:  # another optimizer's loss (a GAN's other player): not ours
            self._loss_finite, self._step_loss, self._n_losses = True, 0.0, 0
            return
        if not self.states or self._loss_step == trainer.global_step:
            return
        self._loss_step = trainer.global_step
        # Lightning divides each micro-batch's loss by `accumulate_grad_batches`; a step with fewer micro-batches (a
        # `training_step` that returned None, an epoch's last, incomplete window) would read as a drop, and the next
        # full step as a spike.
        bad, loss = float(not self._loss_finite), self._step_loss * trainer.accumulate_grad_batches
        loss /= max(self._n_losses, 1)
        self._loss_finite, self._step_loss, self._n_losses = True, 0.0, 0
        # Only then are the gradients read; a GradScaler's overflowing gradients are its own to skip (it drops
        # that step's update and lowers its scale), routine, not an emergency.
        groups = optimizer.param_groups if self.skip_nonfinite and grad_scaler(trainer) is None else []
        params = [p for group in groups for p in group["params"] if p.grad is not None]
        if params and not bad:  # the gradients themselves: one fused pass over them (a sparse one's values)
            grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
            bad = float(not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if trainer.world_size > 1:  # one collective: whether any rank saw a non-finite value, and the mean loss
            both = torch.tensor([bad, loss], dtype=torch.float64, device=trainer.strategy.root_device)
            bad, loss = trainer.strategy.reduce(both, reduce_op="sum").tolist()
            loss /= trainer.world_size
        if bad:
            self._nonfinite = True
            if self.skip_nonfinite:
                for p in params:
                    p.grad = None
            if self._scheduled is not None:
                self._emergency(optimizer)
        else:
            self._follow_loss(optimizer, loss)

    def _follow_loss(self, optimizer: torch.optim.Optimizer, loss: float) -> None:
        """Spike detection on this step's (finite) loss: the bounds adapt, and a group over its new bound is cut
        before the update (here if the step's pre-hook has run, else by the pre-hook, to the new bound)."""
        if loss < 0:
            self._warn("negative", "CurvatureLRController: a negative loss has no spikes to detect; bounds hold.")
            return
        spike = self.loss_ema is not None and loss > self.spike_factor * self.loss_ema
        self.n_spikes += spike
        decay = self.LOSS_EMA_DECAY
        self.loss_ema = loss if self.loss_ema is None else decay * self.loss_ema + (1 - decay) * loss
        rows = self._rows if self._scheduled is not None else [None] * len(self.states)
        for group, state, row in zip(optimizer.param_groups, self.states, rows):
            bound = self.adapt(spike, state)
            if not (math.isfinite(bound) and bound > 0):
                continue
            state.bound = bound
            if not (spike and row is not None):
                continue
            lr, threshold, lam = row
            ratio = math.nan if threshold is None or lam is None else lr * lam / threshold
            if ratio * state.throttle > bound:
                state.throttle = max(self.s_min, bound / ratio)
                state.n_cuts += 1
                _set_lr(group, lr * state.throttle)

    def _emergency(self, optimizer: torch.optim.Optimizer) -> None:
        """Cut every group by ``emergency_factor`` for this step, once the step's pre-hook has set its rates."""
        self._warn(
            "nonfinite", "CurvatureLRController: non-finite loss or gradient; emergency cut of the learning rate."
        )
        self._nonfinite = False
        for group, state, lr in zip(optimizer.param_groups, self.states, self._scheduled):
            state.throttle = max(self.s_min, state.throttle * self.emergency_factor)
            state.n_emergencies += 1
            _set_lr(group, lr * state.throttle)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # every micro-batch; `.item()` of the scalar loss is ~20x cheaper than a `torch.isfinite` dispatch
        value = loss.item() if loss.numel() == 1 else float(loss.detach().sum())
        scaler = grad_scaler(trainer)
        if scaler is not None:  # the loss as the module computed it, not times a scale that doubles as it grows
            value /= scaler.get_scale()
        self._loss_finite = self._loss_finite and math.isfinite(value)
        self._step_loss += value
        self._n_losses += 1

    def _metrics(self, rows: list[tuple[float, float | None, float | None]]) -> dict[str, float]:
        """Metrics of the least stable group (per-group throttles too with several groups) from the ``(scheduled lr,
        threshold, signal)`` of each group at the last step."""

        def effective_ratio(i: int) -> float:
            lr, threshold, lam = rows[i]
            return -math.inf if threshold is None or lam is None else lr * self.states[i].throttle * lam / threshold

        worst = max(range(len(rows)), key=effective_ratio)
        lr, threshold, lam = rows[worst]
        state = self.states[worst]
        metrics = {
            "lip/lr/effective": lr * state.throttle,
            "lip/lr/scheduled": lr,
            "lip/lr/throttle": state.throttle,
            "lip/lr/bound": state.bound,
        }
        if threshold is not None:
            metrics["lip/lr/threshold"] = threshold
        if lam is not None and threshold is not None:
            metrics["lip/lr/signal"] = lam
            metrics["lip/lr/ratio"] = effective_ratio(worst)
        if len(rows) > 1:
            metrics |= {f"lip/lr/throttle/group_{i}": s.throttle for i, s in enumerate(self.states[: len(rows)])}
        return metrics

    def _event_counts(self) -> dict[str, float]:
        """The event counters, summed over param groups."""
        return {
            "lip/lr/n_cuts": float(sum(s.n_cuts for s in self.states)),
            "lip/lr/n_recoveries": float(sum(s.n_recoveries for s in self.states)),
            "lip/lr/n_emergencies": float(sum(s.n_emergencies for s in self.states)),
            "lip/lr/n_spikes": float(self.n_spikes),
        }

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is not None and self._controls:
            self._probe.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._rows and trainer._logger_connector.should_update_logs:
            # Lightning repeats a step metric's last value on the loggers' steps until the epoch ends: the counters
            # are only passed to `self.log` (~0.5 ms a scalar) when they change or a new epoch starts.
            metrics, counts = self._metrics(self._rows), (self._event_counts(), trainer.current_epoch)
            if counts != self._logged_counts:
                metrics |= counts[0]
                self._logged_counts = counts
            log_on_logger_steps(trainer, pl_module, metrics)
        self._last_rows = self._rows or self._last_rows
        self._rows = []

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_for_monitors(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_for_monitors(trainer, pl_module)

    def _log_for_monitors(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_rows:
            log_for_monitors(trainer, pl_module, self._metrics(self._last_rows) | self._event_counts())

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_hooks.remove()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._step_hooks.remove()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` after an error or an interrupt. One inside the step (the closure runs
        # between its pre- and post-hook) leaves the throttled rates in the optimizer: the scheduled ones go back
        # before an `OnExceptionCheckpoint` saves it (checkpoint callbacks run last) or the optimizer is used again.
        if self._scheduled is not None and trainer.optimizers:
            self._after_step(trainer.optimizers[0], (), {})
        self.teardown(trainer, pl_module, trainer.state.fn)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Saved inside the step (a SLURM requeue's signal handler saves wherever the step is): the scheduled rates,
        # not this step's throttled ones, which a resumed run would take for scheduled and throttle again.
        if self._scheduled is not None and checkpoint.get("optimizer_states"):
            for group, lr in zip(checkpoint["optimizer_states"][0]["param_groups"], self._scheduled):
                # a tensor rate is the live optimizer's own tensor (`state_dict` copies the groups, not their values)
                group["lr"] = torch.full_like(group["lr"], lr) if isinstance(group["lr"], Tensor) else lr
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if self._probe is not None and state is not None:
            gather_rank_probes(trainer, state["probe"])

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            select_rank_probe(trainer, state["probe"])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "states": [vars(s).copy() for s in self.states],
            "probe": None if self._probe is None else self._probe.state_dict(),
            "bootstrapped": self._bootstrapped,
            "loss_ema": self.loss_ema,
            "n_spikes": self.n_spikes,
            "last_signal": _entry_of(self._registry, "hessian/lambda_max"),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.states = [ThrottleState(**s) for s in state_dict["states"]]
        self._bootstrapped = state_dict["bootstrapped"]
        self.loss_ema, self.n_spikes = state_dict["loss_ema"], state_dict["n_spikes"]
        self._last_signal = state_dict["last_signal"]
        if state_dict["probe"] is not None and self._probe is not None:  # setup() has run: the probe exists
            self._probe.load_state_dict(state_dict["probe"])


def _entry_of(registry: LipRegistry | None, key: str) -> tuple[float, int] | None:
    entry = None if registry is None else registry.entry(key)
    return None if entry is None else (float(entry.value), entry.step)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's learning rate; a tensor one in place, as torch's schedulers do (a compiled or
    graph-captured step reads that tensor)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _no_control(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    """Why the controller leaves ``optimizer`` alone."""
    name = type(optimizer).__name__
    if group.get("maximize", False):
        return f"{name} with maximize=True ascends the loss, stable by lambda_min, not lambda_max: no control."
    if stability_threshold(optimizer, group) is None:
        return f"No stability threshold is known for {name}: no control."
    return (
        f"CurvatureLRController does not throttle {name} by default: its preconditioner is far from settled early in "
        "training, and exceeding the frozen-preconditioner threshold there is harmless (the throttle cost 1-2 "
        "accuracy points on digits and protected nothing). HessianEigenMonitor still reports its stability ratio. "
        "To opt in, add the class to `CONTROLLED_OPTIMIZERS` in a subclass."
    )
