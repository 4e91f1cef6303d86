"""Training stability across learning rates: baseline vs CurvatureLRController and the usual remedies.

    python benchmarks/stability.py [--seeds 5] [--epochs 8] [--paired-seeds 60]
        [--parts minibatch cnn fullbatch paired paired-cnn margins overhead optimizers]

Digits MLP 64-128-128-10 (sklearn, 1437 train / 360 validation), plain SGD with mini-batches of 64 (8 epochs)
and full-batch GD (150 steps), and a digits CNN (two 3x3 convolutions) with the same mini-batches, over learning
rates from well below the largest stable one to 32x beyond it.
Methods: baseline; this controller in its adaptive (default), strict and guard modes (default margin 0.5; fed
by a HessianEigenMonitor every 10 steps, every 5 in full batch, 5-HVP warm Lanczos on 256 samples); gradient-norm
clipping at 1; AdGD (Malitsky & Mishchenko 2020, the adaptive secant step with the secant on one batch, capped by
the nominal LR); linear LR warm-up over the first 20% of steps; and the LR Lightning's ``lr_find`` suggests (one
row, independent of the grid). Reported: final validation accuracy (%) averaged over seeds, "div" when a seed
diverged (non-finite loss); then each method against the targets: its best LR, its cost at the baseline's best
LR, and its worst seed up to 8x the baseline's largest stable LR. Then adaptive mode's cost at the baseline's
best LR over many paired seeds (MLP in full batch, CNN with mini-batches), strict mode with larger margins, and
the controller's per-step overhead when fed by the registry; and, on the CNN, preconditioned optimizers (Adam,
Adamax, RMSprop, Adagrad) with and without the adaptive controller opted in to all of them. The parts run
independently (two processes halve the wall time).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from _timing import StepTimer, quiet_trainer  # noqa: E402

from lightning_lip import CurvatureLRController, HessianEigenMonitor, LipRegistry  # noqa: E402


def data(full_batch: bool) -> tuple[DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1437], perm[1437:]
    batch = 1437 if full_batch else 64
    return DataLoader(TensorDataset(x[train], y[train]), batch_size=batch, shuffle=not full_batch), (x[val], y[val])


def network(arch: str) -> nn.Module:
    """The MLP 64-128-128-10, or a CNN on the 8x8 images: two 3x3 convolutions (16 and 32 channels, the second of
    stride 2) and a linear classifier."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


class OptedIn(CurvatureLRController):
    """The controller throttling every optimizer it has a threshold for (by default not RMSprop and Adagrad)."""

    CONTROLLED_OPTIMIZERS = tuple(OPTIMIZERS.values())


class Digits(LightningModule):
    def __init__(self, lr: float, method: str, total_steps: int, arch: str = "mlp", optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = network(arch)
        self.lr, self.method, self.total_steps, self.optimizer = lr, method, total_steps, optimizer
        self.diverged = False

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if not torch.isfinite(loss):
            self.diverged = True
            self.trainer.should_stop = True
        return loss

    def configure_optimizers(self):
        if self.method == "adgd":
            return AdGD(self.parameters(), lr=self.lr)
        opt = OPTIMIZERS[self.optimizer](self.parameters(), lr=self.lr)
        if self.method != "warmup":
            return opt
        warm = max(1, self.total_steps // 5)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class AdGD(torch.optim.Optimizer):
    """Adaptive gradient descent (Malitsky & Mishchenko 2020) with the secant taken on one batch: the step is the
    local inverse Lipschitz estimate ``||dx|| / (2 ||g_t(x_t) - g_t(x_{t-1})||)``, grown by at most
    ``sqrt(1 + theta)``, capped at ``lr``. The same-batch secant costs a second gradient per step; the published
    one (different batches in ``dg``) collapses under mini-batch noise."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.step_size, self.theta, self.prev_x = lr * 1e-3, math.inf, None

    @torch.no_grad()
    def step(self, closure):
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.enable_grad():
            loss = closure()
        x = torch.cat([p.reshape(-1) for p in params])
        g = torch.cat([p.grad.reshape(-1) for p in params])
        if self.prev_x is not None:
            torch.nn.utils.vector_to_parameters(self.prev_x, params)
            with torch.enable_grad():
                closure()  # the same batch at the previous point
            g_prev = torch.cat([p.grad.reshape(-1) for p in params])
            torch.nn.utils.vector_to_parameters(x, params)
            dx, dg = (x - self.prev_x).norm(), (g - g_prev).norm()
            local = (dx / (2 * dg)).item() if dg > 0 else math.inf
            new = min(math.sqrt(1 + self.theta) * self.step_size, local, self.param_groups[0]["lr"])
            if new > 0:
                self.theta, self.step_size = new / self.step_size, new
        self.prev_x = x.clone()
        torch.nn.utils.vector_to_parameters(x - self.step_size * g, params)
        return loss


def run(
    lr: float,
    method: str,
    seed: int,
    epochs: int,
    full_batch: bool,
    margin: float = 0.5,
    arch: str = "mlp",
    optimizer: str = "sgd",
) -> float | None:
    """Validation accuracy (%) after training, ``None`` if the loss became non-finite; ``margin`` of the controller."""
    torch.manual_seed(seed)
    train, (xv, yv) = data(full_batch)
    steps = epochs * len(train)
    model = Digits(lr, method, steps, arch, optimizer)
    callbacks: list[Callback] = []
    if method in CurvatureLRController.MODES:
        callbacks = [
            HessianEigenMonitor(
                every_n_steps=5 if full_batch else 10, max_iter=5, num_samples=256, cold_every_n_runs=0
            ),
            OptedIn(mode=method, signal="hessian", margin=margin),
        ]
    trainer = quiet_trainer(max_epochs=epochs, gradient_clip_val=1.0 if method == "clip" else None, callbacks=callbacks)
    trainer.fit(model, train)
    if model.diverged:
        return None
    with torch.no_grad():
        logits = model.net(xv)
    if not torch.isfinite(logits).all():
        return None
    return 100 * (logits.argmax(1) == yv).float().mean().item()


def lr_find_pick(full_batch: bool, arch: str) -> float:
    from lightning.pytorch.tuner import Tuner  # noqa: PLC0415

    torch.manual_seed(0)
    train, _ = data(full_batch)
    model = Digits(0.1, "baseline", 1, arch)
    trainer = quiet_trainer(max_epochs=200)  # enough epochs for 100 full-batch steps
    finder = Tuner(trainer).lr_find(model, train_dataloaders=train, min_lr=1e-4, max_lr=100.0, num_training=100)
    suggestion = finder.suggestion()
    return math.nan if suggestion is None else float(suggestion)


METHODS = ["baseline", "adaptive", "strict", "guard", "clip", "adgd", "warmup"]
COLLAPSED = 50.0  # accuracy (%) below which a run counts as collapsed (chance is 10 %)
FULL_BATCH_STEPS = 150


def cell(accs: list[float | None], show_min: bool = False) -> str:
    """Mean accuracy of the runs that did not diverge (and their minimum), with the count of those that did."""
    ok = [a for a in accs if a is not None]
    if not ok:
        return "div"
    text = f"{statistics.mean(ok):.1f}" + (f" (min {min(ok):.1f})" if show_min else "")
    return text + ("" if len(ok) == len(accs) else f" ({len(accs) - len(ok)} div)")


def sweep(seeds: int, epochs: int, full_batch: bool, lrs: list[float], arch: str = "mlp") -> None:
    label = f"digits {arch.upper()}, " + ("full-batch GD" if full_batch else "SGD, batch 64")
    print(f"\n## {label}, {epochs} epochs, mean validation accuracy (%) over {seeds} seeds\n")
    print("| lr | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    accs: dict[tuple[float, str], list[float | None]] = {}
    for lr in lrs:
        for method in METHODS:
            accs[lr, method] = [run(lr, method, seed, epochs, full_batch, arch=arch) for seed in range(seeds)]
        print(f"| {lr:g} | " + " | ".join(cell(accs[lr, m]) for m in METHODS) + " |", flush=True)
    targets(accs, lrs)
    pick = lr_find_pick(full_batch, arch)
    if math.isnan(pick):
        print("\n`lr_find` made no suggestion.")
        return
    accs = [run(pick, "baseline", seed, epochs, full_batch, arch=arch) for seed in range(seeds)]
    ok = [a for a in accs if a is not None]
    print(
        f"\n`lr_find` suggests lr = {pick:.3g}: baseline at that lr {statistics.mean(ok):.1f}% "
        f"({seeds - len(ok)} diverged)."
        if ok
        else f"\n`lr_find` suggests lr = {pick:.3g}: diverged."
    )


def targets(accs: dict[tuple[float, str], list[float | None]], lrs: list[float]) -> None:
    """Each method against the issue's targets: best mean accuracy over the LRs, the mean at the baseline's best LR
    (and the difference), and the worst seed up to 8x the baseline's largest LR at which no seed collapsed."""

    def mean(a: list[float | None]) -> float:
        return statistics.mean(x if x is not None else 0.0 for x in a)

    def worst(a: list[float | None]) -> float:
        return min(x if x is not None else 0.0 for x in a)

    best_lr = max(lrs, key=lambda lr: mean(accs[lr, "baseline"]))
    stable = max(lr for lr in lrs if worst(accs[lr, "baseline"]) >= COLLAPSED)
    reference = mean(accs[best_lr, "baseline"])
    print(f"\nBaseline: best lr {best_lr:g} ({reference:.1f} %), largest stable lr {stable:g}.\n")
    print(f"| method | best (lr) | at lr {best_lr:g} (vs baseline) | worst seed, lr <= {8 * stable:g} |")
    print("|---|---|---|---|")
    for method in METHODS:
        top = max(lrs, key=lambda lr: mean(accs[lr, method]))
        at_best = mean(accs[best_lr, method])
        low = min(worst(accs[lr, method]) for lr in lrs if lr <= 8 * stable)
        cost = at_best - reference
        print(f"| {method} | {mean(accs[top, method]):.1f} ({top:g}) | {at_best:.1f} ({cost:+.1f}) | {low:.1f} |")


class Feed(HessianEigenMonitor):
    """A monitor that publishes a fixed lambda_max every step and measures nothing: isolates the controller."""

    def on_fit_start(self, *args):
        pass

    def on_train_batch_start(self, trainer, *args):
        LipRegistry.of(trainer).publish("hessian/lambda_max", 1.0, trainer.global_step)

    def on_train_batch_end(self, *args):
        pass


class TimedController(CurvatureLRController):
    """Accumulates the wall time spent in the controller's own hooks (seconds) while ``counting``."""

    spent = 0.0
    counting = False

    def _timed(name):  # noqa: N805
        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            out = getattr(CurvatureLRController, name)(self, *args, **kwargs)
            TimedController.spent += (time.perf_counter() - start) * TimedController.counting
            return out

        return hook

    _before_step = _timed("_before_step")
    _after_step = _timed("_after_step")
    on_before_backward = _timed("on_before_backward")
    on_before_optimizer_step = _timed("on_before_optimizer_step")
    on_train_batch_start = _timed("on_train_batch_start")
    on_train_batch_end = _timed("on_train_batch_end")


class CountFrom(Callback):
    """Turns on the controller's timing from step ``start`` (before the controller's hooks of that step run)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_train_batch_start(self, trainer, *args):
        TimedController.counting = trainer.global_step >= self.start


def overhead(repeats: int) -> None:
    """The controller's own time per step (all its hooks, timed inside the run) against the median step time, both
    in the steady state: after a warm-up of one logging period (the first `self.log` of each metric creates
    Lightning's result metric, ~13 ms once per fit), over six logging periods (`log_every_n_steps = 50`) so that
    the amortized `self.log` is counted."""
    from kappa_overhead import Model, mlp  # noqa: PLC0415  the 784-1024-1024-10 MLP, batch 128, SGD momentum

    digits, _ = data(False)
    warmup, steps = 50, 350
    wide = DataLoader(
        TensorDataset(torch.randn(128 * steps, 784), torch.randint(0, 10, (128 * steps,))), batch_size=128
    )
    cases = [
        ("digits MLP, batch 64", lambda: Digits(0.1, "baseline", 1), digits),
        ("MLP 784-1024-1024-10, batch 128", lambda: Model(mlp()), wide),
    ]
    print("\n## Controller overhead when fed by the registry\n")
    print("| model | median step (ms) | controller per step (µs) | overhead |")
    print("|---|---|---|---|")
    for label, make_model, loader in cases:
        step_times, spent = [], []
        for _ in range(repeats):
            torch.manual_seed(0)
            timer = StepTimer()
            TimedController.spent = 0.0
            callbacks = [CountFrom(warmup), Feed(), TimedController(signal="hessian"), timer]
            trainer = quiet_trainer(max_epochs=-1, max_steps=steps, callbacks=callbacks)
            trainer.fit(make_model(), loader)
            step_times.append(statistics.median(timer.times[warmup:]))
            spent.append(TimedController.spent / (trainer.global_step - warmup))
        step, own = statistics.median(step_times), statistics.median(spent)
        print(f"| {label} | {1e3 * step:.2f} | {1e6 * own:.0f} | {100 * own / step:.2f}% |")


def margin_sweep(seeds: int, epochs: int, margins: list[float], lrs: list[float]) -> None:
    """Strict mode with larger margins (mini-batches): accuracy at the best LRs against collapse at large ones."""
    print(f"\n## Strict mode by margin, batch 64, {epochs} epochs, mean validation accuracy over {seeds} seeds\n")
    print("| margin | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---" * (len(lrs) + 1) + "|")
    for margin in margins:
        accs = [[run(lr, "strict", seed, epochs, False, margin) for seed in range(seeds)] for lr in lrs]
        print(f"| {margin:g} | " + " | ".join(cell(a, show_min=True) for a in accs) + " |")


def paired_cost(seeds: int, lr: float, full_batch: bool, arch: str, epochs: int) -> None:
    """Adaptive mode's cost at ``lr`` (the baseline's best in its table), paired by seed: the 5-seed tables cannot
    resolve a few tenths of a point."""
    diffs = []
    for seed in range(seeds):
        base, ours = (run(lr, method, seed, epochs, full_batch, arch=arch) for method in ("baseline", "adaptive"))
        diffs.append((ours or 0.0) - (base or 0.0))
    mean, error = statistics.mean(diffs), statistics.stdev(diffs) / seeds**0.5
    label = f"digits {arch.upper()}, " + ("full batch" if full_batch else "batch 64")
    print(f"\n## Adaptive minus baseline, {label}, lr {lr:g}, {seeds} paired seeds\n")
    print(
        f"mean {mean:+.2f} points, standard error {error:.2f}, median {statistics.median(diffs):+.2f}, "
        f"range {min(diffs):+.1f} to {max(diffs):+.1f}"
    )


def optimizer_sweep(seeds: int, epochs: int) -> None:
    """Digits CNN with mini-batches: preconditioned optimizers over a decade below and above a usual LR, without and
    with the adaptive controller (opted in for all)."""
    grid = {"adam": [1e-3, 1e-2, 1e-1], "adamax": [2e-3, 2e-2, 2e-1], "rmsprop": [1e-3, 1e-2, 1e-1]}
    grid["adagrad"] = [1e-2, 1e-1, 1.0]
    print(f"\n## Preconditioned optimizers, digits CNN, batch 64, {epochs} epochs, {seeds} seeds\n")
    print("| optimizer | lr | baseline | adaptive controller |")
    print("|---|---|---|---|")
    for optimizer, lrs in grid.items():
        for lr in lrs:
            cells = [
                cell([run(lr, m, s, epochs, False, arch="cnn", optimizer=optimizer) for s in range(seeds)], True)
                for m in ("baseline", "adaptive")
            ]
            print(f"| {optimizer} | {lr:g} | {cells[0]} | {cells[1]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--paired-seeds", type=int, default=60)
    parts = ["minibatch", "cnn", "fullbatch", "paired", "paired-cnn", "margins", "overhead", "optimizers"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "minibatch" in args.parts:
        sweep(args.seeds, args.epochs, False, [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    if "cnn" in args.parts:
        sweep(args.seeds, args.epochs, False, [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], arch="cnn")
    if "fullbatch" in args.parts:
        sweep(args.seeds, FULL_BATCH_STEPS, True, [0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    if "paired" in args.parts:
        paired_cost(args.paired_seeds, 0.5, True, "mlp", FULL_BATCH_STEPS)
    if "paired-cnn" in args.parts:
        paired_cost(args.paired_seeds, 0.5, False, "cnn", args.epochs)
    if "margins" in args.parts:
        margin_sweep(args.seeds, args.epochs, [0.5, 0.7, 0.9], [0.3, 1.0, 4.0, 32.0])
    if "overhead" in args.parts:
        overhead(5)
    if "optimizers" in args.parts:
        optimizer_sweep(args.seeds, args.epochs)


if __name__ == "__main__":
    main()
