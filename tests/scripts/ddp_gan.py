"""2-process DDP run of a GAN (two optimizers stepping in turn) with all four callbacks: the projection on the critic
alone, the estimator on the critic's steps, the monitor and the controller on the critic's optimizer (the first).
Each rank saves its weights, the counts and the z-scores."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import CurvatureLRController, GradientNoiseEstimator, HessianEigenMonitor, KappaBudgetProjection
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import GAN, loader, random_data


class CriticSteps(GradientNoiseEstimator):
    """Measures the critic's steps (odd: it steps first on every batch) and keeps each observation's z-scores."""

    def should_run(self, step):
        return step % 4 == 1

    def _observe(self, expected):
        super()._observe(expected)
        self.zscores.append({k: v for k, v in self._pending.items() if "/zscore/" in k})


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    noise = CriticSteps(every_n_steps=1, layers=["critic"])
    noise.zscores = []
    kappa, controller = KappaBudgetProjection(max_lipschitz=1.0, layers=["critic"]), CurvatureLRController()
    callbacks = [kappa, noise, HessianEigenMonitor(every_n_steps=4), controller]
    trainer = Trainer(
        **ddp_trainer_kwargs(max_epochs=2, callbacks=callbacks, strategy="ddp_find_unused_parameters_true")
    )
    model = GAN()
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8))
    result = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "n_projections": kappa.n_projections,
        "bound": kappa.bound,
        "zscores": noise.zscores,
        "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        "throttle": controller.states[0].throttle,
        "global_step": trainer.global_step,
    }
    save_rank(trainer, out, result)
