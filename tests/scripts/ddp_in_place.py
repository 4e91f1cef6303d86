"""2-process DDP run of GradientNoiseEstimator and HessianEigenMonitor(data="current") on a model that halves its
batch in place on rank 1 and out of place on rank 0; each rank saves the measurements' counts and last values."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import GradientNoiseEstimator, HessianEigenMonitor
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import HalvesItsInput, loader, mlp, random_data

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = HalvesItsInput(mlp((8, 6, 3)), ranks=(1,), lr=0.01)
    callbacks = GradientNoiseEstimator(every_n_steps=2), HessianEigenMonitor(every_n_steps=2, data="current")
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=list(callbacks), max_epochs=2))
    trainer.fit(model, loader(random_data(64, (8,), 3), batch_size=8))
    drop = ("lip/noise/seconds", "lip/noise/overhead", "lip/hessian/seconds")
    result = {
        "n_skipped": tuple(c.n_skipped for c in callbacks),
        "n_runs": tuple(c.n_runs for c in callbacks),
        "copy_batches": tuple(c.state_dict()["copy_batches"] for c in callbacks),
        "last": [{k: v for k, v in c.last.items() if k not in drop} for c in callbacks],
    }
    save_rank(trainer, out, result)
