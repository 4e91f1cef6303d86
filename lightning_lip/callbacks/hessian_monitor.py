r"""
Hessian eigenvalue monitor
^^^^^^^^^^^^^^^^^^^^^^^^^^

Measures the top (and bottom) eigenvalue of the training-loss Hessian by Lanczos on Hessian-vector products:
:math:`L_G`, the curvature that decides whether the update map is stable.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_flatten, tree_unflatten
from typing_extensions import override

from lightning_lip.callbacks._checks import (
    check_alone,
    check_choice,
    check_int,
    check_loss_source,
    check_positive,
    check_strategy,
)
from lightning_lip.callbacks._logging import WarnOnce, log_metrics, tensorboard_writer, write_tensorboard_layout
from lightning_lip.callbacks._measuring import (
    StepBatch,
    detached,
    differentiation_failure,
    first_line,
    measurement_mode,
    module_loss,
    sample_count,
)
from lightning_lip.callbacks._optimizers import stepped_parameters, unsharded
from lightning_lip.callbacks._state import BoundModule, SpawnSafeGenerator, gather_rank_probes, select_rank_probe
from lightning_lip.functional.batch import batch_tree
from lightning_lip.functional.hvp import hvp_operator
from lightning_lip.functional.lanczos import SpectralDensity, lanczos, slq_density, warm_start
from lightning_lip.functional.stability import is_preconditioned, preconditioner, stability_threshold
from lightning_lip.registry import LipRegistry

# Residual bar / tol of a cold start, whose lambda_1 component may be tiny: at lambda_2/lambda_1 = 0.99 it never
# certified lambda_2 in 2000 starts (lanczos' default 0.1: 7 times). A warm start holds lambda_1's direction: 1.
_COLD_RESIDUAL_FACTOR = 0.01
_STOPPED = "no more Hessian measurements in this run (a CurvatureLRController holds its throttle)."


class HessianEigenMonitor(Callback):
    r"""Track :math:`\lambda_{max}` and :math:`\lambda_{min}` of the training-loss Hessian with Lanczos on HVPs.

    Every ``every_n_steps`` optimizer steps (:meth:`should_run`), after the batch, the callback builds the
    Hessian-vector product of the mean loss over a probe set (``data="fixed"``: the first ``num_samples``
    training samples seen, kept for the whole run; ``"current"``: the current batch), a double backward through
    ``functional_call`` on the unwrapped module, and runs Lanczos warm-started from the previous top eigenvector
    mixed with noise, cold every ``cold_every_n_runs`` runs so that a warm start cannot lock onto a stale direction.
    The Hessian is over the trainable parameters that the (first) optimizer steps, the variables of its update map:
    a backbone left out of the optimizer, trainable or not, does not move, and its curvature is not measured.
    For Adam, AdamW, Adamax, RMSprop and Adagrad the operator is the preconditioned Hessian :math:`P^{-1/2}HP^{-1/2}`
    that governs their stability, on the coordinates with a gradient
    (:func:`~lightning_lip.functional.stability.preconditioner`).

    The loss is ``pl_module.lip_loss(batch)`` if the module defines it, else the ``"loss"`` of
    ``training_step(batch, -1)`` with its bookkeeping muted (``lip_loss`` is required with manual optimization), on a
    copy of the batch; the fixed probe is taken before the step. A ``training_step`` that changes its batch in place
    (``x /= 255``) costs ``data="current"`` one measurement, skipped with a warning; the batches are copied before
    their steps from then on.
    Dropout is off during the measurement; BatchNorm uses the probe batch's statistics, as training does
    (``bn_mode="train"``), or its running statistics (``"eval"``). A loss that draws random numbers (noise
    augmentation in ``training_step``) is measured at one draw: every product replays torch's random state (one
    symmetric operator). Training is left bit-identical: ``model.training``, ``.grad``, buffers and the RNG state
    are restored, ``.grad`` is not written. The products are plain ``torch.autograd`` double backwards, so activation
    checkpointing (non-reentrant), old-style ``autograd.Function`` classes and ``.item()`` in ``training_step`` are
    measured; where the loss cannot be differentiated twice (reentrant checkpointing, a ``training_step`` that
    returns ``None``) the callback warns once and stops measuring, with the reason in :attr:`failure`. Under DDP the
    products are averaged over ranks (weighted by probe size), so every rank gets the same result.

    Logged: ``lip/hessian/lambda_max``, ``lambda_min``, ``residual``, ``n_hvp``, ``seconds``, ``eta_lambda_max``
    (:math:`\eta\lambda_{max}`), ``threshold`` and ``stability_ratio`` (their quotient, unstable above 1). With a
    ``TensorBoardLogger``, a custom-scalars chart of ``eta_lambda_max`` against ``threshold``. Registry:
    ``hessian/lambda_max``, ``hessian/lambda_min``, ``hessian/eigenvector`` (flat), ``hessian/residual``,
    ``hessian/preconditioned``, and with ``density=True`` ``hessian/density`` (a
    :class:`~lightning_lip.functional.lanczos.SpectralDensity`, also the TensorBoard histogram
    ``lip/hessian/density``).

    Args:
        every_n_steps: measure every this many optimizer steps, ``>= 1``.
        k: number of top eigenvalues, ``>= 1`` (a model with fewer parameters reports all of them, with a warning).
        max_iter: cap on Lanczos steps (HVPs) per measurement.
        tol: relative tolerance of the Lanczos stopping rule (change ``<= tol``; residual ``<= tol``
            from a warm start, ``<= tol / 100`` from a cold one), ``> 0``.
        data: ``"fixed"`` probe set or ``"current"`` batch.
        num_samples: size of the fixed probe set.
        bn_mode: ``"train"`` (the probe batch's) or ``"eval"`` (running) BatchNorm statistics during the
            measurement.
        warm_mix: weight of fresh noise mixed into the warm start, ``>= 0``.
        cold_every_n_runs: start cold every this many runs (``0``: only the first).
        density: also estimate the spectral density by stochastic Lanczos quadrature (``density_vectors`` x
            ``max_iter`` more HVPs), published as ``hessian/density`` and drawn as a TensorBoard histogram.
        density_vectors: random vectors of the density estimate, ``>= 1``.
        converge_min: hold Lanczos until :math:`\lambda_{min}` meets the stopping rule too (more HVPs; without it
            ``lambda_min`` is the best estimate when :math:`\lambda_{max}` converged, with its residual logged as
            ``residual_min``).

    Raises:
        ValueError: if an argument is out of range, or at setup if the module optimizes manually without
            ``lip_loss`` or the Trainer holds another ``HessianEigenMonitor``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HessianEigenMonitor(every_n_steps=50)])
    """

    DATA = ("fixed", "current")
    BN_MODES = ("eval", "train")

    def __init__(
        self,
        every_n_steps: int = 200,
        k: int = 1,
        max_iter: int = 30,
        tol: float = 1e-3,
        data: str = "fixed",
        num_samples: int = 256,
        bn_mode: str = "train",
        warm_mix: float = 0.1,
        cold_every_n_runs: int = 10,
        density: bool = False,
        density_vectors: int = 1,
        converge_min: bool = False,
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1)
        check_int("k", k, 1)
        check_int("max_iter", max_iter, max(k, 2))
        check_positive("tol", tol)
        check_choice("data", data, self.DATA)
        check_int("num_samples", num_samples, 1)
        check_choice("bn_mode", bn_mode, self.BN_MODES)
        check_positive("warm_mix", warm_mix, allow_zero=True)
        check_int("cold_every_n_runs", cold_every_n_runs, 0)
        check_int("density_vectors", density_vectors, 1)
        self.every_n_steps = every_n_steps
        self.k = k
        self.max_iter = max_iter
        self.tol = tol
        self.data = data
        self.num_samples = num_samples
        self.bn_mode = bn_mode
        self.warm_mix = warm_mix
        self.cold_every_n_runs = cold_every_n_runs
        self.density = density
        self.density_vectors = density_vectors
        self.converge_min = converge_min

        self._module = BoundModule()
        self._start_afresh()

    def _start_afresh(self) -> None:
        """The state of a new training run."""
        self.n_runs = 0
        self.n_skipped = 0
        self.failure: str | None = None  # why measurements stopped: no second derivative, no samples in the batches
        self.last: dict[str, float] = {}
        self._probe: list[Any] = []
        self._probe_size = 0
        self._probe_leaves: list[list[Any]] = []  # a checkpoint's probe, until a batch shows its structure
        self._eigenvector: Tensor | None = None
        self._last_step = 0
        self._generator = SpawnSafeGenerator().manual_seed(0)
        self._warn = WarnOnce()
        self._step_batch = StepBatch(type(self).__name__, self._warn)  # with data="current"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, data=self.data, bn_mode=self.bn_mode)

    def should_run(self, step: int) -> bool:
        """Whether to measure after the batch that ended at optimizer step ``step`` (1-based): once every
        ``every_n_steps`` steps, at the first batch end at or after each multiple (a batch can take several steps:
        a GAN's two optimizers)."""
        return step // self.every_n_steps > self._last_step // self.every_n_steps

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy, type(self).__name__)
            check_alone(trainer, HessianEigenMonitor)
            self._module.bind(pl_module, self._start_afresh)
            check_loss_source(pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_tensorboard_layout(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A new Trainer continuing the same module without a checkpoint counts its steps from 0 again.
        self._last_step = min(self._last_step, trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Before the step: a `training_step` may change its batch in place.
        if self._probe_leaves:
            self._probe = self._restored_probe(batch)
        if self.failure is None and self.data == "fixed" and self._probe_size < self.num_samples:
            size = self._sample_count(batch)
            if size is not None:
                self._probe.append(detached(batch))
                self._probe_size += size
        if self.data == "current":
            self._step_batch.start(batch)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or self.failure is not None or not self.should_run(step):
            return
        self._last_step = step
        current = self.data == "current"
        if current and self._step_batch.changed(trainer.strategy):
            self.n_skipped += 1
            result = {"lip/hessian/n_skipped": float(self.n_skipped)}
        else:
            result = self.measure(trainer, pl_module, [self._step_batch.batch] if current else self._probe)
        if result is not None:
            log_metrics(trainer, pl_module, result, on_step=True, on_epoch=False)

    def measure(self, trainer: Trainer, pl_module: LightningModule, probe: list[Any]) -> dict[str, float] | None:
        """Run Lanczos on the probe batches; publish and return the metrics, or ``None`` if there is nothing to
        measure yet (lazy modules before their first forward pass, Adam & co. before their first step) or at all
        (measurements have stopped: :attr:`failure`)."""
        start = time.perf_counter()
        if self.failure is not None or any(is_lazy(p) for p in pl_module.parameters()):
            return None
        optimizer = unsharded(trainer.optimizers[0], state=False) if trainer.optimizers else None
        params = stepped_parameters(pl_module, trainer.optimizers[:1])
        if not params:
            self._warn("no_params", f"{type(self).__name__}: no trainable parameter to measure; nothing to do.")
            return None
        preconditioned = optimizer is not None and is_preconditioned(optimizer)
        scaling = None
        if preconditioned:
            named = dict(pl_module.named_parameters())
            optimizer = unsharded(trainer.optimizers[0])  # with the state of every rank's shard
            scaling = preconditioner(optimizer, [named[n] for n in params])
            if scaling is None:
                return None  # before the first step there is no preconditioner yet
        sizes = [self._sample_count(b) for b in probe]
        if None in sizes:
            return None
        with isolate_rng(), measurement_mode(pl_module, batch_norm_train=self.bn_mode == "train"):
            hvp = hvp_operator(pl_module, module_loss(pl_module), probe, sizes, params)
            matvec = self._distributed(trainer, hvp, float(sum(sizes)), scaling)
            v0, warm = self._start_vector(sum(p.numel() for p in params.values()), params)
            if self.k > v0.numel():
                self._warn(
                    "k",
                    f"{type(self).__name__}: `k={self.k}` exceeds the {v0.numel()} parameters measured; the "
                    f"Hessian has {v0.numel()} eigenvalues, and those are reported.",
                )
            try:
                result = lanczos(
                    matvec,
                    v0,
                    k=min(self.k, v0.numel()),
                    max_iter=self.max_iter,
                    tol=self.tol,
                    require_min=self.converge_min,
                    generator=self._generator,
                    residual_factor=1.0 if warm else _COLD_RESIDUAL_FACTOR,
                )
            except Exception as error:  # the user's loss, run on the probe in eval mode
                reason = first_line(error)
                self.failure = differentiation_failure(reason, type(self).__name__, self._warn, _STOPPED, pl_module)
                self.n_skipped += 1
                return {"lip/hessian/n_skipped": float(self.n_skipped)}
            density = None
            if self.density and math.isfinite(result.eigenvalues[0].item()):
                density = slq_density(
                    matvec, v0.numel(), self.density_vectors, self.max_iter, v0.dtype, v0.device, self._generator
                )
        self.n_runs += 1
        lam_max = result.eigenvalues[0].item()
        if not math.isfinite(lam_max):
            self.n_skipped += 1
            self._warn("nonfinite", "HessianEigenMonitor: non-finite loss or HVP; the measurement is skipped.")
            return {"lip/hessian/n_skipped": float(self.n_skipped)}
        self._eigenvector = result.eigenvectors[0]
        metrics = {
            "lip/hessian/lambda_max": lam_max,
            "lip/hessian/lambda_min": result.lambda_min.item(),
            "lip/hessian/residual": result.residuals[0].item(),
            "lip/hessian/residual_min": result.residual_min.item(),
            "lip/hessian/n_hvp": float(result.n_matvec),
            "lip/hessian/converged": float(result.converged),
            "lip/hessian/n_skipped": float(self.n_skipped),
            "lip/hessian/seconds": time.perf_counter() - start,
        }
        if self.k > 1:
            metrics |= {f"lip/hessian/lambda_{i + 1}": lam.item() for i, lam in enumerate(result.eigenvalues)}
        metrics |= self._stability(optimizer, lam_max)
        self.last = metrics
        step = trainer.global_step
        registry = LipRegistry.of(trainer)
        registry.publish("hessian/lambda_max", lam_max, step)
        registry.publish("hessian/lambda_min", metrics["lip/hessian/lambda_min"], step)
        registry.publish("hessian/eigenvector", self._eigenvector, step)
        registry.publish("hessian/residual", metrics["lip/hessian/residual"], step)
        registry.publish("hessian/preconditioned", preconditioned, step)
        if density is not None:
            registry.publish("hessian/density", density, step)
            self._write_density(trainer, density)
        return metrics

    def _write_density(self, trainer: Trainer, density: SpectralDensity) -> None:
        """The spectral density as a TensorBoard histogram (mass per eigenvalue bin) under ``lip/hessian/density``."""
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        edges, mass = density.histogram(bins=64)
        centres = (edges[1:] + edges[:-1]) / 2
        writer.add_histogram_raw(
            "lip/hessian/density",
            min=edges[0].item(),
            max=edges[-1].item(),
            num=mass.sum().item(),
            sum=(mass * centres).sum().item(),
            sum_squares=(mass * centres * centres).sum().item(),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=mass.tolist(),
            global_step=trainer.global_step,
        )

    def _stability(self, optimizer: torch.optim.Optimizer | None, lam_max: float) -> dict[str, float]:
        """``lr * lambda_max`` against the threshold, for the param group closest to instability."""
        if optimizer is None:
            return {}
        worst: dict[str, float] = {}
        for group in optimizer.param_groups:
            threshold = stability_threshold(optimizer, group)
            if threshold is None:
                ascent = " with maximize=True" if group.get("maximize", False) else ""
                self._warn("optimizer", f"No stability threshold is known for {type(optimizer).__name__}{ascent}.")
                return {}
            eta_lambda = float(group["lr"]) * lam_max
            if not worst or eta_lambda / threshold > worst["lip/hessian/stability_ratio"]:
                worst = {
                    "lip/hessian/eta_lambda_max": eta_lambda,
                    "lip/hessian/threshold": threshold,
                    "lip/hessian/stability_ratio": eta_lambda / threshold,
                }
        return worst

    def _start_vector(self, n: int, params: dict[str, Tensor]) -> tuple[Tensor, bool]:
        """``([n] start vector, whether it is warm)``, in the parameters' precision but at least float32: Lanczos
        in bfloat16 loses the orthogonality of its basis (λ_max 84–86 % low on MLPs), around products that stay in
        the parameters' precision."""
        first = next(iter(params.values()))
        dtype = torch.promote_types(first.dtype, torch.float32)
        noise = torch.randn(n, generator=self._generator, dtype=dtype).to(first.device)
        cold = self._eigenvector is None or self._eigenvector.numel() != n
        if cold or (self.cold_every_n_runs and self.n_runs % self.cold_every_n_runs == 0):
            return noise, False
        return warm_start(self._eigenvector.to(first.device), noise, self.warm_mix), True

    def _distributed(self, trainer: Trainer, hvp: Any, n_local: float, scaling: Tensor | None) -> Any:
        """Average the product over ranks weighted by probe size, and precondition it (Adam & co.). A rank whose
        product raises says so in the same collective, and every rank raises there: a rank that left the
        measurement alone would leave the others waiting in the next collective."""
        world = trainer.world_size
        n_total = n_local
        if world > 1:  # on the strategy's device: NCCL reduces device tensors only
            count = torch.tensor(n_local, device=trainer.strategy.root_device)
            n_total = float(trainer.strategy.reduce(count, reduce_op="sum"))

        def matvec(v: Tensor) -> Tensor:
            x = v if scaling is None else v * scaling
            if world == 1:
                hv = hvp(x)
            else:
                error: Exception | None = None
                try:
                    hv = hvp(x) * n_local
                except Exception as caught:  # the user's loss on the probe (see `measure`)
                    error, hv = caught, torch.zeros_like(x)
                failed = hv.new_ones(1) * (error is not None)
                both = trainer.strategy.reduce(torch.cat([hv.flatten(), failed]), reduce_op="sum")
                if both[-1] > 0:
                    raise error or RuntimeError("the Hessian-vector product failed on another rank")
                hv = both[:-1].view_as(x) / n_total
            return hv if scaling is None else hv * scaling

        return matvec

    def _sample_count(self, batch: Any) -> int | None:
        """The number of samples in ``batch``; ``None`` where they cannot be found, and measurements stop."""
        size = sample_count(batch, type(self).__name__, self._warn, _STOPPED)
        if size is None:
            self.failure = f"no samples found in a {type(batch).__name__} batch"
        return size

    def _restored_probe(self, batch: Any) -> list[Any]:
        """A checkpoint's probe, its leaves put back into the structure of ``batch`` and onto its tensors' devices
        (a checkpoint saved under DDP holds every rank's probe on the CPU; one saved on another device holds it
        there): the checkpoint keeps leaves only, so that batch classes (named tuples, dataclasses, a tokenizer's
        ``BatchEncoding``) load with ``torch.load(weights_only=True)``. A probe that does not fit is collected
        anew."""
        tree, rebuild = batch_tree(batch)
        leaves, spec = tree_flatten(tree)
        stored, self._probe_leaves = self._probe_leaves, []
        if all(len(p) == len(leaves) for p in stored):
            return [rebuild(tree_unflatten([_to_device_of(s, b) for s, b in zip(p, leaves)], spec)) for p in stored]
        self._warn(
            "probe",
            f"{type(self).__name__}: the checkpoint's probe does not fit this run's batches; a new one is collected.",
        )
        self._probe_size = 0
        return []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_runs": self.n_runs,
            "n_skipped": self.n_skipped,
            "last_step": self._last_step,
            "eigenvector": self._eigenvector.cpu() if self._eigenvector is not None else None,
            "probe_leaves": [tree_flatten(batch_tree(b)[0])[0] for b in self._probe] or self._probe_leaves,
            "probe_size": self._probe_size,
            "generator": self._generator.get_state(),
            "copy_batches": self._step_batch.copying,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_runs = state_dict["n_runs"]
        self.n_skipped = state_dict["n_skipped"]
        self._last_step = state_dict["last_step"]
        self._eigenvector = state_dict["eigenvector"]
        self._probe = list(state_dict.get("probe", []))  # checkpoints of 0.1 held the batches themselves
        self._probe_leaves = list(state_dict.get("probe_leaves", []))
        self._probe_size = state_dict["probe_size"]
        self._generator.set_state(state_dict["generator"])
        self._step_batch.copying = state_dict.get("copy_batches", False)  # absent from checkpoints of 0.1

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.data == "fixed":
            gather_rank_probes(trainer, checkpoint.get("callbacks", {}).get(self.state_key))

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        select_rank_probe(trainer, checkpoint.get("callbacks", {}).get(self.state_key))


def _to_device_of(leaf: Any, like: Any) -> Any:
    return leaf.to(like.device) if isinstance(leaf, Tensor) and isinstance(like, Tensor) else leaf
