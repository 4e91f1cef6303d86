"""2-process DDP runs of all four callbacks with SGD (momentum) and Adam, each as a plain optimizer and wrapped in
``ZeroRedundancyOptimizer`` (each rank holds the state of its shard of the parameters); each rank saves, per run,
its parameters, the last measurements, the throttle states and whether the Hessian was preconditioned."""

import sys

import torch
from lightning.pytorch import Trainer
from torch.distributed.optim import ZeroRedundancyOptimizer

from lightning_lip import LipRegistry
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, cnn, loader, random_data
from tests.test_composition import four

OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.5, momentum=0.5)), "adam": (torch.optim.Adam, dict(lr=1e-2))}


def run(name: str, zero: bool) -> tuple[Trainer, dict]:
    torch.manual_seed(0)
    model = Classifier(cnn())
    cls, kwargs = OPTIMIZERS[name]
    if zero:
        model.configure_optimizers = lambda: ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    else:
        model.configure_optimizers = lambda: cls(model.parameters(), **kwargs)
    callbacks = four()
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=callbacks, max_epochs=2))
    trainer.fit(model, loader(random_data(64, (1, 8, 8)), batch_size=8))
    _, monitor, noise, controller = callbacks
    return trainer, {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hessian": {k: v for k, v in monitor.last.items() if k != "lip/hessian/seconds"},
        "noise": {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")},
        "throttle": [vars(s) for s in controller.states],
        "preconditioned": LipRegistry.of(trainer).get("hessian/preconditioned"),
    }


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    runs = {}
    for name in OPTIMIZERS:
        for zero in (False, True):
            trainer, runs[f"{name}/{'zero' if zero else 'plain'}"] = run(name, zero)
    save_rank(trainer, out, runs)
