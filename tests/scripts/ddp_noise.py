"""2-process DDP run of GradientNoiseEstimator, with gradient clipping that binds; each rank saves its last metrics,
batch shard and parameters, and the steps a time-budgeted estimator measured when the ranks' clocks disagree (rank 0
always within budget)."""

import os
import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import GradientNoiseEstimator
from lightning_lip.callbacks._state import TimeBudget
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, loader, mlp, random_data


class LastBatch(GradientNoiseEstimator):
    def measure(self, trainer, pl_module, optimizer, batch, step_batch):
        self.seen = ([t.clone() for t in batch], {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        return super().measure(trainer, pl_module, optimizer, batch, step_batch)


class Steps(GradientNoiseEstimator):
    def measure(self, trainer, pl_module, optimizer, batch, step_batch):
        self.steps.append(trainer.global_step + 1)
        return super().measure(trainer, pl_module, optimizer, batch, step_batch)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 4)), lr=0.1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    TimeBudget.allows = lambda self, now: rank == 0
    data = loader(random_data(64, (8,)), batch_size=8)
    noise = LastBatch(every_n_steps=2)
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[noise], max_epochs=5, gradient_clip_val=0.05))
    trainer.fit(model, data)  # 20 steps; measured before every even one
    budgeted = Steps(layers=["net.0"])  # a Trainer takes one estimator: a second fit, of another model
    budgeted.steps = []
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[budgeted], max_epochs=5))
    trainer.fit(Classifier(mlp((8, 12, 4)), lr=0.1), data)
    (x, y), params = noise.seen
    last = {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")}
    save_rank(trainer, out, {"last": last, "x": x, "y": y, "params": params, "budgeted_steps": budgeted.steps})
