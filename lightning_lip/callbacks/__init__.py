"""Thin Lightning callbacks: schedule, call the functional math, publish, log."""

from lightning_lip.callbacks.gradient_noise import GradientNoiseEstimator
from lightning_lip.callbacks.hessian_monitor import HessianEigenMonitor
from lightning_lip.callbacks.kappa_budget import KappaBudgetProjection
from lightning_lip.callbacks.lr_controller import CurvatureLRController, ThrottleState

__all__ = [
    "CurvatureLRController",
    "GradientNoiseEstimator",
    "HessianEigenMonitor",
    "KappaBudgetProjection",
    "ThrottleState",
]
