"""2-process DDP run of CurvatureLRController fed a rank-dependent signal; each rank saves the LRs it used."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import CurvatureLRController, LipRegistry
from tests.callbacks.test_lr_controller import FixedSignal, RecordingSGD
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, loader, mlp, random_data


class RankSignal(FixedSignal):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lam = 40.0 if trainer.global_rank == 1 else 10.0  # rank 1 sees more curvature: max must win everywhere
        LipRegistry.of(trainer).publish("hessian/lambda_max", lam, trainer.global_step)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 4)), lr=0.1)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=0.1)
    controller = CurvatureLRController()  # adaptive: the ranks' different losses must give the same bounds
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[RankSignal(None), controller]))
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8))
    used = model.optimizers().optimizer.used
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {
        "states": [vars(s) for s in controller.states],
        "loss_ema": controller.loss_ema,
        "n_spikes": controller.n_spikes,
    }
    save_rank(trainer, out, {"used": used, "params": params, "controller": state})
