"""2-process DDP run of HessianEigenMonitor; each rank saves its result, probe shard and final parameters."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import HessianEigenMonitor
from tests.ddp import ddp_trainer_kwargs
from tests.models import Classifier, loader, mlp, random_data

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 12, 4)), lr=0.1)
    # 64 samples, 2 ranks, batch 8: 4 steps an epoch; the probe is each rank's first 16 samples; the last
    # measurement (step 4) sees the final parameters.
    monitor = HessianEigenMonitor(every_n_steps=2, num_samples=16, tol=1e-6, max_iter=200, converge_min=True)
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[monitor]))
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8))
    torch.save(
        {
            "lambda_max": monitor.last["lip/hessian/lambda_max"],
            "lambda_min": monitor.last["lip/hessian/lambda_min"],
            "x": torch.cat([b[0] for b in monitor._probe]),
            "y": torch.cat([b[1] for b in monitor._probe]),
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )
