"""Tiny models and data shared by the tests, the DDP scripts and the examples of the test suite."""

from __future__ import annotations

import random
from collections import UserDict

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import GradientNoiseEstimator


def mlp(sizes: tuple[int, ...] = (16, 32, 32, 4)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(channels: int = 1, classes: int = 4, padding_mode: str = "circular") -> nn.Sequential:
    """For 8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, classes),
    )


def conv1d(padding_mode: str = "zeros", classes: int = 3) -> nn.Sequential:
    """For ``[B, 2, L]`` sequences of any length ``L``."""
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    )


def sequences(lengths: tuple[int, ...] = (9, 16, 5, 12, 7, 11), batch: int = 8, classes: int = 3) -> DataLoader:
    """Batches of ``batch`` sequences ``[batch, 2, L]``, one length ``L`` per batch, as a loader that does not batch
    (``batch_size=None``: its items are the batches)."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, 2, n, generator=g), torch.randint(0, classes, (batch,), generator=g)) for n in lengths
    ]
    return DataLoader(batches, batch_size=None)


class Aliased(nn.Module):
    """``backbone`` is ``net[0]``: one module registered under two names, as ``BackboneFinetuning`` asks for a
    ``backbone`` of a network; a BatchNorm in it, for ``[B, 6]``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU()), nn.Linear(10, classes))
        self.backbone = self.net[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyTransformer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (scaled dot-product attention) and a linear head, for ``[B, 5, 8]``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(1))


class TinyRNN(nn.Module):
    """A recurrent layer (``nn.GRU``, ``nn.LSTM`` or ``nn.RNN``, hidden size 6) and a linear head on its last
    output, for ``[B, 5, 8]``."""

    def __init__(self, cell: str = "GRU", classes: int = 3, num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(8, 6, num_layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(12 if bidirectional else 6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _ReLUWithoutSetupContext(torch.autograd.Function):
    """An old-style ``autograd.Function`` (``forward(ctx, ...)``): torch.func transforms refuse it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class OldStyleReLU(nn.Module):
    """``relu`` through an old-style ``autograd.Function``, which torch.func's transforms refuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLUWithoutSetupContext.apply(x)


class SamePaddingConv2d(nn.Conv2d):
    """timm's ``Conv2dSame``: ``'same'`` padding worked out in ``forward`` (asymmetric at stride 2), the module's own
    ``padding`` 0: its operator is not that of ``nn.Conv2d`` with these attributes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Classifier(LightningModule):
    """Cross-entropy classifier around ``net`` with plain SGD (``momentum`` optional), or the optimizer that
    ``optimizer(parameters)`` makes, over the parameters that require grad."""

    def __init__(self, net: nn.Module, lr: float = 0.1, momentum: float = 0.0, optimizer=None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.make_optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.make_optimizer is not None:
            return self.make_optimizer(params)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


class HalvesItsInput(Classifier):
    """Halves its input in ``training_step``: in place (``x *= 0.5``, as ``x /= 255`` normalizes a batch) where
    ``in_place`` and the process's rank is in ``ranks`` (every rank by default), else out of place; the same loss
    either way."""

    def __init__(self, net: nn.Module, in_place: bool = True, ranks: tuple[int, ...] | None = None, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.in_place, self.ranks = in_place, ranks

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.in_place and (self.ranks is None or self.global_rank in self.ranks):
            x *= 0.5
        else:
            x = x * 0.5
        return super().training_step((x, y), batch_idx)


class OverflowsAt(Classifier):
    """A classifier whose loss is multiplied by ``1e30`` at the steps in ``overflow_steps``: under a GradScaler the
    half-precision backward overflows there, and the scaler skips the step. Records each step's loss and the
    scaler's scale when the batch ends, and the global steps whose ``optimizer.step`` ran."""

    def __init__(self, net: nn.Module, overflow_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.overflow_steps = overflow_steps
        self.losses, self.scales, self.stepped = [], [], []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if self.trainer.global_step in self.overflow_steps else loss

    def on_fit_start(self):
        self.optimizers().optimizer.register_step_post_hook(lambda *_: self.stepped.append(self.trainer.global_step))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())


def fp16_grad_scaler(**kwargs) -> MixedPrecision:
    """``precision="16-mixed"`` on CPU (float16 autocast and a GradScaler, ``kwargs`` its arguments), which the
    Trainer's flag turns into bfloat16 there."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **kwargs))


class GAN(LightningModule):
    """A Wasserstein GAN by manual optimization on 8-d samples: each batch steps the critic, then the generator, by
    their own optimizers (the critic's first); ``lip_loss`` is the critic's loss."""

    def __init__(self, critic_activation: nn.Module | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 32), critic_activation or nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def lip_loss(self, batch):
        fake = self.generator(torch.randn(len(batch[0]), 4)).detach()
        return self.critic(fake).mean() - self.critic(batch[0]).mean()

    def training_step(self, batch, batch_idx):
        critic_opt, generator_opt = self.optimizers()
        critic_opt.zero_grad()
        self.manual_backward(self.lip_loss(batch))
        critic_opt.step()
        generator_opt.zero_grad()
        self.manual_backward(-self.critic(self.generator(torch.randn(len(batch[0]), 4))).mean())
        generator_opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.critic.parameters(), 1e-2), torch.optim.Adam(self.generator.parameters(), 1e-2)


class Finetuned(Classifier):
    """``backbone`` is ``net[0]``, as ``BackboneFinetuning`` asks: it freezes it at setup and adds it to the optimizer
    as a param group when it unfreezes it."""

    def __init__(self, net: nn.Module, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.backbone = self.net[0]


class Encoding(UserDict):
    """A mapping with an attribute of its own, like a tokenizer's ``BatchEncoding``."""

    def __init__(self, data=None, source=None):
        super().__init__(data)
        self.source = source


class NoisyInputs:
    """Mixin for a classifier whose training step augments its inputs with noise drawn from torch's and Python's
    random generators, as data augmentation in ``training_step`` does."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x + random.uniform(0.05, 0.1) * torch.randn_like(x), y), batch_idx)


class BuiltInConfigureModel(Classifier):
    """A ``Classifier`` whose network ``make()`` creates in ``configure_model`` (seeded with 0), which Lightning
    calls after the callbacks' ``setup``."""

    def __init__(self, make, **kwargs) -> None:
        super().__init__(None, **kwargs)
        self.make = make

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = self.make()


def random_data(n: int = 64, shape: tuple[int, ...] = (16,), classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def loader(dataset: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


class PairedNoiseEstimator(GradientNoiseEstimator):
    """Records the steps for which it ``predicted`` the change of the layer norms and those it ``observed``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.predicted: list[int] = []
        self.observed: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._expected is not None:
            self.predicted.append(trainer.global_step)

    def _on_optimizer_step(self, trainer, optimizer, args, kwargs):
        if self._expected is not None:
            self.observed.append(trainer.global_step)
        super()._on_optimizer_step(trainer, optimizer, args, kwargs)
