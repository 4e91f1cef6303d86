"""Overhead of KappaBudgetProjection as a fraction of training-step time, and what spectral_norm leaves.

    python benchmarks/kappa_overhead.py [--steps 40] [--repeats 5] [--amortized-steps 1000] [--optimizer sgd]

1. MLP 784-1024-1024-10 and a small CNN (3x32x32 input), batch 128, SGD (lr 0.01, momentum 0.9) or AdamW (lr 1e-3:
   its per-coordinate steps move small weights further, so more layers need re-measuring by Lanczos): median step
   time with and without the callback, runs interleaved so that machine noise hits both alike; the ratio is the
   overhead (target <= 5%).
   Two budgets: ``max_lipschitz=10`` leaves both networks under budget (every step measures every layer, nothing
   is rescaled), ``0.5`` puts them over it (the worst case: measure, rescale and publish every layer every step).
   The table counts the layers rescaled per step, and gives the callback's own median time per step over the
   median step ("self-timed": free of the machine's noise between runs, blind to after-effects on caches).
   These runs hold no audit and no logging step.
2. The same at the callback's defaults over longer runs: audits (a Lanczos measurement every 1000 steps) and
   logging (per-layer sigma and kappa every 50 steps, CSVLogger) amortized into the share of the step.
3. Convolutions trained under ``torch.nn.utils.parametrizations.spectral_norm`` (which normalizes the reshaped
   kernel) vs under KappaBudgetProjection with kappa = 1: the true operator norm each leaves.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _timing import WARMUP_STEPS, StepTimer, median_step, quiet_trainer  # noqa: E402

from lightning_lip import KappaBudgetProjection  # noqa: E402
from lightning_lip.functional import operator_norm  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )


class Model(LightningModule):
    def __init__(self, net: nn.Module, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class CountingProjection(KappaBudgetProjection):
    """Counts the layers whose allocated kappa is below their measured norm (the layers rescaled), and times its
    own projections and its logging hook (seconds each)."""

    rescaled = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []
        self.log_times: list[float] = []

    def allocate(self, sigmas: dict[str, float]) -> dict[str, float]:
        kappas = super().allocate(sigmas)
        CountingProjection.rescaled += sum(sigmas[name] > kappas[name] for name in sigmas)
        return kappas

    def project(self, trainer, step: int) -> None:
        start = time.perf_counter()
        super().project(trainer, step)
        self.times.append(time.perf_counter() - start)

    def on_train_batch_end(self, *args) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.log_times.append(time.perf_counter() - start)


def step_time(make, shape, steps: int, callbacks, optimizer: str) -> float:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128 * steps, *shape), torch.randint(0, 10, (128 * steps,)))
    timer = StepTimer()
    _fit(Model(make(), optimizer), DataLoader(data, batch_size=128), [*callbacks, timer], epochs=1)
    return median_step(timer.times)


def overhead(args) -> None:
    print(
        f"## Overhead ({args.optimizer}, batch 128, {args.steps} steps, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print(
        "| model | max_lipschitz | layers rescaled per step | step without (ms) | step with (ms) | overhead "
        "| self-timed |"
    )
    print("|---|---|---|---|---|---|---|")
    models = [("MLP 784-1024-1024-10", mlp, (784,)), ("CNN 3x32x32", cnn, (3, 32, 32))]
    for (name, make, shape), budget in itertools.product(models, [10.0, 0.5]):
        ratios, shares, base, with_cb = [], [], [], []
        CountingProjection.rescaled = 0
        for _ in range(args.repeats):
            b = step_time(make, shape, args.steps, [], args.optimizer)
            projection = CountingProjection(max_lipschitz=budget, log_per_layer=False)
            w = step_time(make, shape, args.steps, [projection], args.optimizer)
            base.append(b)
            with_cb.append(w)
            ratios.append(w / b - 1)
            shares.append(median_step(projection.times) / w)
        per_step = CountingProjection.rescaled / (args.repeats * args.steps)
        print(
            f"| {name} | {budget:g} | {per_step:.2f} | {1e3 * statistics.median(base):.1f} | "
            f"{1e3 * statistics.median(with_cb):.1f} | {100 * statistics.median(ratios):+.1f}% | "
            f"{100 * statistics.median(shares):.1f}% |"
        )


AMORTIZED_WARMUP = 10


def amortized(args) -> None:
    """The callback at its defaults (``max_lipschitz=0.5``: over budget; audits every 1000 steps, per-layer logging)
    over runs long enough to hold an audit and logging steps (a CSVLogger writing every 50 steps): its own time,
    projections and logging hook, over the training time without it; the first ``AMORTIZED_WARMUP`` steps (cold
    starts) are left out."""
    print(f"\n## Amortized at the defaults ({args.optimizer}, {args.amortized_steps} steps, median of 3 runs)\n")
    print("| model | share of the step: per-step median | amortized | of which logging |")
    print("|---|---|---|---|")
    for name, make, shape in [("MLP 784-1024-1024-10", mlp, (784,)), ("CNN 3x32x32", cnn, (3, 32, 32))]:
        medians, shares, logging = [], [], []
        for repeat in range(3):
            torch.manual_seed(0)
            n = 128 * args.amortized_steps
            data = DataLoader(TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,))), batch_size=128)
            projection, timer = CountingProjection(max_lipschitz=0.5), StepTimer()
            logger = CSVLogger(tempfile.mkdtemp(), name="amortized")
            trainer = Trainer(
                max_epochs=1,
                accelerator="cpu",
                logger=logger,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[projection, timer],
            )
            trainer.fit(Model(make(), args.optimizer), data)
            skip = AMORTIZED_WARMUP
            steps, projecting, logs = timer.times[skip:], projection.times[skip:], projection.log_times[skip:]
            own = sum(projecting) + sum(logs)
            train = sum(steps) - own
            medians.append(statistics.median(projecting) / statistics.median(steps))
            shares.append(own / train)
            logging.append(sum(logs) / train)
        print(
            f"| {name} | {100 * statistics.median(medians):.1f}% | {100 * statistics.median(shares):.1f}% "
            f"| {100 * statistics.median(logging):.1f}% |"
        )


class ConvOnly(LightningModule):
    """Trains one conv layer to amplify its input (maximize output energy), the worst case for a norm cap."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def training_step(self, batch, batch_idx):
        return -self.conv(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def spectral_norm_comparison() -> None:
    print("\n## True conv operator norm after training with a norm cap of 1\n")
    print("| conv (input) | kernel norm, spectral_norm | true norm, spectral_norm | true norm, KappaBudgetProjection |")
    print("|---|---|---|---|")
    configs = [
        ("3x3, 16->16, pad 1 (16x16)", lambda: nn.Conv2d(16, 16, 3, padding=1), (16, 16, 16)),
        ("5x5, 8->8, pad 2 (16x16)", lambda: nn.Conv2d(8, 8, 5, padding=2), (8, 16, 16)),
        ("3x3, 16->32, stride 2 (16x16)", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (16, 16, 16)),
        (
            "3x3 circular, 16->16 (16x16)",
            lambda: nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"),
            (16, 16, 16),
        ),
    ]
    for label, make, shape in configs:
        data = DataLoader(TensorDataset(torch.randn(256, *shape)), batch_size=32)
        torch.manual_seed(0)
        sn = nn.utils.parametrizations.spectral_norm(make(), n_power_iterations=5)
        _fit(ConvOnly(sn), data, [])
        sn.eval()
        kernel = torch.linalg.matrix_norm(sn.weight.detach().reshape(sn.weight.shape[0], -1), 2).item()
        plain = make()
        with torch.no_grad():
            plain.weight.copy_(sn.weight)
        true_sn = operator_norm(plain, shape).item()
        torch.manual_seed(0)
        ours = make()
        _fit(ConvOnly(ours), data, [KappaBudgetProjection(max_lipschitz=1.0)])
        true_ours = operator_norm(ours, shape).item()
        print(f"| {label} | {kernel:.3f} | {true_sn:.3f} | {true_ours:.4f} |")


def _fit(model, data, callbacks, epochs: int = 2) -> None:
    quiet_trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks).fit(model, data)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amortized-steps", type=int, default=1000, help="0 skips the amortized part")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps, got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if 0 < args.amortized_steps <= AMORTIZED_WARMUP:
        parser.error(f"--amortized-steps must be 0 or exceed the {AMORTIZED_WARMUP} warm-up steps")
    overhead(args)
    if args.amortized_steps > 0:
        amortized(args)
    spectral_norm_comparison()
