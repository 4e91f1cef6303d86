"""A Wasserstein GAN whose critic KappaBudgetProjection keeps 1-Lipschitz, on a ring of eight Gaussians.

    python examples/wgan.py [--max-epochs 30] [--clip 0.01]

The critic estimates the Wasserstein-1 distance only while it is 1-Lipschitz. The original WGAN clips every weight
to ``[-c, c]`` (``--clip c``), which bounds the critic's gain loosely and leaves its true bound unknown; here the
projection caps the product of the critic's layer norms at 1, a certified bound. ``layers=["critic"]`` projects the
critic's layers only (the bound is the critic's), and the generator's steps, taken by the other optimizer, do not
re-measure it. Every few epochs the script prints the critic's bound ``prod sigma_l`` (measured densely), its
largest input-gradient norm on real and generated points (a lower bound of its Lipschitz constant, so never above the
bound), the critic's estimate of the distance, and how many of the eight modes the generator covers (a mode holding
at least a quarter of its share of 2048 generated points within 0.25 of it). With the projection (30 epochs, one
CPU thread, ~15 s) the bound stays at 1 (up to the per-step estimate's 1e-3) and the generator covers 6-7 of the 8
modes; with ``--clip 0.01`` the critic's bound falls to 0.001-0.006, its gradients vanish, and the generator covers
0-2.
"""

from __future__ import annotations

import argparse
import math

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import KappaBudgetProjection

MODES = torch.tensor([[2 * math.cos(k * math.pi / 4), 2 * math.sin(k * math.pi / 4)] for k in range(8)])


def ring(n: int, generator: torch.Generator, std: float = 0.05) -> torch.Tensor:
    """``[n, 2]`` points from eight Gaussians of standard deviation ``std`` on a circle of radius 2."""
    return MODES[torch.randint(0, 8, (n,), generator=generator)] + std * torch.randn(n, 2, generator=generator)


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class WGAN(LightningModule):
    """Manual optimization: the critic steps on every batch, the generator on every ``n_critic``-th."""

    def __init__(self, lr: float = 1e-3, n_critic: int = 1, clip: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr, self.n_critic, self.clip = lr, n_critic, clip
        self.generator = mlp(2, 64, 64, 2)
        self.critic = mlp(2, 128, 128, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        critic_opt, generator_opt = self.optimizers()
        real = batch[0]
        fake = self.generator(torch.randn_like(real)).detach()
        distance = self.critic(real).mean() - self.critic(fake).mean()
        critic_opt.zero_grad()
        self.manual_backward(-distance)
        critic_opt.step()
        if self.clip is not None:
            with torch.no_grad():
                for p in self.critic.parameters():
                    p.clamp_(-self.clip, self.clip)
        if batch_idx % self.n_critic == 0:
            generator_opt.zero_grad()
            self.manual_backward(-self.critic(self.generator(torch.randn_like(real))).mean())
            generator_opt.step()
        self.log("distance", distance, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        betas = (0.5, 0.9)
        return (
            torch.optim.Adam(self.critic.parameters(), self.lr, betas=betas),
            torch.optim.Adam(self.generator.parameters(), self.lr, betas=betas),
        )


class Report(Callback):
    """Every ``every`` epochs: the critic's dense bound and largest input-gradient norm, the distance, modes covered."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_epoch_end(self, trainer: Trainer, pl_module: WGAN) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        linear = [m for m in pl_module.critic if isinstance(m, nn.Linear)]
        bound = math.prod(torch.linalg.matrix_norm(m.weight.detach(), 2).item() for m in linear)
        generator = torch.Generator().manual_seed(epoch)  # the training's random stream stays untouched
        with torch.no_grad():
            fake = pl_module.generator(torch.randn(2048, 2, generator=generator))
        points = torch.cat([ring(2048, generator), fake]).requires_grad_()
        (grad,) = torch.autograd.grad(pl_module.critic(points).sum(), points)
        nearest = torch.cdist(fake, MODES).min(1)
        covered = int((torch.bincount(nearest.indices[nearest.values < 0.25], minlength=8) > 2048 / 8 / 4).sum())
        print(
            f"epoch {epoch:3d}   critic bound {bound:.4f}   max |grad| {grad.norm(dim=1).max().item():.4f}   "
            f"distance {trainer.callback_metrics['distance'].item():.3f}   modes covered {covered}/8"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--clip", type=float, default=None, help="weight clipping instead of the projection")
    args = parser.parse_args()
    seed_everything(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    callbacks: list[Callback] = [Report(every=max(1, args.max_epochs // 5))]
    if args.clip is None:
        callbacks.append(KappaBudgetProjection(max_lipschitz=1.0, layers=["critic"]))
    trainer = Trainer(
        max_epochs=args.max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = TensorDataset(ring(8192, torch.Generator().manual_seed(0)))
    trainer.fit(WGAN(clip=args.clip), DataLoader(data, batch_size=256, shuffle=True))


if __name__ == "__main__":
    main()
