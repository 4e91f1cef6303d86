"""lightning_lip: PyTorch Lightning callbacks that measure and control the Lipschitz constants of training."""

from lightning_lip.callbacks import GradientNoiseEstimator, HessianEigenMonitor, KappaBudgetProjection
from lightning_lip.registry import KEYS, Entry, LipRegistry

__version__ = "0.1.0"

__all__ = [
    "KEYS",
    "Entry",
    "GradientNoiseEstimator",
    "HessianEigenMonitor",
    "KappaBudgetProjection",
    "LipRegistry",
    "__version__",
]
