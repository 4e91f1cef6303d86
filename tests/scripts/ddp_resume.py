"""2-process DDP runs of HessianEigenMonitor and of CurvatureLRController with its own probe, uninterrupted and
interrupted after 2 of 4 epochs; each rank saves the last measurement and the learning rates of both runs, and
its probe.

Each rank measures its own share of the probe, and Lightning writes rank 0's callback states only."""

import sys

import torch
from lightning.pytorch import Trainer

from lightning_lip import CurvatureLRController, HessianEigenMonitor
from tests.callbacks.test_lr_controller import RecordingSGD
from tests.ddp import ddp_trainer_kwargs, save_rank
from tests.models import Classifier, loader, mlp, random_data


def fit(out, callback, epochs, ckpt=None):
    """4 steps an epoch: 64 samples, 2 ranks, batch 8; lr 2 is large enough for the controller to cut."""
    torch.manual_seed(0)
    model = Classifier(mlp((8, 12, 4)), optimizer=lambda params: RecordingSGD(params, lr=2.0))
    trainer = Trainer(**ddp_trainer_kwargs(callbacks=[callback], max_epochs=epochs, default_root_dir=out))
    trainer.fit(model, loader(random_data(64, (8,)), batch_size=8), ckpt_path=ckpt)
    return trainer, model.optimizers().optimizer.used


def monitor_of(callback):
    return callback if isinstance(callback, HessianEigenMonitor) else callback._probe


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    makers = {
        "monitor": lambda: HessianEigenMonitor(every_n_steps=2, num_samples=16),
        "controller": lambda: CurvatureLRController(signal="probe", probe_every_n_steps=2, probe_samples=16),
    }
    result = {}
    for name, make in makers.items():
        full = make()
        _, used = fit(out, full, 4)
        trainer, used_before = fit(out, make(), 2)
        trainer.save_checkpoint(f"{out}/{name}.ckpt")
        resumed = make()
        trainer, used_after = fit(out, resumed, 4, ckpt=f"{out}/{name}.ckpt")
        last = [{k: v for k, v in monitor_of(c).last.items() if k != "lip/hessian/seconds"} for c in (full, resumed)]
        result[name] = {"last": last, "used": [used, used_before + used_after]}
        result[name]["probe"] = torch.cat([batch[0] for batch in monitor_of(resumed)._probe])
    save_rank(trainer, out, result)
