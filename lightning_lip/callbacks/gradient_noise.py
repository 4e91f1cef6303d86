r"""
Gradient noise estimator
^^^^^^^^^^^^^^^^^^^^^^^^

Measures the mini-batch gradient noise from per-sample gradients and predicts how it moves each layer's operator
norm and the network's Lipschitz bound (Luo et al., "Optimization-Induced Dynamics of Lipschitz Continuity").
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from lightning_lip.callbacks._checks import check_alone, check_fraction, check_int, check_loss_source, check_strategy
from lightning_lip.callbacks._layers import LayerShapes
from lightning_lip.callbacks._logging import WarnOnce, log_metrics, write_tensorboard_layout
from lightning_lip.callbacks._measuring import Differentiation, StepBatch, measurement_mode, module_loss, sample_count
from lightning_lip.callbacks._optimizers import StepHooks, held_parameters, stepped_parameters, unsharded
from lightning_lip.callbacks._state import BoundModule, SpawnSafeGenerator, TimeBudget
from lightning_lip.functional.batch import leading_sizes, slice_batch
from lightning_lip.functional.lanczos import warm_start
from lightning_lip.functional.noise import (
    centred,
    log_lipschitz_dynamics,
    noise_statistics,
    operator_sigma_dynamics,
    sigma_dynamics,
)
from lightning_lip.functional.per_sample import per_sample_grads
from lightning_lip.functional.spectral import (
    CONV_TYPES,
    current_weight,
    is_supported,
    lanczos_svd,
    random_start,
    weight_pruning,
)
from lightning_lip.functional.stability import GradientMap, gradient_clipping, linear_step
from lightning_lip.registry import LipRegistry

_STOPPED = "no more noise measurements in this run."
_DYNAMICS_TYPES = (nn.Linear, *CONV_TYPES)  # the layers whose Lipschitz dynamics are predicted


class GradientNoiseEstimator(Callback):
    r"""Gradient-noise statistics and the Lipschitz dynamics they drive, from per-sample gradients.

    Every ``every_n_steps`` optimizer steps (:meth:`should_run`; by default as often as a time budget of
    ``max_overhead`` allows), after backward and before the optimizer step, the callback computes per-sample
    gradients of the current batch (its first ``max_samples`` samples) with ``torch.func.vmap`` in eval mode
    (dropout off, BatchNorm on running statistics; random draws in the loss, such as noise augmentation, are
    independent between samples), without touching ``.grad``, the optimizer or the RNG state. Under DDP the
    per-sample gradients of all ranks are gathered, so the statistics are those of the global batch seen by one
    process. The loss is ``pl_module.lip_loss(batch)`` if defined, else ``training_step(batch, -1)`` (bookkeeping
    muted, on a copy of the batch); it must be a mean over samples (``lip_loss`` is required with manual
    optimization). A ``training_step`` that changes its batch in place (``x /= 255``) costs one measurement, skipped
    with a warning; the batches are copied before their steps from then on. If ``torch.func``
    cannot transform the model (activation checkpointing, an ``autograd.Function`` without ``setup_context``,
    ``.item()`` in ``training_step``) the callback warns once and loops over the samples with plain ``torch.autograd``
    instead; if that fails too, it warns once and stops measuring, with the reasons in :attr:`failure`.

    Noise statistics (over the trainable parameters that the optimizers step): :math:`\mathrm{tr}\,\Sigma`,
    :math:`\|\bar g\|^2` (and its unbiased version), the noise scale :math:`B_{noise}`, the top eigenvalues and
    effective rank of :math:`\Sigma`, and per layer the gradient signal-to-noise ratio
    :math:`\|\bar g_l\|^2/\mathrm{tr}\,\Sigma_{B,l}`.

    Lipschitz dynamics (``nn.Linear`` and ``nn.ConvNd`` layers whose weight is itself a parameter; a parametrized
    one, as by weight normalization, is warned about once and left out): the step is the one the optimizer is about to
    take, written as :math:`\Delta W = o + c \odot g` by :func:`~lightning_lip.functional.stability.linear_step`
    (exact for SGD with momentum/Nesterov/weight decay; Adam, AdamW, Adamax, RMSprop and Adagrad with the
    preconditioner frozen at the value of this step; the Trainer's gradient clipping, which runs after this hook,
    frozen at this step's gradient: the norm's factor, the coordinates held at ``gradient_clip_val``); its noise is
    :math:`c \odot \xi` with :math:`\mathrm{Cov}\,\xi = \Sigma / B_{step}`, :math:`B_{step}` the samples averaged
    by the step (batch size x ranks x accumulated batches), corrected for sampling without replacement from the
    ``N`` training samples, :math:`\times(N-B)/(N-1)` (no noise at all for full-batch steps). Per layer: the drift
    of :math:`\sigma_1` (first order, second order with the operator-norm Hessian, noise curvature) and its
    diffusion; for ``nn.Linear`` from an exact SVD of the weight, for a convolution matrix-free on its true operator
    (top pair by Lanczos warm-started from the singular vectors a ``KappaBudgetProjection`` publishes, else from this
    callback's previous ones). For the network, the drift and standard deviation of :math:`\log\prod_l\sigma_l`.

    At the measured optimizer's next step (the next step, unless several optimizers take turns) the callback predicts
    that step again with the new weights and optimizer state but the previous batch's gradients, and compares with
    the observed change (weights read before any other step post-hook, e.g. a projection). The z-score divides by
    :math:`\sqrt2 s`: the prediction's own mean estimate carries one draw of the noise and the observed step
    another.

    Logged under ``lip/noise/``: ``trace``, ``grad_norm_sq``, ``grad_norm_sq_unbiased``, ``scale``,
    ``effective_rank``, ``eigenvalue_<i>``, ``snr/<layer>``, ``drift/<layer>``, ``diffusion/<layer>``,
    ``log_lipschitz_drift``, ``log_lipschitz_std``, ``log_lipschitz_std_blockdiag``, ``observed/<layer>``,
    ``predicted/<layer>``, ``zscore/<layer>``, ``log_lipschitz_observed``, ``log_lipschitz_predicted``,
    ``log_lipschitz_zscore``, ``n_samples``, ``n_skipped``, ``seconds``, ``overhead`` (own time over training time
    so far). Registry: ``noise/trace``, ``noise/grad_norm_sq``, ``noise/scale``, ``noise/top_eigenvalues``,
    ``noise/drift/<layer>``, ``noise/diffusion/<layer>``, ``noise/log_lipschitz_drift``, ``noise/log_lipschitz_std``.

    Args:
        every_n_steps: measure before every this many-th optimizer step, ``>= 1``. ``None`` (default): as often as
            ``max_overhead`` allows, checked every ``10`` steps from step ``10`` on (rank 0 decides under DDP).
        max_overhead: with ``every_n_steps=None``, the largest fraction of the training time the callback may add,
            in ``(0, 1]``: a measurement is taken only if the callback's time so far plus the last measurement's
            cost (with its next-step prediction) stays within it. One measurement costs tens to hundreds of
            training steps on small models, mostly the convolutions' second-order terms.
        layers: qualified names of the modules to report per layer (an alias too), or of modules without a weight
            whose ``nn.Linear`` and ``nn.ConvNd`` layers are reported (a GAN's ``critic``); default every
            ``nn.Linear`` and ``nn.ConvNd`` (Lipschitz dynamics for those two kinds while their weight is trained, SNR
            for any module with a weight).
        chunk_size: samples per ``vmap`` chunk, bounding peak memory; ``None``: all at once.
        max_samples: at most this many samples of each batch (per rank), ``>= 2``.
        k: number of top eigenvalues of :math:`\Sigma` to report, ``>= 1`` (at most the batch size and the number of
            parameters).
        predict: compare the next step's observed change with its prediction (z-scores).

    Raises:
        ValueError: if an argument is out of range, at setup if the module optimizes manually without
            ``lip_loss`` or the Trainer holds another ``GradientNoiseEstimator``, or at the start of fit if ``layers``
            names a module the model lacks or one with no weight and no such layer inside.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradientNoiseEstimator(every_n_steps=50)])
    """

    BUDGET_CHECK_EVERY_N_STEPS = 10

    def __init__(
        self,
        every_n_steps: int | None = None,
        max_overhead: float = 0.05,
        layers: list[str] | None = None,
        chunk_size: int | None = None,
        max_samples: int = 128,
        k: int = 5,
        predict: bool = True,
    ) -> None:
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        check_fraction("max_overhead", max_overhead)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        check_int("max_samples", max_samples, 2)
        check_int("k", k, 1)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.layers = None if layers is None else list(layers)
        self.chunk_size = chunk_size
        self.max_samples = max_samples
        self.k = k
        self.predict = predict

        self._layers: dict[str, nn.Module] = {}
        self._step_hooks = StepHooks()
        self._registry: LipRegistry | None = None  # the fit's, for singular vectors a projection publishes
        self._module = BoundModule()
        self._start_afresh()

    def _start_afresh(self) -> None:
        """The state of a new training run."""
        self.n_runs = 0
        self.n_skipped = 0
        self._stepped: tuple[int, int] | None = None  # (global step, optimizer) of the last optimizer step seen
        self.last: dict[str, float] = {}
        self._sample: dict[str, tuple[Tensor, Tensor]] | None = None  # (mean, centred) kept for the next prediction
        self._sample_optimizer = 0  # the index of the optimizer whose next step that is
        self._expected: dict[str, Any] | None = None
        self._n_backward = 0  # backward passes since the last optimizer step: the micro-batches of the next one
        self._gradient_scale = 1.0  # the fraction of the mean gradient that step takes
        self._pending: dict[str, float] = {}
        self._shapes = LayerShapes()
        self._vectors: dict[str, Tensor] = {}  # conv layers' top right singular vectors, warm starts
        self._generator = SpawnSafeGenerator().manual_seed(0)  # Lanczos start noise: the global RNG stays untouched
        self._budget = TimeBudget(self.max_overhead)
        self._warn = WarnOnce()
        self._step_batch = StepBatch(type(self).__name__, self._warn)
        self._differentiation = Differentiation(
            type(self).__name__,
            self._warn,
            self._generator,
            consequence=_STOPPED,
        )

    @property
    def failure(self) -> str | None:
        """Why measurements stopped (neither ``torch.func`` nor ``torch.autograd`` can differentiate the model's
        loss, or a batch's samples cannot be found), or ``None``."""
        return self._differentiation.failure

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, layers=self.layers)

    @property
    def overhead(self) -> float:
        """The callback's own time over the training time so far (the ratio a side-by-side timing measures)."""
        return self._budget.overhead(time.perf_counter())

    def should_run(self, step: int) -> bool:
        """Whether to measure before optimizer step ``step`` (1-based); with ``every_n_steps=None`` whether the
        step is a candidate (:attr:`max_overhead` decides)."""
        return step % (self.every_n_steps or self.BUDGET_CHECK_EVERY_N_STEPS) == 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, type(self).__name__)
        check_alone(trainer, GradientNoiseEstimator)
        self._module.bind(pl_module, self._start_afresh)
        check_loss_source(pl_module, type(self).__name__)
        if type(pl_module).configure_gradient_clipping is not LightningModule.configure_gradient_clipping:
            self._warn(
                "clipping",
                f"{type(self).__name__} predicts each step with the Trainer's gradient clipping (`gradient_clip_val`, "
                f"`gradient_clip_algorithm`); {type(pl_module).__name__} overrides `configure_gradient_clipping`, "
                "and what it does differently is not in the prediction.",
            )

    def _attach(self, pl_module: LightningModule) -> None:
        """Find the layers and record their shapes: at the start of fit, after ``configure_model`` (which may create
        them). Frozen layers too: a layer unfrozen later (``BackboneFinetuning``) gets dynamics from then on."""
        self._layers = self._find_layers(pl_module)
        self._warn_computed()
        self._attach_trained()

    def _find_layers(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        """``layers`` resolved: a module with a weight as named, another one as the ``nn.Linear`` and ``nn.ConvNd``
        layers inside it (a GAN's ``critic``); by default those of the whole model."""
        if self.layers is None:
            return _dynamics_layers(pl_module)
        modules = dict(pl_module.named_modules(remove_duplicate=False))  # every name of a module: aliases too
        absent = [n for n in self.layers if n not in modules]
        if absent:
            raise ValueError(f"`layers` names modules the model does not have: {absent}.")
        named = {
            n: {n: modules[n]} if hasattr(modules[n], "weight") else _dynamics_layers(modules[n], f"{n}.")
            for n in self.layers
        }
        empty = [n for n, layers in named.items() if not layers]
        if empty:
            raise ValueError(f"`layers` names modules with no weight and no Linear/ConvNd layer inside: {empty}.")
        return {name: layer for layers in named.values() for name, layer in layers.items()}

    def _attach_trained(self) -> None:
        """Record the shapes of the trained convolutions, as they join, from the measurement that finds them trained
        on (its per-sample forward passes run the hooks); a frozen one has no dynamics, and no hook slows it."""
        self._shapes.attach({n: m for n, m in self._layers.items() if _has_dynamics(m, CONV_TYPES) and _trained(m)})

    def _warn_computed(self) -> None:
        """Warn once about the layers without dynamics (again where more join them: a parametrization registered
        during fit)."""
        computed = [
            n
            for n, m in self._layers.items()
            if isinstance(m, _DYNAMICS_TYPES) and not (_has_dynamics(m) and _stepped_weight(m))
        ]
        if computed:
            self._warn(
                f"computed/{computed}",
                f"{type(self).__name__}: no Lipschitz dynamics for layers whose weight is computed (parametrized, or "
                "recomputed by a hook other than pruning's), as the optimizer steps other tensors, or whose class has "
                f"its own forward (it may pad or standardize first): {', '.join(computed)}. Their gradients count in "
                "the noise statistics and their SNR.",
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(pl_module)
        self._registry = LipRegistry.of(trainer)
        self._stepped = None
        write_tensorboard_layout(trainer)
        self._follow_optimizers(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._budget.start(time.perf_counter())

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._follow_optimizers(trainer)
        self._step_batch.start(batch)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batch = self._step_batch.batch
        if batch is None or self._stepped == (trainer.global_step, id(optimizer)):
            return  # LBFGS runs this hook with every evaluation of its closure: once a step
        self._stepped = (trainer.global_step, id(optimizer))
        self._expected = None  # a prediction still here was for a step never taken (a GradScaler skipped it)
        # the measured optimizer's next step
        follow_up = self._sample is not None and _optimizer_index(trainer, optimizer) == self._sample_optimizer
        due = self.failure is None and self.should_run(trainer.global_step + 1)
        if not (follow_up or due):
            return
        start = time.perf_counter()
        if trainer.world_size > 1:  # every rank's convolutions on the same, largest shapes: the same predictions
            self._shapes.all_reduce(self._layers, trainer.strategy)
        # Lightning divides each micro-batch's loss by `accumulate_grad_batches`; a step of fewer (an epoch's last,
        # short window; a `training_step` that returned None) takes that fraction of the mean gradient.
        micro_batches = min(max(self._n_backward, 1), trainer.accumulate_grad_batches)
        self._gradient_scale = micro_batches / trainer.accumulate_grad_batches
        n = sample_count(batch, type(self).__name__, self._warn, _STOPPED)
        if n is None:
            self._differentiation.failure = f"no samples found in a {type(batch).__name__} batch"
            return
        step_batch = _effective_batch(trainer, n * trainer.world_size, micro_batches)
        if follow_up:
            self._expected = self._predict(trainer, optimizer, self._sample, step_batch, follow_up=True)
            self._sample = None
            self._budget.spend(time.perf_counter() - start)
        if not (due and self._within_budget(trainer)):
            return
        if self._step_batch.changed(trainer.strategy):
            self.n_skipped += 1
            self._pending["lip/noise/n_skipped"] = float(self.n_skipped)
            return
        start = time.perf_counter()
        metrics = self.measure(trainer, pl_module, optimizer, batch, step_batch)
        seconds = time.perf_counter() - start
        self._budget.spend(seconds, new_measurement=True)
        if metrics is not None:
            metrics["lip/noise/seconds"] = seconds
            metrics["lip/noise/overhead"] = self.overhead
            self.last = metrics
        self._pending |= metrics or {"lip/noise/n_skipped": float(self.n_skipped)}

    def _within_budget(self, trainer: Trainer) -> bool:
        """``every_n_steps=None``: whether one more measurement fits in ``max_overhead`` (rank 0's answer)."""
        if self.every_n_steps is not None:
            return True
        return bool(trainer.strategy.broadcast(self._budget.allows(time.perf_counter()), src=0))

    def measure(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        optimizer: torch.optim.Optimizer,
        batch: Any,
        step_batch: float,
    ) -> dict[str, float] | None:
        """Per-sample gradients of ``batch``, noise statistics, and the Lipschitz dynamics of the step about to be
        taken (which averages ``step_batch`` samples); publish and return the metrics, or ``None`` if skipped."""
        params = stepped_parameters(pl_module, trainer.optimizers)
        if not params:
            self._warn("no_params", f"{type(self).__name__}: no trainable parameter to measure; nothing to do.")
            return None
        self._warn_computed()
        self._attach_trained()
        sizes = leading_sizes(batch)
        if len(sizes) > 1:
            self._warn(
                "sizes",
                f"{type(self).__name__}: the batch holds tensors of {sizes[0]} samples and tensors whose leading "
                f"dimension is {', '.join(map(str, sizes[1:]))}; the latter are taken as shared by every sample. Where "
                "they hold samples too (a CombinedLoader of loaders with different batch sizes), their noise is not in "
                "the statistics: give the loaders one batch size.",
            )
        n = min(sizes[0], self.max_samples)
        sub = slice_batch(batch, 0, n)
        grads = self._differentiation(partial(self._per_sample_grads, pl_module, sub, params), pl_module)
        local = None if grads is None else torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
        flat = self._gather(trainer, local)
        if flat is None:
            self.n_skipped += 1
            if local is not None:  # another rank's failed: no rank measures again, so that their collectives match
                self._differentiation.failure = "the measurement failed on another rank"
            return None
        self.n_runs += 1
        stats = noise_statistics(flat, self.k) if flat.shape[0] >= 2 else None
        if stats is None or not (stats.trace.isfinite() and stats.grad_norm_sq.isfinite()):  # NaN reaches both
            self.n_skipped += 1
            reason = "batch size 1: no noise estimate" if stats is None else "non-finite per-sample gradients"
            self._warn(reason, f"{type(self).__name__}: {reason}; the measurement is skipped.")
            return None
        sizes = [p.numel() for p in params.values()]
        mean, omega = centred(flat)
        per_param = dict(zip(params, zip(mean.split(sizes), omega.split(sizes, 1))))
        metrics = {
            "lip/noise/trace": stats.trace.item(),
            "lip/noise/grad_norm_sq": stats.grad_norm_sq.item(),
            "lip/noise/grad_norm_sq_unbiased": stats.grad_norm_sq_unbiased.item(),
            "lip/noise/scale": stats.scale.item(),
            "lip/noise/effective_rank": stats.effective_rank.item(),
            "lip/noise/n_samples": float(flat.shape[0]),
            "lip/noise/n_skipped": float(self.n_skipped),
        }
        metrics |= {f"lip/noise/eigenvalue_{i + 1}": mu.item() for i, mu in enumerate(stats.top_eigenvalues)}
        # a layer's parameters by identity: a layer named by an alias, a parametrization's originals, tied weights
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for layer_name, layer in self._layers.items():
            parts = [per_param[key] for p in layer.parameters() if (key := names[id(p)]) in per_param]
            if parts:
                signal = sum(m.square().sum() for m, _ in parts)
                noise = sum(o.square().sum() for _, o in parts) / ((flat.shape[0] - 1) * flat.shape[0])
                metrics[f"lip/noise/snr/{layer_name}"] = (signal / noise).item()
        weights, seen = {}, set()
        for name, layer in self._layers.items():
            stepped = _stepped_weight(layer) if _has_dynamics(layer) else None
            key = None if stepped is None else names[id(stepped[0])]
            if key in per_param and key not in seen and (isinstance(layer, nn.Linear) or name in self._shapes.shapes):
                seen.add(key)  # a tied weight once
                m, o = per_param[key]
                weights[name] = m.view_as(stepped[0]), o.reshape(-1, *stepped[0].shape)
        registry = LipRegistry.of(trainer)
        step = trainer.global_step
        for key, value in (("trace", stats.trace), ("grad_norm_sq", stats.grad_norm_sq), ("scale", stats.scale)):
            registry.publish(f"noise/{key}", value.item(), step)
        registry.publish("noise/top_eigenvalues", stats.top_eigenvalues, step)
        dynamics = self._predict(trainer, optimizer, weights, step_batch)
        if dynamics is not None:
            for name, (_, drift, diffusion, _) in dynamics["layers"].items():
                metrics[f"lip/noise/drift/{name}"] = drift
                metrics[f"lip/noise/diffusion/{name}"] = diffusion
                registry.publish(f"noise/drift/{name}", drift, step)
                registry.publish(f"noise/diffusion/{name}", diffusion, step)
            metrics["lip/noise/log_lipschitz_drift"] = dynamics["log_drift"]
            metrics["lip/noise/log_lipschitz_std"] = math.sqrt(dynamics["log_variance"])
            metrics["lip/noise/log_lipschitz_std_blockdiag"] = math.sqrt(dynamics["log_variance_blockdiag"])
            registry.publish("noise/log_lipschitz_drift", dynamics["log_drift"], step)
            registry.publish("noise/log_lipschitz_std", metrics["lip/noise/log_lipschitz_std"], step)
        if self.predict:
            self._sample = weights
            self._sample_optimizer = _optimizer_index(trainer, optimizer)
        return metrics

    def _gather(self, trainer: Trainer, flat: Tensor | None) -> Tensor | None:
        """``[B, P]`` per-sample gradients of this rank -> the global batch's (truncated to the smallest rank's);
        ``None`` where a rank has none (its measurement failed): every rank skips alike, and none is left waiting in
        a collective the others do not enter."""
        if trainer.world_size == 1:
            return flat
        rows = torch.tensor(0.0 if flat is None else float(flat.shape[0]), device=trainer.strategy.root_device)
        n = int(trainer.strategy.reduce(rows, reduce_op="min"))
        if flat is None or n == 0:
            return None
        gathered = trainer.strategy.all_gather(flat[:n].contiguous())
        return gathered.reshape(-1, flat.shape[1])

    @torch.no_grad()
    def _predict(
        self,
        trainer: Trainer,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, tuple[Tensor, Tensor]],
        step_batch: float,
        follow_up: bool = False,
    ) -> dict[str, Any] | None:
        """Dynamics of the step ``optimizer`` is about to take, averaging ``step_batch`` samples, given each layer's
        mean weight gradient ``[m, k]`` and centred per-sample weight gradients ``[n, m, k]``; ``follow_up``: one
        step after the last measurement (see :meth:`_top_triplet`). Layers that ``optimizer`` does not hold (another
        optimizer's, with manual optimization) do not move in this step and are left out. The Trainer's gradient
        clipping enters the step as :func:`~lightning_lip.functional.stability.gradient_clipping` linearizes it."""
        optimizer = unsharded(optimizer)  # with the state of every rank's shard
        held = held_parameters([optimizer], trainer.lightning_module)
        clipping = _gradient_clipping(trainer, optimizer)
        per_layer = {}
        for name, (mean, omega) in weights.items():
            layer = self._layers[name]
            stepped = _stepped_weight(layer)
            if stepped is None or id(stepped[0]) not in held:
                continue
            param, mask = stepped
            grad = None if param.grad is None else param.grad.detach()
            step = linear_step(optimizer, param, grad, clipping.get(id(param), (1.0, 0.0)))
            if step is None:
                self._warn("step_map", f"{type(self).__name__}: no linear step map for {type(optimizer).__name__}.")
                return None
            gain = step.gain.double() * self._gradient_scale
            mean_step = step.offset.double() + gain * mean.double()
            noise = gain * omega.double()
            if mask is not None:  # a pruned weight moves by the mask times its parameter's step
                mean_step, noise = mean_step * mask, noise * mask
            weight = current_weight(layer).detach().double()
            if isinstance(layer, nn.Linear):
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                sigma, dyn = s[0], sigma_dynamics(u, s, vh.T, mean_step, noise, step_batch)
            else:
                u, sigma, v = self._top_triplet(name, layer, follow_up)
                # Conjugate gradients to 1e-3 in float32: on a 3x32x32 CNN the second-order terms stay within 5e-5
                # relative of a float64 solve to 1e-12, and the solve is 2.2x faster than to 1e-4 in float64.
                dyn = operator_sigma_dynamics(
                    partial(self._apply, name, layer),
                    weight,
                    u,
                    sigma,
                    v,
                    mean_step,
                    noise,
                    step_batch,
                    max_iter=100,
                    tol=1e-3,
                    curvature_samples=8,
                    solve_dtype=torch.float32,
                )
            per_layer[name] = (sigma.item(), dyn.drift.item(), dyn.diffusion.item(), dyn.projections)
        if not per_layer:
            return None
        columns = list(zip(*per_layer.values()))
        log_drift, log_var, log_var_block = log_lipschitz_dynamics(
            *(torch.tensor(c, dtype=torch.float64) for c in columns[:3]), torch.stack(columns[3]), step_batch
        )
        return {
            "layers": per_layer,
            "log_drift": log_drift.item(),
            "log_variance": log_var.item(),
            "log_variance_blockdiag": log_var_block.item(),
        }

    def _per_sample_grads(
        self, pl_module: LightningModule, batch: Any, params: dict[str, Tensor], autograd: bool
    ) -> dict[str, Tensor]:
        with isolate_rng(), measurement_mode(pl_module):
            return per_sample_grads(pl_module, module_loss(pl_module), batch, params, self.chunk_size, autograd)

    def _apply(self, name: str, layer: nn.Module, weight: Tensor, x: Tensor) -> Tensor:
        """The true operator of ``layer`` with ``weight``, applied to one sample ``x``."""
        return self._shapes.operator(name, layer, weight=weight)(x)

    def _top_triplet(self, name: str, layer: nn.Module, follow_up: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(u, sigma, v)`` of a convolution's true operator in float64, by Lanczos warm-started from this
        callback's previous vector or, the first time, from the one a ``KappaBudgetProjection`` published (own vectors
        first: they are in the checkpoint, so a resumed run starts from the same ones).

        Tolerance 1e-7 on :math:`\sigma^2` (Ritz residual 1e-8): the error of :math:`\sigma` is quadratic in the
        residual, far below one step's change, and the vectors are good enough for the second-order terms (checked
        to O(η³) in the tests); 1e-9 took 1.5-3x more Lanczos steps on a 3x32x32 CNN. A new measurement mixes the
        warm vector with as much noise, so that no warm vector stays locked in an invariant subspace (a circular
        convolution's Fourier blocks) while another one takes the top over the steps since. A ``follow_up`` one step
        later starts from the vector just found with ``1e-3`` of noise (one optimizer step barely moves it) and stops
        at 1e-6 with the residual rule of a warm start (``residual_factor=1``): on a 3x32x32 CNN whose middle layer
        has a tiny :math:`\sigma_1 - \sigma_2` gap, a third of the Lanczos steps, with :math:`\sigma` within 1e-10
        relative of a converged one, against one step's standard deviation of 1e-5."""
        operator = self._shapes.operator(name, layer, weight=current_weight(layer).detach().double())
        warm = self._vectors.get(name)
        if warm is None:
            published = self._registry.get(f"kappa/singular_vectors/{name}")
            warm = None if published is None else published[1]
        start = random_start(
            self._shapes.input_shape(name, layer), torch.zeros((), dtype=torch.float64), self._generator
        )
        if warm is not None and warm.shape == start.shape:
            start = warm_start(warm.double(), start, 1e-3 if follow_up else 1.0)
        tol, factor = (1e-6, 1.0) if follow_up else (1e-7, 0.1)
        triplet = lanczos_svd(operator, start.to(layer.weight.device), max_iter=200, tol=tol, residual_factor=factor)
        self._vectors[name] = triplet.v.detach()
        return triplet.u, triplet.sigma, triplet.v

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._n_backward += 1

    def _follow_optimizers(self, trainer: Trainer) -> None:
        """Observe the steps of the Trainer's optimizers (also of those that replace them during fit) before any other
        post-hook (a projection) changes the weights."""
        self._step_hooks.follow(trainer.optimizers, post=partial(self._on_optimizer_step, trainer), post_first=True)

    def _on_optimizer_step(self, trainer: Trainer, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._n_backward = 0
        if self._expected is None:
            return
        start = time.perf_counter()
        self._observe(self._expected)
        self._expected = None
        self._budget.spend(time.perf_counter() - start)

    def _observe(self, expected: dict[str, Any]) -> None:
        """Queue the observed change of each layer's norm and of the log bound next to the ``expected`` one."""
        observed_log = 0.0
        predicted_log = expected["log_drift"]
        for name, (sigma, drift, diffusion, _) in expected["layers"].items():
            layer = self._layers[name]
            if isinstance(layer, nn.Linear):
                after = torch.linalg.matrix_norm(current_weight(layer).detach().double(), 2).item()
            else:
                after = self._top_triplet(name, layer, follow_up=True)[1].item()
            observed = after - sigma
            observed_log += math.log(after / sigma)
            self._pending[f"lip/noise/observed/{name}"] = observed
            self._pending[f"lip/noise/predicted/{name}"] = drift
            self._pending[f"lip/noise/zscore/{name}"] = _zscore(observed, drift, diffusion)
        self._pending["lip/noise/log_lipschitz_observed"] = observed_log
        self._pending["lip/noise/log_lipschitz_predicted"] = predicted_log
        self._pending["lip/noise/log_lipschitz_zscore"] = _zscore(observed_log, predicted_log, expected["log_variance"])

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_batch.batch = None
        if self._pending:
            log_metrics(trainer, pl_module, self._pending, on_step=True, on_epoch=False)
            self._pending = {}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        if stage == "fit":
            self._budget.stop(time.perf_counter())

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, trainer.state.fn)  # Lightning calls none after an error or interrupt

    def _remove_hooks(self) -> None:
        self._step_hooks.remove()
        self._shapes.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_runs": self.n_runs,
            "n_skipped": self.n_skipped,
            "sample": None if self._sample is None else {k: (m.cpu(), o.cpu()) for k, (m, o) in self._sample.items()},
            "sample_optimizer": self._sample_optimizer,
            "vectors": {name: v.cpu() for name, v in self._vectors.items()},
            "generator": self._generator.get_state(),
            "budget": self._budget.state_dict(time.perf_counter()),
            "shapes": dict(self._shapes.shapes),
            "copy_batches": self._step_batch.copying,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_runs = state_dict["n_runs"]
        self.n_skipped = state_dict["n_skipped"]
        self._sample = state_dict["sample"]
        self._sample_optimizer = state_dict.get("sample_optimizer", 0)  # absent from checkpoints of 0.1
        self._vectors = dict(state_dict["vectors"])
        self._generator.set_state(state_dict["generator"])
        self._budget.load_state_dict(state_dict["budget"])
        self._step_batch.copying = state_dict.get("copy_batches", False)  # absent from checkpoints of 0.1
        for name, shapes in state_dict.get("shapes", {}).items():  # absent from checkpoints of 0.1
            self._shapes.update(name, shapes)


def _stepped_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The parameter the optimizer steps for ``layer.weight`` and the mask the weight is that parameter times:
    ``(weight, None)``; ``(weight_orig, weight_mask)`` for a pruned weight (``torch.nn.utils.prune``, as Lightning's
    ``ModelPruning`` prunes), whose step is the mask times its parameter's; ``None`` where a parametrization or
    another hook computes the weight."""
    if not nn.utils.parametrize.is_parametrized(layer, "weight") and isinstance(layer.weight, nn.Parameter):
        return layer.weight, None
    if weight_pruning(layer) is not None:
        return layer.weight_orig, layer.weight_mask
    return None


def _trained(layer: nn.Module) -> bool:
    """Whether the optimizer moves ``layer.weight``: it requires grad, or so does a tensor it is computed from."""
    stepped = _stepped_weight(layer)
    return stepped[0].requires_grad if stepped is not None else any(p.requires_grad for p in layer.parameters())


def _has_dynamics(layer: nn.Module, kinds: tuple[type, ...] = _DYNAMICS_TYPES) -> bool:
    """Whether ``layer``'s Lipschitz dynamics can be predicted: one of ``kinds`` whose operator is known
    (:func:`~lightning_lip.functional.spectral.is_supported`)."""
    return isinstance(layer, kinds) and is_supported(layer)


def _dynamics_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The ``nn.Linear`` and ``nn.ConvNd`` layers of ``module``, by qualified name after ``prefix``."""
    return {prefix + name: m for name, m in module.named_modules() if isinstance(m, _DYNAMICS_TYPES)}


def _optimizer_index(trainer: Trainer, optimizer: torch.optim.Optimizer) -> int:
    """The index of ``optimizer`` in ``trainer.optimizers`` (``-1`` if absent)."""
    return next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), -1)


def _gradient_clipping(trainer: Trainer, optimizer: torch.optim.Optimizer) -> dict[int, GradientMap]:
    """``{id(param): (a, b)}``: the Trainer's gradient clipping of this step (``gradient_clip_val``, applied after
    ``on_before_optimizer_step``) as an affine map of each gradient; empty without clipping."""
    if not trainer.gradient_clip_val or not trainer.lightning_module.automatic_optimization:
        return {}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    algorithm = "value" if trainer.gradient_clip_algorithm == "value" else "norm"  # Lightning's default: norm
    maps = gradient_clipping([p.grad.detach() for p in params], float(trainer.gradient_clip_val), algorithm)
    return {id(p): m for p, m in zip(params, maps)}


def _effective_batch(trainer: Trainer, global_batch: int, micro_batches: int) -> float:
    """Samples averaged by one step, :math:`B = ` ``global_batch`` x ``micro_batches``, corrected for sampling
    without replacement from the training set when its size ``N`` is known: :math:`B(N-1)/(N-B)`.

    ``N`` is the length of the data set where the loader batches its samples; where it does not
    (``batch_size=None``: each item is a batch already, or a sampler yields the indices of a batch), ``N`` is the
    loader's length in batches times ``global_batch``.
    """
    b = float(global_batch * micro_batches)
    loader = trainer.train_dataloader
    try:
        n = len(loader.dataset) if loader.batch_sampler is not None else len(loader) * global_batch
    except (AttributeError, TypeError):
        return b
    return b * (n - 1) / (n - b) if n > b else math.inf


def _zscore(observed: float, predicted: float, variance: float) -> float:
    """Observed minus predicted over the standard deviation of their difference, :math:`\\sqrt{2}s`."""
    return (observed - predicted) / math.sqrt(2 * variance) if variance > 0 else math.nan
