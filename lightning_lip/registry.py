"""Small shared state through which the lightning_lip callbacks exchange results."""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

#: Keys published by the callbacks of this package. ``<layer>`` is a module's qualified name.
KEYS: dict[str, str] = {
    "kappa/sigma/<layer>": "operator norm of the layer after projection (float)",
    "kappa/kappa/<layer>": "budget kappa_l allocated to the layer (float)",
    "kappa/singular_vectors/<layer>": "(u, v): top left/right singular vectors of the layer operator",
    "kappa/bound": "product of the per-layer operator norms after projection (float)",
    "kappa/<scope>/bound": "the same, of each of several projections, by its scope (float)",
    "hessian/lambda_max": "top eigenvalue of the loss Hessian (preconditioned for Adam & co.) (float)",
    "hessian/lambda_min": "bottom eigenvalue of the same operator (float)",
    "hessian/eigenvector": "flat top eigenvector over the trainable parameters the optimizer steps (tensor [P])",
    "hessian/residual": "Ritz residual bound of lambda_max (float)",
    "hessian/density": "SpectralDensity (SLQ nodes and weights) of the same operator, with density=True",
    "hessian/preconditioned": "whether the hessian/* values are of the optimizer's preconditioned Hessian (bool)",
    "noise/trace": "trace of the per-sample gradient covariance Sigma (float)",
    "noise/grad_norm_sq": "squared norm of the mean gradient of the batch (float)",
    "noise/scale": "simple noise scale B_noise = tr Sigma / |G|^2, inf when noise dominates (float)",
    "noise/top_eigenvalues": "largest eigenvalues of Sigma, descending (tensor [k], float64)",
    "noise/drift/<layer>": "predicted mean change of the layer's operator norm over the next step (float)",
    "noise/diffusion/<layer>": "predicted variance of that change (float)",
    "noise/log_lipschitz_drift": "predicted mean change of log prod_l sigma_l over the next step (float)",
    "noise/log_lipschitz_std": "predicted standard deviation of that change, cross-layer terms included (float)",
    "lr/throttle": "throttle s in [s_min, 1] of each param group (list of float)",
    "lr/effective": "learning rate of each param group for the step, s * scheduled (list of float)",
}


class Entry(NamedTuple):
    """A published value and the ``global_step`` at which it was computed."""

    value: Any
    step: int


class LipRegistry:
    """Key-value store of ``(value, step)`` entries shared by the callbacks of one ``Trainer``.

    Writers publish values that are already identical on every rank; the registry does no communication.
    Readers judge staleness from the step. :data:`KEYS` documents the keys in use.

    Example::

        >>> reg = LipRegistry()
        >>> reg.publish("kappa/bound", 3.5, step=10)
        >>> reg.get("kappa/bound"), reg.step_of("kappa/bound")
        (3.5, 10)
        >>> reg.get("hessian/lambda_max", max_age=5, step=20) is None
        True
    """

    _by_trainer: weakref.WeakKeyDictionary[Any, LipRegistry] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    @classmethod
    def of(cls, trainer: Any) -> LipRegistry:
        """The registry of ``trainer``, created on first use."""
        registry = cls._by_trainer.get(trainer)
        if registry is None:
            registry = cls._by_trainer[trainer] = cls()
        return registry

    def publish(self, key: str, value: Any, step: int) -> None:
        """Store ``value`` under ``key`` as computed at ``step``."""
        self._entries[key] = Entry(value, int(step))

    def entry(self, key: str) -> Entry | None:
        """The ``(value, step)`` entry of ``key``, or ``None``."""
        return self._entries.get(key)

    def get(self, key: str, default: Any = None, max_age: int | None = None, step: int | None = None) -> Any:
        """The value of ``key``; ``default`` if absent or, given ``max_age`` and ``step``, older than ``max_age``."""
        entry = self._entries.get(key)
        if entry is None:
            return default
        if max_age is not None:
            if step is None:
                raise ValueError("`step` is required when `max_age` is given.")
            if step - entry.step > max_age:
                return default
        return entry.value

    def step_of(self, key: str) -> int | None:
        """The step at which ``key`` was published, or ``None``."""
        entry = self._entries.get(key)
        return None if entry is None else entry.step

    def keys(self, prefix: str = "") -> list[str]:
        """Published keys starting with ``prefix``, sorted."""
        return sorted(k for k in self._entries if k.startswith(prefix))

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def state_dict(self) -> dict[str, Any]:
        """Entries as plain ``{key: {"value": ..., "step": ...}}``."""
        return {key: {"value": e.value, "step": e.step} for key, e in self._entries.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace all entries with those of ``state_dict``."""
        self._entries = {key: Entry(d["value"], int(d["step"])) for key, d in state_dict.items()}
