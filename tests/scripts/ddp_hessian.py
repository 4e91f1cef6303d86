"""2-process DDP run of HessianEigenMonitor; each rank saves its result, probe shard and final parameters.

With the argument ``uneven``, rank 1's probe holds half as many samples as rank 0's."""

import os
import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import HessianEigenMonitor
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, loader, mlp, random_data

if __name__ == "__main__":
    out, uneven = sys.argv[1], sys.argv[2:] == ["uneven"]
    rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning launches rank 1 with it set
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 12, 4)), lr=0.1)
    # 64 samples, 2 ranks, batch 8: 4 steps an epoch; the probe is each rank's first 16 samples (8 on rank 1 if
    # uneven); the last measurement (step 4) sees the final parameters.
    num_samples = 8 if uneven and rank == 1 else 16
    monitor = HessianEigenMonitor(every_n_steps=2, num_samples=num_samples, tol=1e-6, max_iter=200, converge_min=True)
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[monitor]))
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8))
    save_rank(
        trainer,
        out,
        {
            "lambda_max": monitor.last["lip/hessian/lambda_max"],
            "lambda_min": monitor.last["lip/hessian/lambda_min"],
            "x": torch.cat([b[0] for b in monitor._probe]),
            "y": torch.cat([b[1] for b in monitor._probe]),
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
    )
