"""Edge of stability (Cohen et al. 2021): under full-batch GD, lambda_max rises until it hovers at 2 / lr.

    python examples/edge_of_stability.py [--steps 600] [--lr 1.0]

Trains a tanh MLP on 512 sklearn digits with full-batch gradient descent twice: plain, where the sharpness
lambda_max climbs to the stability threshold 2 / lr and hovers there, and with CurvatureLRController in strict
mode, which keeps lr_eff * lambda_max under margin * 2 by throttling the learning rate. HessianEigenMonitor
measures lambda_max in both. Prints lambda_max, lr_eff * lambda_max and the loss along the way, and the
TensorBoard line.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import CurvatureLRController, HessianEigenMonitor


class FullBatchMLP(LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), F.one_hot(y, 10).float())  # MSE, as in Cohen et al.: sharpening is clear
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Trace(Callback):
    """Keeps (step, lambda_max, lr_eff * lambda_max, loss) at every measurement."""

    def __init__(self, monitor: HessianEigenMonitor) -> None:
        self.monitor, self.rows = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = self.monitor.last
        if metrics and trainer.global_step % self.monitor.every_n_steps == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            throttle = trainer.callback_metrics.get("lip/lr/throttle", torch.tensor(1.0)).item()
            lam = metrics["lip/hessian/lambda_max"]
            self.rows.append((trainer.global_step, lam, lr * throttle * lam, outputs["loss"].item()))


def train(lr: float, steps: int, controlled: bool, logdir: str) -> list[tuple]:
    seed_everything(0)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x[:512], dtype=torch.float32) / 16, torch.tensor(y[:512]))
    monitor = HessianEigenMonitor(every_n_steps=20, max_iter=30, num_samples=512)
    trace = Trace(monitor)
    callbacks = [monitor, trace] + ([CurvatureLRController(mode="strict", margin=0.9)] if controlled else [])
    name = "eos_controlled" if controlled else "eos_plain"
    trainer = Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name=name),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(FullBatchMLP(lr), DataLoader(data, batch_size=512))
    return trace.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    plain = train(args.lr, args.steps, False, args.logdir)
    controlled = train(args.lr, args.steps, True, args.logdir)
    print(f"\nFull-batch GD, lr = {args.lr}: threshold lr * lambda_max = 2 (lambda_max = {2 / args.lr:.2f})")
    header = f"{'plain: λ_max':>13} {'lr·λ_max':>9} {'loss':>8} | {'strict: λ_max':>14} {'lr_eff·λ':>9} {'loss':>8}"
    print(f"{'step':>6} | {header}")
    for (step, lam, ratio, loss), (_, lam_c, ratio_c, loss_c) in zip(plain, controlled):
        print(f"{step:>6} | {lam:>13.3f} {ratio:>9.3f} {loss:>8.4f} | {lam_c:>14.3f} {ratio_c:>9.3f} {loss_c:>8.4f}")
    print(f"\nOpen the curves with:\n  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
