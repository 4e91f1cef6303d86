"""Subclassing lightning_lip's callbacks: a custom kappa allocation and a custom throttle policy.

    python examples/custom_policy.py [--max-epochs 4]

Policies are small overridable methods with plain arguments; the glue (hooks, DDP, logging, checkpoints) stays
in the base class.

- ``HeadFirstBudget.allocate``: the classifier head gets a fixed small budget (a margin-friendly output layer),
  the other layers share the rest of ``max_lipschitz`` in proportion to their current norms.
- ``SmoothThrottle.throttle``: instead of cutting straight to the bound and recovering by a fixed factor, move the
  throttle a fraction of the way towards its target each step (an exponential smoother), and never recover
  faster than the schedule allows.
"""

from __future__ import annotations

import argparse
import math

import torch
from digits import DigitsCNN, digits_loaders
from lightning.pytorch import Trainer, seed_everything

from lightning_lip import CurvatureLRController, HessianEigenMonitor, KappaBudgetProjection, LipRegistry, ThrottleState
from lightning_lip.functional import proportional_budget


class HeadFirstBudget(KappaBudgetProjection):
    """Fix the head's kappa; split the remaining budget proportionally among the other layers."""

    def __init__(self, max_lipschitz: float, head: str = "net.7", head_kappa: float = 2.0) -> None:
        super().__init__(max_lipschitz=max_lipschitz)
        self.head, self.head_kappa = head, head_kappa

    def allocate(self, sigmas: dict[str, float]) -> dict[str, float]:
        rest = {name: s for name, s in sigmas.items() if name != self.head}
        kappas = proportional_budget(rest, self.max_lipschitz / self.head_kappa)
        return kappas | {self.head: self.head_kappa}


class SmoothThrottle(CurvatureLRController):
    """Move the throttle 30% of the way to its target each step; cut at once only above the threshold itself."""

    def throttle(self, ratio: float, state: ThrottleState) -> float:
        target = min(1.0, state.bound / ratio) if ratio > 0 else 1.0
        if ratio * state.throttle > 1.0:  # beyond the stability threshold: no smoothing
            return target
        return state.throttle + 0.3 * (target - state.throttle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.2)
    args = parser.parse_args()
    seed_everything(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, val = digits_loaders()
    kappa = HeadFirstBudget(max_lipschitz=20.0)
    controller = SmoothThrottle(mode="strict", margin=0.5)
    trainer = Trainer(
        max_epochs=args.max_epochs,
        logger=False,
        enable_checkpointing=False,
        callbacks=[kappa, HessianEigenMonitor(every_n_steps=10, max_iter=10), controller],
    )
    trainer.fit(DigitsCNN(lr=args.lr), train, val)
    print(f"\nvalidation accuracy {trainer.callback_metrics['val/acc'].item():.3f}")
    registry = LipRegistry.of(trainer)
    kappas = {key.split("/")[-1]: registry.get(key) for key in registry.keys("kappa/kappa/")}
    print("kappa per layer:", {name: round(k, 3) for name, k in kappas.items()})
    print(f"bound {kappa.bound:.3f} <= {kappa.max_lipschitz} = product of kappas {math.prod(kappas.values()):.3f}")
    state = controller.states[0]
    print(f"throttle {state.throttle:.3f} after {state.n_cuts} cuts and {state.n_recoveries} recoveries")


if __name__ == "__main__":
    main()
