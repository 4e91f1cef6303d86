"""Train a small CNN on scikit-learn's handwritten digits (8x8, offline) with all four lightning_lip callbacks.

    python examples/digits.py [--max-epochs 20] [--lr 0.05]

KappaBudgetProjection caps the network's Lipschitz bound, HessianEigenMonitor tracks lambda_max against the
optimizer's stability threshold, GradientNoiseEstimator measures the gradient noise and predicts the drift of
the bound, and CurvatureLRController throttles the learning rate when lr * lambda_max nears the threshold.
Prints a summary and the ``tensorboard --logdir ...`` line that opens the run's curves.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import (
    CurvatureLRController,
    GradientNoiseEstimator,
    HessianEigenMonitor,
    KappaBudgetProjection,
    LipRegistry,
)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train/validation loaders of the 1797 digits as ``[1, 8, 8]`` images scaled to [0, 1]; 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, val = perm[:cut], perm[cut:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


class DigitsDataModule(LightningDataModule):
    """The digits loaders as a data module, for LightningCLI (``examples/cli.py``)."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return digits_loaders(self.batch_size, self.seed)[0]

    def val_dataloader(self) -> DataLoader:
        return digits_loaders(self.batch_size, self.seed)[1]


class DigitsCNN(LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def callbacks(max_lipschitz: float) -> list:
    """The four callbacks with cadences suited to this ~25-steps-per-epoch run."""
    return [
        KappaBudgetProjection(max_lipschitz=max_lipschitz),
        HessianEigenMonitor(every_n_steps=25, max_iter=20, density=True),
        GradientNoiseEstimator(every_n_steps=25),
        CurvatureLRController(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-lipschitz", type=float, default=20.0)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()

    seed_everything(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, val = digits_loaders()
    kappa, monitor, noise, controller = cbs = callbacks(args.max_lipschitz)
    logger = TensorBoardLogger(args.logdir, name="digits")
    trainer = Trainer(max_epochs=args.max_epochs, logger=logger, callbacks=cbs, log_every_n_steps=5)
    trainer.fit(DigitsCNN(lr=args.lr), train, val)

    registry = LipRegistry.of(trainer)
    acc = trainer.callback_metrics["val/acc"].item()
    state = controller.states[0]
    print("\nSummary")
    print(f"  validation accuracy          {acc:.3f}")
    print(
        f"  lr * lambda_max / threshold  {monitor.last['lip/hessian/eta_lambda_max']:.3f} / "
        f"{monitor.last['lip/hessian/threshold']:.1f}  (lambda_max {registry.get('hessian/lambda_max'):.3f})"
    )
    print(f"  Lipschitz bound prod(σ_l)    {kappa.bound:.3f}  (budget {args.max_lipschitz})")
    print(f"  noise scale B_noise          {registry.get('noise/scale'):.1f}  (batch 64)")
    print(
        f"  LR throttle                  {state.throttle:.3f}  ({state.n_cuts} cuts, {state.n_recoveries} recoveries)"
    )
    print(f"\nOpen the curves with:\n  tensorboard --logdir {logger.log_dir}")


if __name__ == "__main__":
    main()
