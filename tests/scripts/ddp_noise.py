"""2-process DDP run of GradientNoiseEstimator; each rank saves its last metrics, batch shard and parameters."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import GradientNoiseEstimator
from tests.ddp import ddp_trainer_kwargs
from tests.models import Classifier, loader, mlp, random_data


class LastBatch(GradientNoiseEstimator):
    def measure(self, trainer, pl_module, optimizer, batch, step_batch):
        self.seen = ([t.clone() for t in batch], {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        return super().measure(trainer, pl_module, optimizer, batch, step_batch)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 4)), lr=0.1)
    noise = LastBatch(every_n_steps=2)
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[noise]))
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8))  # 4 steps; measured before steps 2 and 4
    (x, y), params = noise.seen
    last = {k: v for k, v in noise.last.items() if k != "lip/noise/seconds"}
    torch.save({"last": last, "x": x, "y": y, "params": params}, f"{out}/rank{trainer.global_rank}.pt")
