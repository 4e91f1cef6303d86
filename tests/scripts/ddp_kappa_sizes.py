"""2-process DDP run of KappaBudgetProjection and GradientNoiseEstimator on sequences whose lengths differ between
the ranks (rank 0 runs the short ones, rank 1 the long ones); each rank saves its weights after every projection,
the shapes it measured on and the estimator's last metrics."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import GradientNoiseEstimator, KappaBudgetProjection
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, conv1d, sequences
from tests.scripts.ddp_kappa import RecordWeights

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(conv1d(), lr=0.05)
    projection = KappaBudgetProjection(max_lipschitz=0.5, audit_every_n_steps=0)
    noise = GradientNoiseEstimator(every_n_steps=2)
    record = RecordWeights(projection)
    callbacks = [projection, noise, record]
    trainer = Trainer(**ddp_trainer_kwargs(max_epochs=2, callbacks=callbacks, use_distributed_sampler=False))
    trainer.fit(model, sequences((5, 9, 7) if trainer.global_rank == 0 else (16, 12, 11)))
    save_rank(
        trainer,
        out,
        {
            "weights": record.weights,
            "shapes": projection._shapes.shapes,
            "kappas": projection._current_kappas,
            "lengths_seen": record.lengths,
            "noise": {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")},
        },
    )
