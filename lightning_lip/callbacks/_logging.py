"""One-time warnings, logging through ``pl_module.log`` and the TensorBoard extras."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


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
