"""lightning_lip: PyTorch Lightning callbacks that measure and control the Lipschitz constants of training."""

from lightning_lip.callbacks import (
    CurvatureLRController,
    GradientNoiseEstimator,
    HessianEigenMonitor,
    KappaBudgetProjection,
    ThrottleState,
)
from lightning_lip.registry import KEYS, Entry, LipRegistry

__version__ = "0.1.0"

__all__ = [
    "KEYS",
    "CurvatureLRController",
    "Entry",
    "GradientNoiseEstimator",
    "HessianEigenMonitor",
    "KappaBudgetProjection",
    "LipRegistry",
    "ThrottleState",
    "__version__",
]
