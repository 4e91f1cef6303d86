"""2-process DDP run of all four callbacks on a loss that raises inside the measurements on rank 1 only (in eval
mode, as they run it); each rank saves the LRs it used, its parameters and why its measurements stopped."""

import sys

import torch
from lightning.pytorch import Trainer

from tests.callbacks.test_lr_controller import RecordingSGD
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, cnn, loader, random_data
from tests.test_composition import four


class FailsOnRank1(Classifier):
    def training_step(self, batch, batch_idx):
        if not self.training and self.global_rank == 1:
            raise KeyError("only on rank 1")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FailsOnRank1(cnn(), lr=2.0, optimizer=lambda params: RecordingSGD(params, lr=2.0, momentum=0.5))
    kappa, monitor, noise, controller = callbacks = four()
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=callbacks, max_epochs=2))
    trainer.fit(model, loader(random_data(64, (1, 8, 8)), batch_size=8))
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = {"used": model.optimizers().optimizer.used, "params": params, "global_step": trainer.global_step}
    save_rank(
        trainer, out, result | {"failures": (monitor.failure, noise.failure), "runs": (monitor.n_runs, noise.n_runs)}
    )
