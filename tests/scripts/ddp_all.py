"""2-process DDP run of all four callbacks; each rank saves the LRs it used, its parameters, the metrics, what a
``ModelCheckpoint`` read and the warnings about syncing our metrics. With the argument ``weight_norm``, every layer
of the CNN is weight-normalized (a parametrization)."""

import sys
import warnings

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.callbacks.test_lr_controller import RecordingSGD
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import cnn, loader, random_data
from tests.test_composition import Evaluated, four

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = cnn()
    if sys.argv[2:] == ["weight_norm"]:
        for i in (0, 2, 5):
            torch.nn.utils.parametrizations.weight_norm(net[i])
    model = Evaluated(net, lr=2.0)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=2.0, momentum=0.5)
    callbacks = four()
    checkpoint = ModelCheckpoint(out, monitor="lip/kappa/bound", mode="max")
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[*callbacks, checkpoint], max_epochs=2, enable_checkpointing=True))
    data = loader(random_data(64, (1, 8, 8)), batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data, data)
    kappa, monitor, noise, controller = callbacks
    metrics = {
        "sigmas": kappa.sigmas,
        "hessian": {k: v for k, v in monitor.last.items() if k != "lip/hessian/seconds"},
        "noise": {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")},
        "throttle": [vars(s) for s in controller.states],
        "monitored": (checkpoint.best_model_score.item(), trainer.callback_metrics["lip/lr/throttle"].item()),
        "sync_warnings": [str(w.message) for w in caught if "sync_dist" in str(w.message) and "lip/" in str(w.message)],
    }
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_rank(trainer, out, {"used": model.optimizers().optimizer.used, "params": params, "metrics": metrics})
