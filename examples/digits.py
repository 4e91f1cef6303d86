"""Train a small CNN on scikit-learn's handwritten digits (8x8, offline) with lightning_lip's callbacks.

    python examples/digits.py [--max-epochs 10]

Prints a summary and the ``tensorboard --logdir ...`` line that opens the run's curves.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import KappaBudgetProjection


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--max-lipschitz", type=float, default=20.0)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()

    seed_everything(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, val = digits_loaders()
    kappa = KappaBudgetProjection(max_lipschitz=args.max_lipschitz)
    logger = TensorBoardLogger(args.logdir, name="digits")
    trainer = Trainer(max_epochs=args.max_epochs, logger=logger, callbacks=[kappa], log_every_n_steps=5)
    trainer.fit(DigitsCNN(), train, val)

    acc = trainer.callback_metrics["val/acc"].item()
    print("\nSummary")
    print(f"  validation accuracy       {acc:.3f}")
    print(f"  Lipschitz bound prod(σ_l) {kappa.bound:.3f}  (budget {args.max_lipschitz})")
    print(f"  projections               {kappa.n_projections}")
    print(f"\nOpen the curves with:\n  tensorboard --logdir {logger.log_dir}")


if __name__ == "__main__":
    main()
