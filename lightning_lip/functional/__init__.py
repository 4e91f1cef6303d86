"""Pure torch math, no Lightning imports: testable on bare tensors."""

from lightning_lip.functional.lanczos import LanczosResult, lanczos
from lightning_lip.functional.spectral import (
    SingularTriplet,
    lanczos_svd,
    layer_operator,
    operator_norm,
    power_iteration,
    projection_scale,
    proportional_budget,
    uniform_budget,
)

__all__ = [
    "LanczosResult",
    "SingularTriplet",
    "lanczos",
    "lanczos_svd",
    "layer_operator",
    "operator_norm",
    "power_iteration",
    "projection_scale",
    "proportional_budget",
    "uniform_budget",
]
