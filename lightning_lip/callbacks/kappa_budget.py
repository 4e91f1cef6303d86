r"""
κ-budget projection
^^^^^^^^^^^^^^^^^^^

Caps the operator norm of every linear layer after each optimizer step so that the product of the norms, an
upper bound of the network's Lipschitz constant, stays under ``max_lipschitz``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lip.callbacks._checks import check_choice, check_int, check_positive, check_strategy
from lightning_lip.callbacks._layers import LayerChains, LayerShapes
from lightning_lip.callbacks._logging import (
    WarnOnce,
    log_for_monitors,
    log_on_logger_steps,
    tensorboard_writer,
    write_tensorboard_layout,
)
from lightning_lip.callbacks._optimizers import StepHooks, held_parameters
from lightning_lip.callbacks._state import BoundModule, SpawnSafeGenerator
from lightning_lip.functional.lanczos import warm_start
from lightning_lip.functional.spectral import (
    SUPPORTED_LAYERS,
    Operator,
    SingularTriplet,
    absorb_fixed,
    alternating_power_iteration,
    is_supported,
    lanczos_svd,
    power_iteration,
    projection_scale,
    proportional_budget,
    random_start,
    rescale_weight,
    uniform_budget,
    weight_pruning,
)
from lightning_lip.registry import LipRegistry

log = logging.getLogger(__name__)

_REFINE_NOISE = 1e-3  # relative noise in a refinement's start vector, see KappaBudgetProjection._measure
_END_TOL = 1e-3  # relative change of a layer's norm since the last projection that the end of fit corrects
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)
#: Lipschitz constants above 1 of parameter-free modules (their largest slope; LogSoftmax's at a one-hot output)
_GAINS = {
    nn.GELU: "1.13",
    nn.SiLU: "1.10",
    nn.Mish: "1.09",
    nn.Hardswish: "1.5",
    nn.SELU: "1.76",
    nn.LogSoftmax: "up to the square root of its size",
    nn.Upsample: "up to the square root of the upsampling factor",
}


class KappaBudgetProjection(Callback):
    r"""Project every ``Linear``, ``ConvNd`` and ``ConvTransposeNd`` layer onto its operator-norm budget after each
    optimizer step.

    After every real optimizer step (not on gradient-accumulation micro-batches, not when AMP skipped the step; with
    several optimizers, the steps of those that hold a projected layer's weight, as a GAN's critic's) the callback
    estimates each layer's operator norm :math:`\sigma_l` by one step of power iteration continued from the
    previous step's singular vectors (the operator and its adjoint in turn: each weight is read once), asks
    :meth:`allocate` for budgets :math:`\kappa_l` with :math:`\prod_l \kappa_l \le L_{max}`, and rescales :math:`W_l
    \leftarrow W_l \min(1, \kappa_l/\sigma_l)`. Layers under budget stay bit-identical. For convolutions the norm is
    that of the true operator on the largest input shape the layer has run on (stride, padding, padding mode, dilation
    and groups included; with zero padding it bounds the norm at every smaller size), not that of the reshaped kernel.
    Every ``audit_every_n_steps`` steps, and whenever a layer starts cold, the norm is measured tightly by Lanczos
    instead. Layers that cannot be certified (attention, normalization, embeddings, ...) are listed once in a
    warning: the logged bound assumes them 1-Lipschitz. So are the layers that the first training step applies
    several times in a chain (a block in a loop, tied layers in sequence): the bound counts each once.
    A parametrized weight (weight normalization) is rescaled through its parametrization's ``right_inverse``. Layers
    that cannot be rescaled (frozen, or a parametrization that does not take a rescaled weight, such as
    ``spectral_norm``'s) keep their norm, warned once; the factor by which they exceed their budgets is taken from the
    other layers' budgets (:func:`~lightning_lip.functional.spectral.absorb_fixed`), so the product still meets
    ``max_lipschitz``. A pruned weight (``torch.nn.utils.prune``) is measured as the next forward pass computes it and
    rescaled through ``weight_orig``. At the end of fit (with audits on) every layer is measured tightly once more;
    where a norm moved by more than ``1e-3`` since the last projection (a weight average or pruning changed the
    weights after the last step), the layers are projected once more, so that the model ``fit`` returns keeps the
    bound.

    Logged (``pl_module.log``, per step): ``lip/kappa/bound``, ``lip/kappa/log10_bound``, ``lip/kappa/n_projected``,
    ``lip/kappa/n_skipped``, ``lip/kappa/seconds``, per layer ``lip/kappa/sigma/<layer>`` and
    ``lip/kappa/kappa/<layer>``; at audits ``lip/kappa/audit_bound`` and ``lip/kappa/audit_log10_bound``. With a
    ``TensorBoardLogger`` also the histogram ``lip/kappa/sigma``. Registry keys: see
    :data:`lightning_lip.registry.KEYS`. Several projections, one per sub-network with its own budget, each take
    their ``layers`` (no layer in two, scopes distinct and not the whole model) and insert their :attr:`scope` into
    their network-level keys: ``lip/kappa/critic/bound``, the histogram ``lip/kappa/critic/sigma``, the registry's
    ``kappa/critic/bound``.

    Args:
        max_lipschitz: the budget :math:`L_{max} > 0` on the product of the layer norms.
        policy: budget allocation: ``"proportional"`` (when :math:`\prod\sigma_l > L_{max}` shrink every
            :math:`\log\sigma_l` by the same amount), ``"uniform"`` (:math:`\kappa_l = L_{max}^{1/L}`) or
            ``"fixed"`` (``kappas``).
        kappas: ``{layer name: kappa}`` for ``policy="fixed"``, covering every projected layer, product
            :math:`\le L_{max}`.
        layers: qualified names of the layers to project (any name of a module registered under several, such as a
            ``backbone`` alias), or of modules whose supported layers are all projected (a GAN's ``critic``); the
            bound is then that of :attr:`scope`. Default every supported layer of the model.
        n_power_iterations: power-iteration steps per optimizer step, ``>= 1``, each one product with the layer's
            operator :math:`A` or its adjoint, in turn (two make one iteration on :math:`A^\top A`; see
            :func:`~lightning_lip.functional.spectral.alternating_power_iteration`).
        tol: convergence check of each step's estimate: when the new singular vector and the one it replaces have
            a cosine below :math:`1 - ` ``tol`` (on fixed weights, the relative gap between the last two estimates;
            the step's move of the weights cancels from it to first order), or when :math:`\sigma` moved by more
            than :math:`\sqrt{tol}` relative since the last step, that layer is re-measured by warm-started
            Lanczos. The estimate's remaining error can be the check's value times
            :math:`\rho^2 (1 + \rho) / (1 - \rho)`, :math:`\rho = \sigma_2 / \sigma_1` (15 at 0.9), and more where
            two singular values cross (see the README's limitations; audits restore the estimates).
        audit_every_n_steps: run a tight Lanczos measurement every this many steps, and once at the end of fit;
            ``0`` disables audits.
        audit_tol: relative tolerance of the audit on :math:`\sigma^2` (the audited :math:`\sigma` is within
            about half of it).
        audit_max_iterations: cap on Lanczos steps of an audit.
        log_per_layer: log :math:`\sigma_l` and :math:`\kappa_l` of every layer.

    Raises:
        ValueError: if an argument is out of range, at the start of fit if ``layers`` or ``kappas`` name layers
            that the model does not have or that hold no supported layer, or at the start of training if the Trainer
            holds other projections that share a layer or a :attr:`scope` with this one.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[KappaBudgetProjection(max_lipschitz=10.0)])
    """

    POLICIES = ("proportional", "uniform", "fixed")

    def __init__(
        self,
        max_lipschitz: float,
        policy: str = "proportional",
        kappas: dict[str, float] | None = None,
        layers: list[str] | None = None,
        n_power_iterations: int = 1,
        tol: float = 1e-4,
        audit_every_n_steps: int = 1000,
        audit_tol: float = 1e-5,
        audit_max_iterations: int = 100,
        log_per_layer: bool = True,
    ) -> None:
        check_positive("max_lipschitz", max_lipschitz)
        check_choice("policy", policy, self.POLICIES)
        if (policy == "fixed") != (kappas is not None):
            raise ValueError(f"`kappas` must be given exactly when `policy='fixed'`, got policy={policy!r}.")
        for name, kappa in (kappas or {}).items():
            check_positive(f"kappas[{name!r}]", kappa)
        if kappas is not None and math.prod(kappas.values()) > max_lipschitz * (1 + 1e-9):
            raise ValueError(
                f"The product of `kappas` ({math.prod(kappas.values()):.6g}) exceeds `max_lipschitz` ({max_lipschitz})."
            )
        if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"`layers` must be a non-empty list of module names or None, got {layers!r}.")
        check_int("n_power_iterations", n_power_iterations, 1)
        check_positive("tol", tol)
        check_int("audit_every_n_steps", audit_every_n_steps, 0)
        check_positive("audit_tol", audit_tol)
        check_int("audit_max_iterations", audit_max_iterations, 1)
        self.max_lipschitz = float(max_lipschitz)
        self.policy = policy
        self.kappas = dict(kappas) if kappas is not None else None
        self.layers = list(layers) if layers is not None else None
        self.n_power_iterations = n_power_iterations
        self.tol = tol
        self.audit_every_n_steps = audit_every_n_steps
        self.audit_tol = audit_tol
        self.audit_max_iterations = audit_max_iterations
        self.log_per_layer = log_per_layer

        self._layers: dict[str, nn.Module] = {}
        self._weight_params: dict[str, list[Tensor]] = {}
        self._step_hooks = StepHooks()
        self._chains = LayerChains()
        self._follow_chains = False
        self._module = BoundModule()
        self._qualifier = ""  # of the network-level keys: "<scope>/" beside other projections
        self._start_afresh()

    def _start_afresh(self) -> None:
        """The state of a new training run."""
        self.n_projections = 0
        self._last_step = 0  # the optimizer step of the last projection
        self._shapes = LayerShapes()
        self._vectors: dict[str, Tensor] = {}
        self._left_vectors: dict[str, Tensor] = {}
        self._sigmas: dict[str, float] = {}
        self._current_kappas: dict[str, float] = {}
        self._n_skipped = 0
        self._unscalable: set[str] = set()
        self._warned_fixed: set[str] = set()
        self._generator = SpawnSafeGenerator().manual_seed(0)
        self._pending: dict[str, float] | None = None  # the metrics of the last projection, to log
        self._latest: dict[str, float] | None = None  # and once logged, for the monitors
        self._warn = WarnOnce()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_lipschitz=self.max_lipschitz, policy=self.policy, layers=self.layers)

    def allocate(self, sigmas: dict[str, float]) -> dict[str, float]:
        r"""Budgets :math:`\kappa_l` from the current norms :math:`\sigma_l`; override to change the policy.

        Args:
            sigmas: ``{layer: sigma}`` of every measured layer (finite, ``>= 0``).

        Returns:
            ``{layer: kappa}`` with the same keys, each finite and ``> 0``; :math:`\prod_l\kappa_l \le L_{max}`
            keeps the network bound under ``max_lipschitz``.
        """
        if self.policy == "uniform":
            return uniform_budget(list(sigmas), self.max_lipschitz)
        if self.policy == "fixed":
            return {name: self.kappas[name] for name in sigmas}
        return proportional_budget(sigmas, self.max_lipschitz)

    @property
    def scope(self) -> str:
        """Name of the module whose Lipschitz constant :attr:`bound` certifies: the innermost one that holds every
        module in ``layers`` (``"critic"`` for ``["critic.0", "critic.2"]``); ``""``, the whole model, by default."""
        return ".".join(os.path.commonprefix([name.split(".") for name in self.layers])) if self.layers else ""

    def should_audit(self, step: int) -> bool:
        """Whether the projection after optimizer step ``step`` (1-based) measures the norms tightly by Lanczos: every
        ``audit_every_n_steps`` steps, or at the first projection after such a step where it was not projected
        (another optimizer's)."""
        n = self.audit_every_n_steps
        return n > 0 and step // n > self._last_step // n

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy, type(self).__name__)
            self._module.bind(pl_module, self._start_afresh)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(pl_module)
        self._follow_chains = True
        write_tensorboard_layout(trainer)
        self._follow_optimizers(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A new Trainer continuing the same module without a checkpoint counts its steps from 0 again.
        self._last_step = min(self._last_step, trainer.global_step)
        self._qualifier = self._key_qualifier(trainer)

    def _key_qualifier(self, trainer: Trainer) -> str:
        """``""`` where this is the trainer's only projection; beside others (one per sub-network, each with its own
        budget) ``"<scope>/"``, which qualifies its network-level keys (``lip/kappa/critic/bound``). Raises if the
        projections share a layer or their scopes do not tell them apart."""
        peers = [c for c in trainer.callbacks if isinstance(c, KappaBudgetProjection)]
        if len(peers) < 2:
            return ""
        scopes = [peer.scope for peer in peers]
        if "" in scopes or len(set(scopes)) < len(scopes):
            raise ValueError(
                f"{len(peers)} {type(self).__name__} callbacks need `layers` with distinct scopes (the innermost "
                "module holding a callback's layers, other than the whole model), which qualify their logged metrics "
                f"and registry entries; got scopes {scopes}."
            )
        mine = {_weight_source(layer) for layer in self._layers.values()}
        for peer in (peer for peer in peers if peer is not self):
            shared = [name for name, layer in peer._layers.items() if _weight_source(layer) in mine]
            if shared:
                raise ValueError(
                    f"The `layers` of {type(self).__name__}(scope={self.scope!r}) and of the one with scope "
                    f"{peer.scope!r} share {shared}: each layer takes one budget."
                )
        return f"{self.scope}/"

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._follow_optimizers(trainer)
        if self._follow_chains:  # the first training step of this fit
            self._follow_chains = False
            self._chains.start(self._tied_groups(pl_module))

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._warn_repeated()

    def _tied_groups(self, pl_module: LightningModule) -> dict[str, list[nn.Module]]:
        """``{layer: [modules]}``: each projected layer with the layers tied to it (their weight is the same)."""
        names = {_weight_source(layer): name for name, layer in self._layers.items()}
        groups: dict[str, list[nn.Module]] = {name: [] for name in self._layers}
        for module in pl_module.modules():
            if is_supported(module) and _weight_is_stored(module) and _weight_source(module) in names:
                groups[names[_weight_source(module)]].append(module)
        return groups

    def _warn_repeated(self) -> None:
        """After the first training step's forward passes: warn about the layers they applied several times in a
        chain (see :class:`~lightning_lip.callbacks._layers.LayerChains`)."""
        if not self._chains.following:
            return
        repeated = self._chains.stop()
        if repeated:
            of = f" of {self.scope!r}" if self.scope else ""
            listed = ", ".join(f"{name} ({k}x)" for name, k in repeated.items())
            message = (
                f"{type(self).__name__}: the first training step applied {len(repeated)} layer(s) several times in a "
                f"chain (a block in a loop, tied layers in sequence): {listed}. The logged bound{of} counts each layer "
                "once; a layer applied k times in a chain enters the network's Lipschitz constant as sigma^k: where "
                "such a layer's norm exceeds 1, the logged bound does not hold."
            )
            self._warn("repeated", message)
            log.info(message)

    def _attach(self, pl_module: LightningModule) -> None:
        """Find the layers and record their shapes: at the start of fit, after ``configure_model`` (which may create
        them)."""
        self._layers, excluded = self._find_layers(pl_module)
        if excluded:
            of = f" of {self.scope!r}" if self.scope else ""
            message = (
                f"{type(self).__name__} does not project {len(excluded)} layer(s); the logged Lipschitz bound{of} "
                f"holds only if they are 1-Lipschitz: {', '.join(excluded)}."
            )
            self._warn("excluded", message)
            log.info(message)
        if not self._layers:
            self._warn("no_layers", f"{type(self).__name__} found no Linear/ConvNd/ConvTransposeNd layer: it is inert.")
        self._shapes.attach(self._layers)
        self._weight_params = {name: _weight_parameters(layer) for name, layer in self._layers.items()}

    def _find_layers(self, pl_module: LightningModule) -> tuple[dict[str, nn.Module], list[str]]:
        """Covered layers (tied weights once) and descriptions of those left out."""
        modules = dict(pl_module.named_modules(remove_duplicate=False))  # every name of a module: aliases too
        if self.layers is not None:
            absent = [n for n in self.layers if n not in modules]
            if absent:
                raise ValueError(f"`layers` names modules the model does not have: {absent}.")
            empty = [n for n in self.layers if not any(is_supported(m) for m in modules[n].modules())]
            if empty:
                raise ValueError(
                    f"`layers` names modules with no Linear/ConvNd/ConvTransposeNd layer (unsupported): {empty}."
                )
        named = self.layers if self.layers is not None else (self.kappas or {})
        given = {id(modules[n]): n for n in named if n in modules}  # the user's name of a module, maybe an alias
        chosen = None if self.layers is None else {id(m) for n in self.layers for m in modules[n].modules()}
        scope = modules[self.scope]
        in_scope = {id(m) for m in scope.modules()}
        covered: dict[str, nn.Module] = {}
        excluded: list[str] = []
        weights: set[int] = set()
        for name, module in pl_module.named_modules():
            name = given.get(id(module), name)
            if id(module) not in in_scope or isinstance(module, parametrize.ParametrizationList):
                continue  # outside the certified module; the parameters of a parametrized weight, whose layer counts
            if is_supported(module) and not _weight_is_stored(module):
                excluded.append(
                    f"{name} ({type(module).__name__}: weight recomputed by a hook, as by the deprecated "
                    "torch.nn.utils.weight_norm; torch.nn.utils.parametrizations.weight_norm and torch.nn.utils.prune "
                    "are supported)"
                )
            elif is_supported(module) and (chosen is None or id(module) in chosen):
                if _weight_source(module) not in weights:
                    weights.add(_weight_source(module))
                    covered[name] = module
            elif isinstance(module, SUPPORTED_LAYERS) and not is_supported(module):
                excluded.append(f"{name} ({type(module).__name__}: its own forward, not that of the layer it extends)")
            elif is_supported(module) or any(True for _ in module.parameters(recurse=False)):
                excluded.append(f"{name} ({type(module).__name__})")
            elif isinstance(module, _NORM_LAYERS):
                excluded.append(f"{name} ({type(module).__name__})")
            elif (gain := _gain_above_one(module)) is not None:
                excluded.append(f"{name} ({type(module).__name__}: Lipschitz constant {gain})")
        if self.kappas is not None:
            unknown = sorted(set(self.kappas) - set(covered))
            if unknown:
                raise ValueError(
                    f"`kappas` names layers that are not projected: {unknown}. Projected: {list(covered)}."
                )
            missing = sorted(set(covered) - set(self.kappas))
            if missing:
                raise ValueError(f"`kappas` has no budget for the projected layers {missing}.")
        return covered, excluded

    def _follow_optimizers(self, trainer: Trainer) -> None:
        """Project after the steps of the Trainer's optimizers, also of those that replace them during fit."""
        self._step_hooks.follow(trainer.optimizers, post=partial(self._on_optimizer_step, trainer))

    def _on_optimizer_step(self, trainer: Trainer, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # A step post-hook fires only for real steps: not on accumulation micro-batches, not when AMP skips a step.
        # Not after another optimizer's step (a GAN's generator's, with the critic projected): the layers have not
        # moved. Until every layer has been measured once, after every step.
        if self._sigmas.keys() != self._layers.keys() or self._steps_a_layer(optimizer, trainer.lightning_module):
            self.project(trainer, step=trainer.global_step + 1)

    def _steps_a_layer(self, optimizer: Optimizer, pl_module: LightningModule) -> bool:
        """Whether ``optimizer`` steps the weight of a projected layer."""
        held = held_parameters([optimizer], pl_module)
        return any(id(p) in held for params in self._weight_params.values() for p in params)

    @torch.no_grad()
    def project(self, trainer: Trainer, step: int, audit: bool | None = None) -> None:
        """Measure every layer, allocate the budget, rescale the layers over budget, publish and queue the logs; an
        audit (tight Lanczos measurements) where ``audit`` or, by default, :meth:`should_audit` says so."""
        if not self._layers:
            return
        start = time.perf_counter()
        audit = self.should_audit(step) if audit is None else audit
        if trainer.world_size > 1:
            self._shapes.all_reduce(self._layers, trainer.strategy)
        operators = {name: op for name, layer in self._layers.items() if (op := self._operator(name, layer))}
        if not operators:
            return
        if self._shapes.varied:
            self._warn_varied()
        with _autocast_off(trainer.strategy.root_device.type):
            triplets = {name: self._measure(name, op, audit) for name, op in operators.items()}
            estimates = torch.stack([e for t in triplets.values() for e in (t.sigma, t.sigma_prev)]).tolist()
            measured = estimates[::2]
            for i, name in enumerate(triplets):
                sigma, sigma_prev = estimates[2 * i], estimates[2 * i + 1]
                if math.isfinite(sigma) and self._needs_refinement(name, sigma, sigma_prev):
                    triplets[name] = self._measure(name, operators[name], audit, refine=triplets[name].v)
                    measured[i] = triplets[name].sigma.item()
        # Rank 0 decides: the scales are identical everywhere even where kernels are not bitwise deterministic.
        measured = trainer.strategy.broadcast(measured, src=0)
        sigmas = {}
        for (name, triplet), sigma in zip(triplets.items(), measured):
            if math.isfinite(sigma):
                sigmas[name] = sigma
                self._left_vectors[name], self._vectors[name] = triplet.u, triplet.v
            else:  # out of the bound, the logs and the warm start until it is finite again
                self._n_skipped += 1
                for state in (self._sigmas, self._vectors, self._left_vectors):
                    state.pop(name, None)
                self._warn(f"nonfinite/{name}", f"Layer {name!r} has non-finite weights: it is skipped, not projected.")
        held = held_parameters(trainer.optimizers, trainer.lightning_module)
        fixed = {name for name in sigmas if self._is_fixed(name, held)}
        self._warn_fixed(fixed)
        kappas = absorb_fixed(self._checked_allocation(sigmas), sigmas, fixed)
        if fixed and (product := math.prod(kappas.values())) > self.max_lipschitz * (1 + 1e-9):  # no free layer left
            self._warn_unmet(fixed, product)
        n_projected = 0
        for name, sigma in sigmas.items():
            scale = 1.0 if name in fixed else projection_scale(sigma, kappas[name])
            if scale < 1.0 and not rescale_weight(self._layers[name], scale):
                self._unscalable.add(name)
                self._warn_fixed({name})
                scale = 1.0
            n_projected += scale < 1.0
            self._sigmas[name] = sigma * scale
        self._current_kappas = kappas
        self.n_projections += 1
        self._last_step = step
        self._publish(trainer, triplets, step)
        self._queue_logs(n_projected, time.perf_counter() - start, audit)

    def _needs_refinement(self, name: str, sigma: float, sigma_prev: float) -> bool:
        r"""Whether a layer's estimate is re-measured by warm Lanczos: not converged (:math:`\sigma - \sigma_{prev} >`
        ``tol`` :math:`\sigma`); no direction (:math:`\sigma = 0`: a zero layer, or a zero singular vector from one);
        or a large step, :math:`\sigma` moved by more than :math:`\sqrt{tol}` relative since the last step: one
        product's error is second order in the move, so it can exceed ``tol`` there, and the convergence indicator,
        which compares with the previous step, cannot tell (a layer growing from zero)."""
        last = self._sigmas.get(name, sigma)
        return sigma == 0 or sigma - sigma_prev > self.tol * sigma or abs(sigma - last) > math.sqrt(self.tol) * sigma

    def _is_fixed(self, name: str, held: set[int]) -> bool:
        """Whether layer ``name`` cannot be rescaled: frozen (no optimizer steps its weight with a gradient: a
        backbone with ``requires_grad=False`` or left out of the optimizers), or its weight's parametrization does
        not take a rescaled weight back (found at an earlier step)."""
        return name in self._unscalable or not any(p.requires_grad and id(p) in held for p in self._weight_params[name])

    def _warn_fixed(self, names: set[str]) -> None:
        """Warn once about each layer that cannot be rescaled, the layers found at one projection in one warning."""
        new = sorted(names - self._warned_fixed)
        if not new:
            return
        self._warned_fixed.update(new)
        frozen = [name for name in new if name not in self._unscalable]
        parametrized = [name for name in new if name in self._unscalable]
        reasons = [
            f"{reason}: {', '.join(listed)}"
            for reason, listed in (
                ("frozen (`requires_grad=False`, or in no optimizer)", frozen),
                ("with a weight parametrization that does not take a rescaled weight", parametrized),
            )
            if listed
        ]
        of = f" of {self.scope!r}" if self.scope else ""
        message = (
            f"{type(self).__name__} cannot rescale {len(new)} layer(s), {'; '.join(reasons)}. Their norms count in the "
            f"bound{of}, and the other layers' budgets shrink to make up for them. A network that is not part of the "
            "one to certify (a teacher, an EMA copy of the model) has no place in the bound: pass the network to "
            "certify as `layers=[...]`."
        )
        self._warn(f"fixed/{','.join(new)}", message)
        log.info(message)

    def _warn_unmet(self, fixed: set[str], product: float) -> None:
        message = (
            f"{type(self).__name__}: the layers that cannot be rescaled ({', '.join(sorted(fixed))}) have norms whose "
            f"product, {product:.6g}, exceeds `max_lipschitz` ({self.max_lipschitz}), and no other layer is left to "
            "make up for it: the bound is over the budget."
        )
        self._warn("unmet", message)
        log.info(message)

    def _warn_varied(self) -> None:
        """Warn about convolutions that pad with something other than zeros and have run on inputs of several sizes:
        their norm is measured at the largest size, and may be larger at another one."""
        for name in self._shapes.varied:
            mode = getattr(self._layers[name], "padding_mode", "zeros")
            if mode != "zeros":
                self._warn(
                    f"varied/{name}",
                    f"Layer {name!r} (padding_mode={mode!r}) has run on inputs of several sizes: its norm is measured "
                    f"on the largest, {self._shapes.input_shape(name, self._layers[name])}, and may be larger at "
                    "another size; the bound holds at that size. (With zero padding the largest size bounds them "
                    "all.)",
                )

    def _operator(self, name: str, layer: nn.Module) -> Operator | None:
        operator = self._shapes.operator(name, layer)
        if operator is None:
            self._warn(f"unused/{name}", f"Layer {name!r} has not run a forward pass yet: it is not projected.")
        return operator

    def _measure(self, name: str, operator: Operator, audit: bool, refine: Tensor | None = None) -> SingularTriplet:
        """Power iteration from the warm vector; Lanczos for audits and cold starts (``audit_tol``) and for
        refinements from the vector ``refine`` (``tol``).

        Audits and cold starts mix the warm vector with as much fresh noise, so that no warm vector stays locked in
        an invariant subspace (a circular convolution's Fourier blocks) while another one takes the top. A
        refinement follows the top pair the step's product has already moved towards: it starts from that vector
        with ``1e-3`` of noise (energy 1e-6, below ``tol``: nothing Lanczos must resolve; it only keeps the Krylov
        space from breaking down on an exact singular vector) and stops with the residual rule of a warm start,
        after 2 steps at least. Under AdamW on a residual BatchNorm CNN (digits, 112 steps) that took 14 Lanczos
        steps per refinement (median) instead of 23 from equal noise, with the same estimates (error against the
        dense norm: median 4.3e-5, p99 2.9e-3 in both).
        """
        weight = self._layers[name].weight
        shape = self._shapes.input_shape(name, self._layers[name])
        if refine is not None:
            start = warm_start(refine.to(weight.device), random_start(shape, weight, self._generator), _REFINE_NOISE)
            return lanczos_svd(operator, start, self.audit_max_iterations, self.tol, residual_factor=1.0, min_iter=2)
        v = self._vectors.get(name)
        if v is not None and tuple(v.shape) == tuple(shape) and not audit:
            return self._track(name, operator, v.to(weight.device))
        noise = random_start(shape, weight, self._generator)
        start = noise if v is None or tuple(v.shape) != tuple(shape) else warm_start(v.to(weight.device), noise)
        return lanczos_svd(operator, start, self.audit_max_iterations, self.audit_tol)

    def _track(self, name: str, operator: Operator, v: Tensor) -> SingularTriplet:
        """This step's products, continuing the alternation of forward and adjoint steps from the kept pair."""
        u = self._left_vectors.get(name)
        if u is None or tuple(u.shape) != self._shapes.output_shape(name, self._layers[name]):
            return power_iteration(operator, v)  # no left vector: a checkpoint of 0.1
        adjoint_first = self.n_projections * self.n_power_iterations % 2 == 1
        return alternating_power_iteration(operator, u.to(v.device), v, self.n_power_iterations, adjoint_first)

    def _checked_allocation(self, sigmas: dict[str, float]) -> dict[str, float]:
        kappas = self.allocate(sigmas)
        if set(kappas) != set(sigmas) or not all(math.isfinite(k) and k > 0 for k in kappas.values()):
            raise ValueError(
                f"{type(self).__name__}.allocate must return a finite kappa > 0 for each of {sorted(sigmas)}, "
                f"got {kappas}."
            )
        return kappas

    def _publish(self, trainer: Trainer, triplets: dict[str, SingularTriplet], step: int) -> None:
        registry = LipRegistry.of(trainer)
        for name, sigma in self._sigmas.items():
            registry.publish(f"kappa/sigma/{name}", sigma, step)
            registry.publish(f"kappa/kappa/{name}", self._current_kappas.get(name, sigma), step)
            if name in triplets:
                registry.publish(f"kappa/singular_vectors/{name}", (triplets[name].u, triplets[name].v), step)
        registry.publish(f"kappa/{self._qualifier}bound", self.bound, step)

    @property
    def bound(self) -> float:
        r"""Product :math:`\prod_l \sigma_l` of the layer norms after the last projection: a bound of the network's
        Lipschitz constant where the network chains the layers with 1-Lipschitz maps between them, each applied once
        (not across a residual connection or parallel branches)."""
        return math.prod(self._sigmas.values())

    @property
    def sigmas(self) -> dict[str, float]:
        """``{layer: sigma}`` after the last projection."""
        return dict(self._sigmas)

    def _queue_logs(self, n_projected: int, seconds: float, audit: bool) -> None:
        bound = self.bound
        log10_bound = math.log10(bound) if bound > 0 else -math.inf
        network = {
            "bound": bound,
            "log10_bound": log10_bound,
            "n_projected": float(n_projected),
            "n_skipped": float(self._n_skipped),
            "seconds": seconds,
        }
        if audit:
            network |= {"audit_bound": bound, "audit_log10_bound": log10_bound}
        metrics = {f"lip/kappa/{self._qualifier}{key}": value for key, value in network.items()}
        if self.log_per_layer:
            for name, sigma in self._sigmas.items():
                metrics[f"lip/kappa/sigma/{name}"] = sigma
                metrics[f"lip/kappa/kappa/{name}"] = self._current_kappas[name]
        self._pending = self._latest = metrics

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._warn_repeated()  # a step without backward (`training_step` returned None)
        pending, self._pending = self._pending, None
        if pending is None or not log_on_logger_steps(trainer, pl_module, pending):
            return
        writer = tensorboard_writer(trainer)
        if writer is not None and self._sigmas:
            sigmas = torch.tensor(list(self._sigmas.values()))
            writer.add_histogram(f"lip/kappa/{self._qualifier}sigma", sigmas, trainer.global_step)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_for_monitors(trainer, pl_module, self._latest)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_for_monitors(trainer, pl_module, self._latest)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        if self.audit_every_n_steps > 0 and self._sigmas and self._changed_after_last_step(trainer):
            log.info(f"{type(self).__name__}: the weights changed after the last step; projected once more.")
            self.project(trainer, trainer.global_step, audit=True)

    @torch.no_grad()
    def _changed_after_last_step(self, trainer: Trainer) -> bool:
        """Whether a layer's norm, measured tightly at the end of fit, is more than ``1e-3`` away from its norm after
        the last projection: its weights changed after the last step, as a weight average
        (``StochasticWeightAveraging``, ``WeightAveraging``) or pruning at the end of the last epoch
        (``ModelPruning``) changes them, or the last estimate was off; or it is not finite (the projection then skips
        that layer with a warning). Changes none of the callback's state."""
        generator = torch.Generator().manual_seed(0)
        changed = False
        for name, layer in self._layers.items():
            operator = self._shapes.operator(name, layer)
            if operator is None or name not in self._sigmas:
                continue
            start = random_start(self._shapes.input_shape(name, layer), layer.weight, generator)
            sigma = lanczos_svd(operator, start, self.audit_max_iterations, self.audit_tol).sigma.item()
            changed = changed or not abs(sigma - self._sigmas[name]) <= _END_TOL * self._sigmas[name]  # NaN too
        return bool(trainer.strategy.broadcast(changed, src=0))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, trainer.state.fn)  # Lightning calls none after an error or interrupt

    def _remove_hooks(self) -> None:
        self._step_hooks.remove()
        self._shapes.remove()
        self._chains.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "vectors": {name: v.detach().cpu() for name, v in self._vectors.items()},
            "left_vectors": {name: u.detach().cpu() for name, u in self._left_vectors.items()},
            "sigmas": dict(self._sigmas),
            "kappas": dict(self._current_kappas),
            "n_projections": self.n_projections,
            "last_step": self._last_step,
            "n_skipped": self._n_skipped,
            "unscalable": sorted(self._unscalable),
            "generator": self._generator.get_state(),
            "shapes": dict(self._shapes.shapes),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, shapes in state_dict.get("shapes", {}).items():  # absent from checkpoints of 0.1
            self._shapes.update(name, shapes)
        self._vectors = dict(state_dict["vectors"])
        self._left_vectors = dict(state_dict.get("left_vectors", {}))  # absent from checkpoints of 0.1
        self._sigmas = dict(state_dict["sigmas"])
        self._current_kappas = dict(state_dict["kappas"])
        self.n_projections = state_dict["n_projections"]
        self._last_step = state_dict.get("last_step", 0)  # absent from checkpoints of 0.1
        self._n_skipped = state_dict["n_skipped"]
        self._unscalable = set(state_dict.get("unscalable", ()))  # absent from checkpoints of 0.1
        self._generator.set_state(state_dict["generator"])


def _autocast_off(device_type: str) -> AbstractContextManager[Any]:
    """Autocast off on ``device_type`` (an optimizer stepped inside an autocast region, as manual optimization can);
    a no-op, much cheaper to enter, when it is off already."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _gain_above_one(module: nn.Module) -> str | None:
    """The Lipschitz constant of a parameter-free module where it exceeds 1, else ``None`` (``ReLU``, ``Tanh``,
    pooling, ...)."""
    if isinstance(module, nn.ELU):
        return f"{module.alpha:g}" if module.alpha > 1 else None
    return next((gain for kind, gain in _GAINS.items() if isinstance(module, kind)), None)


def _weight_parameters(layer: nn.Module) -> list[Tensor]:
    """The parameters ``layer.weight`` is computed from: itself, ``weight_orig`` where it is pruned (the same
    parameter, moved there by ``torch.nn.utils.prune``), or the originals of its parametrization."""
    if parametrize.is_parametrized(layer, "weight"):
        return list(layer.parametrizations["weight"].parameters(recurse=False))
    return [layer.weight_orig if weight_pruning(layer) is not None else layer.weight]


def _weight_source(layer: nn.Module) -> int:
    """Identity of the tensor ``layer.weight`` (tied weights share it; a parametrized weight is computed anew on every
    access, so its parametrization stands for it; a pruned one, its original)."""
    if parametrize.is_parametrized(layer, "weight"):
        return id(layer.parametrizations["weight"])
    return id(_weight_parameters(layer)[0])


def _weight_is_stored(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is a parameter, pruned or parametrized, not a tensor another forward pre-hook
    recomputes."""
    return (
        isinstance(layer.weight, nn.Parameter)
        or parametrize.is_parametrized(layer, "weight")
        or weight_pruning(layer) is not None
    )
