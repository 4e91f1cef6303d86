import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_lip import CurvatureLRController, GradientNoiseEstimator, HessianEigenMonitor, KappaBudgetProjection


class TinyModel(LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, hidden)


def test_lightning_cli_configures_every_callback_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  logger: false
  callbacks:
    - class_path: lightning_lip.KappaBudgetProjection
      init_args:
        max_lipschitz: 5.0
        policy: fixed
        kappas: {net: 5.0}
        audit_every_n_steps: 10
    - class_path: lightning_lip.HessianEigenMonitor
      init_args:
        every_n_steps: 7
        data: current
        bn_mode: train
    - class_path: lightning_lip.GradientNoiseEstimator
      init_args:
        every_n_steps: 20
        layers: [net]
        chunk_size: 16
        predict: false
    - class_path: lightning_lip.CurvatureLRController
      init_args:
        mode: adaptive
        max_ratio: 2.5
        spike_factor: 2.0
        s_min: 0.05
        signal: hessian
        skip_nonfinite: true
"""
    )
    cli = LightningCLI(TinyModel, run=False, args=["--config", str(config)], save_config_callback=None)
    kappa = next(c for c in cli.trainer.callbacks if isinstance(c, KappaBudgetProjection))
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, HessianEigenMonitor))
    assert (kappa.max_lipschitz, kappa.policy, kappa.kappas, kappa.audit_every_n_steps) == (
        5.0,
        "fixed",
        {"net": 5.0},
        10,
    )
    assert (monitor.every_n_steps, monitor.data, monitor.bn_mode) == (7, "current", "train")
    noise = next(c for c in cli.trainer.callbacks if isinstance(c, GradientNoiseEstimator))
    assert (noise.every_n_steps, noise.layers, noise.chunk_size, noise.predict) == (20, ["net"], 16, False)
    controller = next(c for c in cli.trainer.callbacks if isinstance(c, CurvatureLRController))
    assert (controller.max_ratio, controller.spike_factor) == (2.5, 2.0)
    assert (controller.mode, controller.s_min, controller.signal, controller.skip_nonfinite) == (
        "adaptive",
        0.05,
        "hessian",
        True,
    )
