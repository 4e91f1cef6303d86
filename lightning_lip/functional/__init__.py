"""Pure torch math, no Lightning imports: testable on bare tensors."""

from lightning_lip.functional.lanczos import LanczosResult, SpectralDensity, lanczos, slq_density
from lightning_lip.functional.noise import (
    NoiseStatistics,
    SigmaDynamics,
    layer_snr,
    lipschitz_forecast,
    log_lipschitz_dynamics,
    noise_factor,
    noise_statistics,
    operator_sigma_dynamics,
    sigma_dynamics,
    sigma_hessian,
)
from lightning_lip.functional.per_sample import per_sample_grads
from lightning_lip.functional.spectral import (
    SingularTriplet,
    alternating_power_iteration,
    lanczos_svd,
    layer_operator,
    operator_norm,
    power_iteration,
    projection_scale,
    proportional_budget,
    uniform_budget,
)
from lightning_lip.functional.stability import LinearStep, gradient_clipping, linear_step, stability_threshold

__all__ = [
    "LanczosResult",
    "LinearStep",
    "NoiseStatistics",
    "SigmaDynamics",
    "SingularTriplet",
    "SpectralDensity",
    "alternating_power_iteration",
    "gradient_clipping",
    "lanczos",
    "lanczos_svd",
    "layer_operator",
    "layer_snr",
    "linear_step",
    "lipschitz_forecast",
    "log_lipschitz_dynamics",
    "noise_factor",
    "noise_statistics",
    "operator_norm",
    "operator_sigma_dynamics",
    "per_sample_grads",
    "power_iteration",
    "projection_scale",
    "proportional_budget",
    "sigma_dynamics",
    "sigma_hessian",
    "slq_density",
    "stability_threshold",
    "uniform_budget",
]
