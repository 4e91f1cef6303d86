"""The examples run end to end (shortened), and the plot script turns a run's event files into a PNG."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(tmp_path, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_digits_summary_and_dashboard(tmp_path):
    out = run_example(tmp_path, "digits.py", "--max-epochs", "2", "--logdir", str(tmp_path / "runs"))
    for line in ["validation accuracy", "lr * lambda_max / threshold", "Lipschitz bound", "noise scale", "LR throttle"]:
        assert line in out
    assert "tensorboard --logdir" in out
    logdir = tmp_path / "runs" / "digits" / "version_0"
    run_example(tmp_path, "plot_dashboard.py", str(logdir), "--out", str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size > 10_000


@pytest.mark.slow
def test_custom_policy_and_edge_of_stability(tmp_path):
    out = run_example(tmp_path, "custom_policy.py", "--max-epochs", "1")
    assert "'net.7': 2.0" in out  # the head's fixed kappa
    out = run_example(tmp_path, "edge_of_stability.py", "--steps", "60", "--logdir", str(tmp_path / "runs"))
    assert "strict: λ_max" in out


@pytest.mark.slow
def test_wgan_critic_stays_within_its_certified_bound(tmp_path):
    out = run_example(tmp_path, "wgan.py", "--max-epochs", "3")
    rows = [line.split() for line in out.splitlines() if line.startswith("epoch")]
    bounds = [float(row[row.index("bound") + 1]) for row in rows]
    max_grads = [float(row[row.index("|grad|") + 1]) for row in rows]
    assert len(rows) == 3 and max(bounds) > 0.999  # the budget binds
    assert all(g <= b <= 1 + 1e-3 for g, b in zip(max_grads, bounds))  # the per-step guarantee; gradients below it


def test_config_yaml_configures_all_four_callbacks(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from lightning_lip import CurvatureLRController, GradientNoiseEstimator, HessianEigenMonitor, KappaBudgetProjection

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from digits import DigitsCNN, DigitsDataModule

    cli = LightningCLI(
        DigitsCNN,
        DigitsDataModule,
        run=False,
        args=["--config", str(EXAMPLES / "config.yaml")],
        save_config_callback=None,
    )
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {KappaBudgetProjection, HessianEigenMonitor, GradientNoiseEstimator, CurvatureLRController} <= kinds
    controller = next(c for c in cli.trainer.callbacks if isinstance(c, CurvatureLRController))
    assert (controller.mode, controller.margin, controller.signal) == ("adaptive", 0.5, "hessian")
