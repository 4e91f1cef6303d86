"""2-process DDP run of all four callbacks; each rank saves the LRs it used, its parameters and the metrics. With the
argument ``weight_norm``, every layer of the CNN is weight-normalized (a parametrization)."""

import sys

import torch
from lightning.pytorch import Trainer

from tests.callbacks.test_lr_controller import RecordingSGD
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, cnn, loader, random_data
from tests.test_composition import four

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = cnn()
    if sys.argv[2:] == ["weight_norm"]:
        for i in (0, 2, 5):
            torch.nn.utils.parametrizations.weight_norm(net[i])
    model = Classifier(net, lr=2.0)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=2.0, momentum=0.5)
    callbacks = four()
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=callbacks, max_epochs=2))
    trainer.fit(model, loader(random_data(64, (1, 8, 8)), batch_size=8))
    kappa, monitor, noise, controller = callbacks
    metrics = {
        "sigmas": kappa.sigmas,
        "hessian": {k: v for k, v in monitor.last.items() if k != "lip/hessian/seconds"},
        "noise": {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")},
        "throttle": [vars(s) for s in controller.states],
    }
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_rank(trainer, out, {"used": model.optimizers().optimizer.used, "params": params, "metrics": metrics})
