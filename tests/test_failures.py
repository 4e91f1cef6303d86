"""The callbacks around failures and odd setups: errors and interrupts inside a step, sharded strategies, batches
whose samples cannot be found, a ``training_step`` that changes its batch in place, losses that raise inside the
measurements, layers called by keyword or subclassed with their own forward, optimizers without a numeric learning
rate, a measurement that fails on one DDP rank. None of them may stop training or leave the callbacks' hooks
behind."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, default_collate

from lightning_lip import CurvatureLRController, GradientNoiseEstimator, HessianEigenMonitor, KappaBudgetProjection
from tests.models import (
    Classifier,
    HalvesItsInput,
    SamePaddingConv2d,
    cnn,
    loader,
    mlp,
    random_data,
    trainer_kwargs,
)
from tests.reference import dense_operator_norm
from tests.test_composition import four


class _Interrupted(Exception):
    pass


class _FailsInTraining(Classifier):
    """Raises in ``training_step`` after the forward pass while ``fail``: inside ``optimizer.step(closure)``, after
    the controller's throttle, while the projection follows the layers' applications. The callbacks' measurements
    run in eval mode and pass."""

    fail = True

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.training and self.fail:
            raise _Interrupted
        return loss


def test_an_error_inside_the_first_step_leaves_no_hooks_and_the_scheduled_learning_rate(tmp_path):
    """Lightning calls ``on_exception`` but no ``teardown`` after an error or an interrupt (Ctrl-C)."""
    torch.manual_seed(0)
    callbacks = four()
    model = _FailsInTraining(cnn(), lr=20.0)
    on_exception = OnExceptionCheckpoint(tmp_path)
    trainer = Trainer(callbacks=[*callbacks, on_exception], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    with pytest.raises(_Interrupted):
        trainer.fit(model, loader(random_data(64, (1, 8, 8))))
    optimizer = trainer.optimizers[0]
    assert callbacks[3].states[0].throttle < 0.5  # the step ran throttled
    assert optimizer.param_groups[0]["lr"] == 20.0
    saved = torch.load(on_exception.ckpt_path, weights_only=True)["optimizer_states"][0]
    assert saved["param_groups"][0]["lr"] == 20.0  # not the throttled rate, which a resumed run would throttle again
    assert not any(m._forward_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not callbacks[0]._chains._outputs  # the step's autograd nodes, which hold its activations, let go

    model.fail = False  # the same callbacks train the same model on
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(model, loader(random_data(64, (1, 8, 8))))
    assert callbacks[0].n_projections == 4 and trainer.optimizers[0].param_groups[0]["lr"] == 20.0


class _CPUFSDP(FSDPStrategy):
    """``FSDPStrategy`` on a CPU Trainer: Lightning refuses the class itself there (it checks the exact type)."""


@pytest.mark.parametrize("strategy", [_CPUFSDP, ModelParallelStrategy], ids=["fsdp", "model_parallel"])
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_sharded_strategies_are_a_clear_error_at_setup(tmp_path, strategy, index):
    """Lightning runs the callbacks' ``setup`` before the strategy wraps the model. Called here directly: a fit
    would start a process group in the test process, whose store keeps its port from later DDP tests."""
    callback = four()[index]
    trainer = Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, strategy=strategy()))
    with pytest.raises(ValueError, match=f"{type(callback).__name__} does not support sharded models"):
        callback.setup(trainer, Classifier(mlp()), stage="fit")


class _Picky(Classifier):
    """A ``training_step`` that insists on the loader's batch size, as code that reshapes by it does; in eval mode
    (the monitor's measurements) it raises something else again."""

    def training_step(self, batch, batch_idx):
        assert len(batch[0]) == 16, "expected batches of 16"
        if not self.training:
            raise KeyError("train-only")
        return super().training_step(batch, batch_idx)


def test_a_loss_that_raises_on_the_callbacks_batches_stops_their_measurements_not_training(tmp_path):
    """Not only ``RuntimeError``: an assertion fails on the estimator's batches of one (also under ``vmap``), a
    ``KeyError`` on the monitor's probe."""
    monitor, noise = HessianEigenMonitor(every_n_steps=2), GradientNoiseEstimator(every_n_steps=2)
    trainer = Trainer(callbacks=[monitor, noise, CurvatureLRController()], **trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.warns(UserWarning, match="cannot differentiate this model's loss"):
        trainer.fit(_Picky(cnn(), lr=2.0), loader(random_data(64, (1, 8, 8))))
    assert trainer.global_step == 8 and monitor.n_runs == noise.n_runs == 0
    assert monitor.failure == "KeyError: 'train-only'"
    assert noise.failure == "torch.func: AssertionError: expected batches of 16; torch.autograd: AssertionError: " + (
        "expected batches of 16"
    )


class _KeywordCalls(torch.nn.Module):
    """Layers called with their input by keyword (``conv(input=x)``), one of them three times in a chain."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(2 * 16 * 16, 4)
        self.loop = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = F.relu(self.up(input=F.relu(self.conv(input=x)), output_size=[16, 16]))
        out = self.head(input=h.flatten(1))
        for _ in range(3):
            out = self.loop(input=F.relu(out))
        return out


def test_layers_called_with_their_input_by_keyword(tmp_path):
    """Forward hooks see such an input among the keyword arguments (it stopped training with an IndexError): the
    convolutions are measured on their shapes (the transposed one with the output size asked for), and the chain is
    found."""
    torch.manual_seed(0)
    kappa = KappaBudgetProjection(max_lipschitz=100.0, audit_every_n_steps=1)
    callbacks = [kappa, *four()[1:]]
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    model = Classifier(_KeywordCalls(), lr=0.5)
    with pytest.warns(UserWarning, match=r"several times in a chain.*net\.loop \(3x\)"):
        trainer.fit(model, loader(random_data(64, (1, 8, 8))))
    up = torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)  # what output_size=[16, 16] asks
    up.load_state_dict(model.net.up.state_dict())
    assert kappa.sigmas["net.conv"] == pytest.approx(dense_operator_norm(model.net.conv, (1, 8, 8)), rel=1e-5)
    assert kappa.sigmas["net.up"] == pytest.approx(dense_operator_norm(up, (4, 8, 8)), rel=1e-5)  # audited, 1e-5
    assert all(c.n_runs > 0 and c.failure is None for c in callbacks[1:3])


def test_a_layer_subclass_with_its_own_forward_is_neither_projected_nor_given_dynamics(tmp_path, recwarn):
    """timm's ``Conv2dSame`` pads in ``forward``: the operator of ``nn.Conv2d`` with its attributes is another (2.4 %
    below its norm in ``test_spectral``), so it is listed among the layers left out, not certified wrongly."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        SamePaddingConv2d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 4),
    )  # fmt: skip
    callbacks = four()
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(Classifier(net, lr=0.5), loader(random_data(64, (1, 8, 8))))
    warned = " ".join(str(w.message) for w in recwarn)
    assert "net.0 (SamePaddingConv2d: its own forward, not that of the layer it extends)" in warned
    assert "no Lipschitz dynamics for layers whose weight is computed" in warned and "forward" in warned
    kappa, _, noise, _ = callbacks
    assert set(kappa.sigmas) == {"net.2", "net.5"}
    assert "lip/noise/drift/net.2" in noise.last and "lip/noise/drift/net.0" not in noise.last
    assert "lip/noise/snr/net.0" in noise.last  # its gradients count


class _RelativeStep(torch.optim.Optimizer):
    """As transformers' ``Adafactor(lr=None, relative_step=True)``: the group's ``lr`` is ``None``, the optimizer sets
    its own step size."""

    def __init__(self, params):
        super().__init__(params, dict(lr=None))

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = None if closure is None else closure()
        for p in (p for group in self.param_groups for p in group["params"] if p.grad is not None):
            p.add_(p.grad, alpha=-0.05)
        return loss


def test_an_optimizer_without_a_numeric_learning_rate(tmp_path, recwarn):
    """``float(group["lr"])`` stopped training in the controller's step hook and in the estimator's step map."""
    callbacks = four()
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(Classifier(cnn(), optimizer=_RelativeStep), loader(random_data(64, (1, 8, 8))))
    kappa, monitor, noise, controller = callbacks
    assert trainer.global_step == 8 and monitor.n_runs == noise.n_runs == 4
    assert controller.states[0].throttle == 1.0 and trainer.optimizers[0].param_groups[0]["lr"] is None
    assert "learning rates are [None], not numbers" in " ".join(str(w.message) for w in recwarn)


class _Opaque:
    """A batch whose tensors sit in private storage, as a graph library's does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._store = {"x": x, "y": y}

    def to(self, device):
        return _Opaque(self._store["x"].to(device), self._store["y"].to(device))


class _Unpacking(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch._store["x"], batch._store["y"]), batch_idx)


def test_batches_whose_samples_cannot_be_found_stop_the_measurements_with_a_warning(tmp_path):
    callbacks = four()
    data = DataLoader(random_data(64, (1, 8, 8)), batch_size=16, collate_fn=lambda s: _Opaque(*default_collate(s)))
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.warns(UserWarning, match="cannot find the samples of a _Opaque batch"):
        trainer.fit(_Unpacking(cnn(), lr=2.0), data)
    kappa, monitor, noise, controller = callbacks
    assert kappa.n_projections == trainer.global_step == 8 and controller.states[0].throttle == 1.0
    assert monitor.n_runs == noise.n_runs == 0
    assert monitor.failure == noise.failure == "no samples found in a _Opaque batch"


@pytest.mark.slow
def test_ddp_a_measurement_that_fails_on_one_rank_stops_on_every_rank(tmp_path):
    """The loss raises inside the measurements on rank 1 only: rank 0 must not wait for it in a collective. Both
    stop measuring at the same point (rank 0 with the reason that another rank failed) and train on alike."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_rank_failure.py", tmp_path)
    assert rank0["global_step"] == rank1["global_step"] == 8 and rank0["used"] == rank1["used"]
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    assert rank1["failures"] == (
        "KeyError: 'only on rank 1'",
        "torch.func: KeyError: 'only on rank 1'; " + ("torch.autograd: KeyError: 'only on rank 1'"),
    )
    assert rank0["failures"] == (
        "the Hessian-vector product failed on another rank",
        "the measurement failed on another rank",
    )
    assert rank0["runs"] == rank1["runs"] == (0, 0)


class _Runs(Callback):
    """``(global step, callback.last[key])`` of each new measurement of ``callback`` (its ``n_runs`` grew)."""

    def __init__(self, callback: Callback, key: str) -> None:
        self.callback, self.key, self.runs = callback, key, []

    def on_train_batch_end(self, trainer, *args):
        if len(self.runs) < self.callback.n_runs:
            self.runs.append((trainer.global_step, self.callback.last[self.key]))


def _fit_halving(tmp_path, in_place: bool, callbacks: list[Callback]) -> HalvesItsInput:
    torch.manual_seed(0)
    model = HalvesItsInput(mlp((8, 6, 3)), in_place=in_place, lr=0.01)
    Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader(random_data(64, (8,), 3)))
    return model


def test_a_step_that_changes_its_batch_in_place_leaves_the_measured_batches_as_the_step_received_them(tmp_path):
    """``x *= 0.5`` in ``training_step`` halved the fixed probe again at every loss evaluation, and the controller's
    first measurement (before the first step, on its batch) halved the user's batch before the step did: training
    changed. Each evaluation now works on its own copy, and the probe is taken before the step."""
    lambdas, params = {}, {}
    for in_place in (True, False):
        monitor, controller = HessianEigenMonitor(every_n_steps=2, num_samples=32), CurvatureLRController(mode="guard")
        runs = _Runs(monitor, "lip/hessian/lambda_max")
        model = _fit_halving(tmp_path, in_place, [monitor, controller, runs])
        assert controller.states[0].throttle == 1.0  # lr * lambda_max far below 2: the LR is the user's
        lambdas[in_place], params[in_place] = runs.runs, model.state_dict()
    assert lambdas[True] == lambdas[False] and len(lambdas[True]) == 4  # the same arithmetic on the same samples
    untouched = _fit_halving(tmp_path, True, []).state_dict()
    for key, value in untouched.items():
        assert torch.equal(params[True][key], value), key


def test_a_step_that_changes_its_batch_in_place_skips_one_measurement_on_the_batch_then_copies_it(tmp_path):
    """After the step the noise estimator and a monitor of the current batch would measure the batch halved twice;
    the tensors' version counters show the change: that measurement is skipped with a warning, and from then on
    each batch is copied before its step. The later measurements equal an out-of-place twin's."""
    runs, callbacks = {}, {}
    for in_place in (True, False):
        noise = GradientNoiseEstimator(every_n_steps=2)
        monitor = HessianEigenMonitor(every_n_steps=2, data="current", max_iter=75, tol=1e-10)  # 75 parameters
        recorders = [_Runs(noise, "lip/noise/trace"), _Runs(monitor, "lip/hessian/lambda_max")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_halving(tmp_path, in_place, [noise, monitor, *recorders])
        in_place_warnings = [w for w in caught if "batch's tensors changed in place" in str(w.message)]
        assert len(in_place_warnings) == (2 if in_place else 0)  # once for each callback
        runs[in_place], callbacks[in_place] = [r.runs for r in recorders], (noise, monitor)
    (noise_twin, monitor_twin), (noise_runs, monitor_runs) = runs[False], runs[True]
    assert [step for step, _ in noise_twin] == [step for step, _ in monitor_twin] == [2, 4, 6, 8]
    assert noise_runs == noise_twin[1:]  # the same per-sample gradients, bit for bit
    # Lanczos to the whole space from another start (the twin's is warm): float32 products agree to ~1e-7
    assert [step for step, _ in monitor_runs] == [4, 6, 8]
    assert [value for _, value in monitor_runs] == pytest.approx([value for _, value in monitor_twin[1:]], rel=1e-6)
    for in_place, (noise, monitor) in callbacks.items():
        assert noise.n_skipped == monitor.n_skipped == int(in_place)
        assert noise.state_dict()["copy_batches"] == monitor.state_dict()["copy_batches"] == in_place


@pytest.mark.slow
def test_ddp_a_batch_changed_in_place_on_one_rank_skips_the_measurement_on_every_rank(tmp_path):
    """Rank 1 halves its batch in place, rank 0 out of place: both skip the first measurement (rank 0 must not
    wait for rank 1 in a collective), copy the later batches and measure alike."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_in_place.py", tmp_path)
    assert rank0 == rank1
    assert rank0["n_skipped"] == (1, 1) and rank0["copy_batches"] == (True, True) and rank0["n_runs"] == (3, 3)
