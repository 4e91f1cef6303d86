"""2-process DDP run of KappaBudgetProjection; each rank saves its weights after every projection."""

import sys

import torch
from lightning.pytorch import Callback, Trainer

from lightning_lip import KappaBudgetProjection
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, cnn, loader, random_data


class RecordWeights(Callback):
    def __init__(self, projection):
        self.projection = projection
        self.weights = []
        self.lengths = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1 and trainer.global_rank == 1:
            # Make rank 1's warm vectors differ from rank 0's: identical results can then only come from
            # decisions that are shared across ranks, not from identical local arithmetic.
            state = self.projection.state_dict()
            state["vectors"] = {k: v + 0.3 * torch.randn_like(v) for k, v in state["vectors"].items()}
            self.projection.load_state_dict(state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.lengths.append(batch[0].shape[-1])


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(cnn(), lr=0.5)
    projection = KappaBudgetProjection(max_lipschitz=0.5)
    record = RecordWeights(projection)
    trainer = Trainer(**ddp_trainer_kwargs(max_epochs=2, callbacks=[projection, record]))
    trainer.fit(model, loader(random_data(64, (1, 8, 8)), batch_size=8))
    save_rank(
        trainer, out, {"weights": record.weights, "n_projections": projection.n_projections, "bound": projection.bound}
    )
