"""How close KappaBudgetProjection's per-step estimates stay to the dense norms, by step size and ``tol``.

    python benchmarks/kappa_tracking.py [--seeds 4]

Audits off. For every estimate the convergence check passes (no Lanczos re-measurement), its shortfall
``1 - sigma / ||W||_2`` before the projection; after each projection, each layer's excess ``||W||_2 / kappa - 1``.
Worst over every step, layer and seed, next to the layers re-measured per step (the cost of a smaller ``tol``) and
the median relative move of a layer's weights in a step, ``||W - W_prev||_F / ||W_prev||_F``. Runs: the overhead
benchmark's MLP 784-1024-1024-10 (batch 128, 60 steps, SGD lr 0.01 momentum 0.9 or AdamW lr 1e-3) and a small MLP
16-32-32-4 (batch 16, 20 steps, plain SGD) at three learning rates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _timing import quiet_trainer  # noqa: E402
from kappa_overhead import Model, mlp  # noqa: E402

from lightning_lip import KappaBudgetProjection  # noqa: E402


class CheckedProjection(KappaBudgetProjection):
    """Records the shortfall of the estimates the convergence check passes, the excess over kappa after each
    projection, and the number of re-measurements."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shortfall = self.excess = 0.0
        self.n_refined = 0
        self.moves: list[float] = []
        self._previous: dict[str, torch.Tensor] = {}

    def _needs_refinement(self, name: str, sigma: float, sigma_prev: float) -> bool:
        refine = super()._needs_refinement(name, sigma, sigma_prev)
        self.n_refined += refine
        if not refine:
            self.shortfall = max(self.shortfall, 1 - sigma / dense_norm(self._layers[name]))
        return refine

    def project(self, trainer, step: int, audit: bool | None = None) -> None:
        for name, before in self._previous.items():
            self.moves.append((self._layers[name].weight - before).norm().item() / before.norm().item())
        super().project(trainer, step, audit)
        for name, kappa in self._current_kappas.items():
            self.excess = max(self.excess, dense_norm(self._layers[name]) / kappa - 1)
        self._previous = {name: layer.weight.detach().clone() for name, layer in self._layers.items()}


def dense_norm(layer: nn.Linear) -> float:
    return torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()


class SmallModel(Model):
    def __init__(self, lr: float) -> None:
        sizes = (16, 32, 32, 4)
        layers = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
        super().__init__(nn.Sequential(*layers))
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(make_model, shape, batch: int, steps: int, max_lipschitz: float, tol: float, seed: int) -> CheckedProjection:
    torch.manual_seed(seed)
    model = make_model()
    classes = 10 if shape == (784,) else 4
    data = TensorDataset(torch.randn(batch * steps, *shape), torch.randint(0, classes, (batch * steps,)))
    projection = CheckedProjection(max_lipschitz=max_lipschitz, tol=tol, audit_every_n_steps=0, log_per_layer=False)
    quiet_trainer(max_steps=steps, accelerator="cpu", callbacks=[projection]).fit(
        model, DataLoader(data, batch_size=batch)
    )
    return projection


def main(args) -> None:
    print(f"## Tracking accuracy (audits off, worst over {args.seeds} seeds, {torch.get_num_threads()} threads)\n")
    print("| run | weight move per step | tol | layers re-measured per step | worst shortfall passed | worst excess |")
    print("|---|---|---|---|---|---|")
    runs = [
        ("MLP 784-1024-1024-10, SGD", lambda: Model(mlp(), "sgd"), (784,), 128, 60, 0.5),
        ("MLP 784-1024-1024-10, AdamW", lambda: Model(mlp(), "adamw"), (784,), 128, 60, 0.5),
        *[(f"MLP 16-32-32-4, SGD lr {r:g}", lambda r=r: SmallModel(r), (16,), 16, 20, 1.0) for r in (0.05, 0.2, 0.5)],
    ]
    for (name, make, shape, batch, steps, budget), tol in ((r, t) for r in runs for t in (1e-4, 1e-5)):
        seeds = [run(make, shape, batch, steps, budget, tol, seed) for seed in range(args.seeds)]
        refined = sum(p.n_refined for p in seeds) / (steps * args.seeds)
        shortfall, excess = max(p.shortfall for p in seeds), max(p.excess for p in seeds)
        move = statistics.median(m for p in seeds for m in p.moves)
        print(f"| {name} | {100 * move:.2f}% | {tol:g} | {refined:.3f} | {shortfall:.1e} | {excess:+.1e} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=4)
    main(parser.parse_args())
