import csv
import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.plugins.precision import Precision
from torch.optim import lr_scheduler

from lightning_lip import CurvatureLRController, HessianEigenMonitor, LipRegistry
from tests.models import Classifier, Finetuned, OverflowsAt, fp16_grad_scaler, loader, mlp, random_data, trainer_kwargs


def RecordingSGD(*args, **kwargs):  # noqa: N802
    """SGD that records the learning rate of every param group at each update: a step post-hook registered before
    the controller's (which restores the scheduled value) sees the rate the update used."""
    optimizer = torch.optim.SGD(*args, **kwargs)
    optimizer.used = []
    optimizer.register_step_post_hook(lambda opt, a, k: opt.used.append([float(g["lr"]) for g in opt.param_groups]))
    return optimizer


class FixedSignal(HessianEigenMonitor):
    """A monitor that publishes a prescribed lambda_max before every step (``lam(step)``)."""

    def __init__(self, lam):
        super().__init__(every_n_steps=1)
        self.lam = lam

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        LipRegistry.of(trainer).publish("hessian/lambda_max", self.lam(trainer.global_step), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass


class Half(CurvatureLRController):
    def throttle(self, ratio, state):
        return 0.5


class Scheduled(Classifier):
    def __init__(self, schedule, lr=0.1):
        super().__init__(mlp(), lr=lr)
        self.schedule = schedule  # "<name>" or "<name>-tensor" for a tensor learning rate
        self.last_lrs = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("plateau_metric", 1.0)  # independent of training: both twins take the same plateau decisions
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # as numbers: torch 2.4's `get_last_lr` holds a tensor rate itself, which the scheduler sets in place later
        self.last_lrs.append([float(lr) for lr in self.lr_schedulers().get_last_lr()])

    def configure_optimizers(self):
        name, _, lr_type = self.schedule.partition("-")
        opt = RecordingSGD(self.parameters(), lr=torch.tensor(self.lr) if lr_type else self.lr, momentum=0.9)
        self.initial_lr = opt.param_groups[0]["lr"]
        schedulers = {
            "step": lambda: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
            "onecycle": lambda: lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=16),
            "cosine": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=16),
            "lambda": lambda: lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
            "exponential": lambda: lr_scheduler.ExponentialLR(opt, gamma=0.9),
            "plateau": lambda: lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5),
            "warmup_cosine": lambda: lr_scheduler.SequentialLR(
                opt,
                [lr_scheduler.LinearLR(opt, 0.1, total_iters=4), lr_scheduler.CosineAnnealingLR(opt, T_max=12)],
                milestones=[4],
            ),
            "chained": lambda: lr_scheduler.ChainedScheduler(
                [lr_scheduler.ExponentialLR(opt, 0.9), lr_scheduler.StepLR(opt, 5)]
            ),
            "cyclic": lambda: lr_scheduler.CyclicLR(opt, 0.01, 0.2, step_size_up=3),  # cycles momentum
        }
        config = {"scheduler": schedulers[name](), "interval": "step"}
        if name == "plateau":
            config["monitor"] = "plateau_metric"
        return {"optimizer": opt, "lr_scheduler": config}


class ClosureFirst(Precision):
    """Lightning's order under a GradScaler (``precision="16-mixed"`` on GPUs): the closure and
    ``on_before_optimizer_step`` run before ``optimizer.step``, so before the controller's step pre-hook."""

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        closure()
        self._after_closure(model, optimizer)
        return optimizer.step(**kwargs)


#: ``fit`` keyword arguments of the two hook orders
ORDERS = {"closure_in_step": {}, "closure_first": {"plugins": [ClosureFirst()]}}


def fit(tmp_path, model, callbacks, data=None, batch_size=16, ckpt_path=None, **kw):
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, loader(data or random_data(64), batch_size), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "schedule",
    [
        *("step", "onecycle", "cosine", "lambda", "exponential", "plateau", "warmup_cosine", "chained", "cyclic"),
        *("onecycle-tensor", "step-tensor"),
    ],
)
def test_scheduler_twin_sees_the_schedule_and_the_optimizer_half_of_it(tmp_path, schedule):
    """Also with a tensor learning rate, which stays the same tensor, set in place (as torch's schedulers do); the
    controller replaced it by a float, which a compiled or graph-captured step does not read."""

    def run(callbacks):
        torch.manual_seed(0)
        model = Scheduled(schedule)
        fit(tmp_path, model, callbacks, max_epochs=4)
        (group,) = model.optimizers().optimizer.param_groups
        assert not schedule.endswith("tensor") or group["lr"] is model.initial_lr
        return model.optimizers().optimizer.used, model.last_lrs

    used_twin, last_twin = run([])
    used, last = run([FixedSignal(lambda step: 1.0), Half()])
    assert len(used) == len(used_twin) == 16
    assert used == [[0.5 * lr for lr in row] for row in used_twin]  # exact: halving is exact in binary
    assert last == last_twin
    assert len(set(map(tuple, last))) > 1  # the schedule moved


def test_learning_rate_monitor_logs_the_scheduled_lr_and_the_controller_the_one_used(tmp_path):
    """Lightning's ``LearningRateMonitor`` reads the LR between steps, where the controller has restored the
    schedule's; ``lip/lr/effective`` is the LR the optimizer used (the README says which to read)."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    model, logger = Scheduled("step"), CSVLogger(tmp_path)
    callbacks = [FixedSignal(lambda step: 1.0), Half(), LearningRateMonitor(logging_interval="step")]
    fit(tmp_path, model, callbacks, max_epochs=4, logger=logger, log_every_n_steps=1)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    (monitored,) = [key for key in rows[0] if key.startswith("lr-")]
    by_step = {key: {int(r["step"]): float(r[key]) for r in rows if r[key]} for key in (monitored, "lip/lr/effective")}
    used = [row[0] for row in model.optimizers().optimizer.used]
    assert len(used) == 16 and len(set(used)) > 1  # the schedule moved
    assert list(by_step["lip/lr/effective"].values()) == pytest.approx(used, rel=1e-7)  # float32 in the log
    assert list(by_step[monitored].values()) == pytest.approx([2 * lr for lr in used], rel=1e-7)
    assert list(by_step[monitored]) == list(by_step["lip/lr/effective"]) == list(range(16))


def test_strict_cuts_to_the_margin_and_recovers_slowly_with_hysteresis(tmp_path):
    # lr 0.1: unthrottled ratio 2.0, then 1.7 (throttled 0.765: under the margin 0.9, over 0.8 of it), then 0.05
    lam = lambda step: 40.0 if step < 6 else 34.0 if step < 10 else 1.0  # noqa: E731
    controller = CurvatureLRController(mode="strict", margin=0.9, recovery=1.5, hysteresis=0.8)
    model = Classifier(mlp(), lr=0.1)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=0.1)
    fit(tmp_path, model, [FixedSignal(lam), controller], data=random_data(256))
    used = [row[0] for row in model.optimizers().optimizer.used]
    assert used[:10] == pytest.approx([0.1 * 0.9 / 2.0] * 10, rel=1e-12)  # fast cut to the margin, then held
    s = 0.45
    for lr in used[10:]:
        s = min(1.0, s * 1.5)
        assert lr == pytest.approx(0.1 * s, rel=1e-12)  # slow multiplicative recovery, back to the schedule
    assert used[-1] == 0.1
    state = controller.states[0]
    assert (state.n_cuts, state.n_recoveries, state.throttle) == (1, 2, 1.0)


def test_guard_leaves_the_edge_of_stability_alone_and_acts_above_the_threshold(tmp_path):
    def run(lam_value):
        controller = CurvatureLRController(mode="guard")
        model = Classifier(mlp(), lr=0.1)
        model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=0.1)
        fit(tmp_path, model, [FixedSignal(lambda step: lam_value), controller])
        return [row[0] for row in model.optimizers().optimizer.used]

    assert run(19.5) == [0.1] * 4  # eta * lambda = 1.95 < 2: untouched (strict would cut to 0.9 * 2)
    assert run(40.0) == pytest.approx([0.05] * 4, rel=1e-12)  # eta * lambda = 4: cut to the threshold


def test_stale_nan_and_negative_signals_never_produce_a_bad_learning_rate(tmp_path):
    values = iter([float("nan"), -5.0, float("inf"), 1e30, 0.0, 1e-30, 40.0, 40.0])
    controller = CurvatureLRController(mode="strict", s_min=0.01)
    model = Classifier(mlp(), lr=0.1)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=0.1)
    fit(tmp_path, model, [FixedSignal(lambda step: next(values)), controller], data=random_data(128))
    used = [row[0] for row in model.optimizers().optimizer.used]
    assert all(math.isfinite(lr) and lr > 0 for lr in used)
    assert used[3] == pytest.approx(0.1 * 0.01)  # 1e30 hits s_min, not zero
    stale = CurvatureLRController(mode="strict", max_age=2)

    class Once(FixedSignal):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    model = Classifier(mlp(), lr=0.1)
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=0.1)
    fit(tmp_path, model, [Once(lambda step: 40.0), stale], data=random_data(128))
    used = [row[0] for row in model.optimizers().optimizer.used]
    assert used[:3] == pytest.approx([0.025] * 3) and used[3:] == used[2:3] * 5  # aged out at step 3: holds


class NaNAt(Classifier):
    def __init__(self, nan_step):
        super().__init__(mlp(), lr=0.1)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("order", ORDERS)
def test_nonfinite_gradient_emergency_cut_and_optional_skip(tmp_path, order):
    controller = CurvatureLRController(skip_nonfinite=True, emergency_factor=0.25)
    model = NaNAt(2)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller], data=random_data(128), **ORDERS[order])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    used = [row[0] for row in model.optimizers().optimizer.used]
    assert used[2] == pytest.approx(0.025) and used[3] == pytest.approx(0.025 * 1.05)
    assert controller.states[0].n_emergencies == 1
    assert math.isfinite(controller.loss_ema) and controller.n_spikes == 0  # the NaN step never reaches the average


def test_multiple_param_groups_are_throttled_separately(tmp_path):
    class TwoGroups(Classifier):
        def configure_optimizers(self):
            return RecordingSGD(
                [{"params": self.net[0].parameters(), "lr": 0.01}, {"params": self.net[2:].parameters(), "lr": 0.1}]
            )

    model = TwoGroups(mlp())
    controller = CurvatureLRController(mode="strict", margin=0.5)
    fit(tmp_path, model, [FixedSignal(lambda step: 20.0), controller])  # ratios 0.1 and 1.0
    assert model.optimizers().optimizer.used[-1] == pytest.approx([0.01, 0.05])
    assert [s.throttle for s in controller.states] == pytest.approx([1.0, 0.5])


def test_a_param_group_added_during_training_is_throttled_and_resumed(tmp_path):
    """``BackboneFinetuning`` adds the backbone's group at epoch 1 (step 4) at the head's rate: ratio 1.0, throttle 0.5,
    until the signal falls at step 6 and both recover. Resumed at step 8, where the controller's ``on_fit_start``
    comes before the group is added back."""

    def run(root, max_epochs, ckpt=None):
        controller = CurvatureLRController(mode="strict", margin=0.5)
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
        model = Finetuned(mlp(), optimizer=lambda params: RecordingSGD(params, lr=0.1))
        signal = FixedSignal(lambda step: 20.0 if step < 6 else 2.0)
        trainer = fit(root, model, [signal, controller, finetuning], max_epochs=max_epochs, ckpt_path=ckpt)
        return trainer, controller, model.optimizers().optimizer.used

    _, full, used = run(tmp_path / "a", 3)
    assert used[3] == pytest.approx([0.05]) and [len(lrs) for lrs in used[4:]] == [2] * 8
    assert sum(used[4:6], []) == pytest.approx([0.05] * 4) and used[-1][0] == used[-1][1] < 0.1
    run(tmp_path / "b", 2)[0].save_checkpoint(tmp_path / "c.ckpt")
    _, second, resumed = run(tmp_path / "b", 3, ckpt=tmp_path / "c.ckpt")
    assert len(second.states) == 2 and second.states == full.states and resumed == used[8:]


PRECONDITIONED = {  # optimizer at lr 1 and its threshold
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1.0), 38.0),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1.0, betas=(0.5, 0.999)), 6.0),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1.0, momentum=0.5), 3.0),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1.0), 2.0),
}


class OptIn(CurvatureLRController):
    CONTROLLED_OPTIMIZERS = (
        *CurvatureLRController.CONTROLLED_OPTIMIZERS,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
    )


@pytest.mark.parametrize("name", list(PRECONDITIONED))
def test_preconditioned_optimizers_use_their_threshold(tmp_path, name):
    """Adam and Adamax by default; RMSprop and Adagrad once a subclass opts in."""
    make, threshold = PRECONDITIONED[name]
    controller = (CurvatureLRController if name in ("adam", "adamax") else OptIn)(mode="strict", margin=0.5)
    fit(tmp_path, Classifier(mlp(), optimizer=make), [FixedSignal(lambda step: 2 * threshold), controller])  # ratio 2
    assert controller.states[0].throttle == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["rmsprop", "adagrad"])
def test_other_preconditioned_optimizers_are_left_alone_by_default(tmp_path, name):
    make, threshold = PRECONDITIONED[name]
    controller = CurvatureLRController(mode="strict", margin=0.5)
    with pytest.warns(UserWarning, match="does not throttle .* by default: its preconditioner is far from settled"):
        fit(tmp_path, Classifier(mlp(), optimizer=make), [FixedSignal(lambda step: 2 * threshold), controller])
    assert controller.states[0].throttle == 1.0


def test_an_optimizer_left_alone_is_not_measured(tmp_path):
    """Without a threshold the own probe would measure for nothing: it does not run, and the LR is the scheduled one."""
    controller = CurvatureLRController(probe_every_n_steps=2)
    with pytest.warns(UserWarning, match="does not throttle RMSprop by default"):
        trainer = fit(tmp_path, Classifier(mlp(), optimizer=PRECONDITIONED["rmsprop"][0]), [controller], max_steps=6)
    assert "hessian/lambda_max" not in LipRegistry.of(trainer) and controller.states[0].throttle == 1.0


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_with_adam_the_first_measurement_follows_adams_first_step(tmp_path, name):
    """The preconditioned Hessian needs a second moment: the first measurement, impossible before the first step,
    runs on the next batch instead of waiting for the probe's cadence (Adagrad's state exists from the start)."""
    controller = OptIn(probe_every_n_steps=50)
    trainer = fit(tmp_path, Classifier(mlp(), optimizer=PRECONDITIONED[name][0]), [controller], max_steps=3)
    registry = LipRegistry.of(trainer)
    assert registry.step_of("hessian/lambda_max") == 1 and registry.get("hessian/preconditioned") is True
    assert controller.states[0].throttle < 1  # lr 1 is far beyond the threshold


def test_no_signal_is_a_clear_error_or_the_probe(tmp_path):
    with pytest.raises(ValueError, match="add a HessianEigenMonitor"):
        fit(tmp_path, Classifier(mlp()), [CurvatureLRController(signal="hessian")])
    controller = CurvatureLRController(mode="strict", probe_every_n_steps=2, probe_iterations=10)
    model = Classifier(mlp(), lr=5.0)  # far beyond 2 / lambda_max
    model.configure_optimizers = lambda: RecordingSGD(model.parameters(), lr=5.0)
    trainer = fit(tmp_path, model, [controller], data=random_data(128), max_steps=3)
    assert model.optimizers().optimizer.used[0][0] < 5.0  # the very first step is guarded (bootstrap probe)
    lam = LipRegistry.of(trainer).get("hessian/lambda_max")  # measured after step 2, used by step 3
    assert LipRegistry.of(trainer).step_of("hessian/lambda_max") == 2
    s = controller.states[0].throttle
    assert lam is not None and s < 0.5 and 5.0 * s * lam / 2 <= 0.5 * (1 + 1e-12)  # under the margin
    assert controller.states[0].n_cuts >= 1  # the first cut came from the bootstrap measurement on batch 0


def test_resume_continues_exactly(tmp_path):
    data = random_data(64)

    def run(root, max_epochs, ckpt=None):
        torch.manual_seed(0)
        controller = CurvatureLRController(probe_every_n_steps=3, probe_samples=32)
        model = Classifier(mlp(), lr=20.0, momentum=0.5)
        trainer = Trainer(callbacks=[controller], **trainer_kwargs(root, max_epochs=max_epochs))
        trainer.fit(model, loader(data), ckpt_path=ckpt)
        return trainer, controller, model

    _, full, full_model = run(tmp_path / "a", 4)
    t1, _, _ = run(tmp_path / "b", 2)
    t1.save_checkpoint(tmp_path / "c.ckpt")
    torch.load(tmp_path / "c.ckpt", weights_only=True)
    _, second, model = run(tmp_path / "b", 4, ckpt=tmp_path / "c.ckpt")
    assert full.states[0].n_cuts > 0 and second.states == full.states
    assert (second.loss_ema, second.n_spikes) == (full.loss_ema, full.n_spikes) and full.loss_ema is not None
    for a, b in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lr_type", ["float", "tensor"])
def test_a_checkpoint_saved_inside_the_step_holds_the_scheduled_learning_rate(tmp_path, lr_type):
    """Saved as a SLURM requeue's signal handler saves, wherever the step is: here inside ``optimizer.step(closure)``,
    where the optimizer holds the throttled rate until the step's post-hook. A resumed run takes the saved rate for
    the scheduled one and throttles it."""
    lr = 0.25

    class SavesInsideTheStep(Classifier):
        save_at = 2

        def on_after_backward(self):
            if self.global_step == self.save_at:
                self.during = float(self.trainer.optimizers[0].param_groups[0]["lr"])
                self.trainer.save_checkpoint(tmp_path / "inside.ckpt")

    def fit(root, save_at, ckpt=None):
        model = SavesInsideTheStep(
            mlp(), optimizer=lambda p: RecordingSGD(p, lr=torch.tensor(lr) if lr_type == "tensor" else lr)
        )
        model.save_at = save_at
        callbacks = [FixedSignal(lambda step: 1.0), Half()]
        trainer = Trainer(callbacks=callbacks, **trainer_kwargs(root, max_epochs=2, max_steps=5))
        trainer.fit(model, loader(random_data(64)), ckpt_path=ckpt)
        return model

    model = fit(tmp_path / "a", save_at=2)
    saved = torch.load(tmp_path / "inside.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert model.during == 0.5 * lr and float(saved) == lr
    assert model.optimizers().optimizer.used == [[0.5 * lr]] * 5  # the live (tensor) rate untouched by the save
    resumed = fit(tmp_path / "b", save_at=None, ckpt=tmp_path / "inside.ckpt")
    assert resumed.optimizers().optimizer.used == [[0.5 * lr]] * 3


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_a_threshold_override_that_returns_no_positive_number_is_a_clear_error(tmp_path, value):
    """It divided by zero (or throttled on a negative ratio); the scheduled rate is back in the optimizer after."""

    class Broken(CurvatureLRController):
        def threshold(self, optimizer, group):
            return value

    model = Classifier(mlp(), lr=0.25)
    trainer = Trainer(callbacks=[FixedSignal(lambda step: 1.0), Broken()], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="Broken.threshold must return None or a finite number > 0"):
        trainer.fit(model, loader(random_data(16)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="loose"), "mode"),
        (dict(margin=1.0), "margin"),
        (dict(margin=0.0), "margin"),
        (dict(s_min=0.0), "s_min"),
        (dict(s_min=1.5), "s_min"),
        (dict(recovery=0.9), "recovery"),
        (dict(max_ratio=0.9), "max_ratio"),
        (dict(bound_growth=math.inf), "bound_growth"),
        (dict(spike_factor=1.0), "spike_factor"),
        (dict(hysteresis=float("nan")), "hysteresis"),
        (dict(emergency_factor=0.0), "emergency_factor"),
        (dict(signal="secant"), "signal"),
        (dict(max_age=-1), "max_age"),
        (dict(probe_iterations=1), "probe_iterations"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurvatureLRController(**kwargs)


@pytest.mark.slow
def test_ddp_every_rank_uses_the_same_learning_rate(tmp_path):
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_lr.py", tmp_path)
    assert rank0["used"] == rank1["used"] and len(rank0["used"]) == 4
    assert rank0["used"][0][0] == pytest.approx(0.1 * 0.5 * 2 / (0.1 * 40.0))  # the max over ranks decided
    assert rank0["controller"] == rank1["controller"]  # same bounds and loss average from different shards
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key])


def test_an_optimizer_subclass_calling_super_step_is_throttled_once(tmp_path):
    class Wrapped(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)  # hooks run for Wrapped.step and again for SGD.step

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])  # SGD.step is hooked once any SGD exists
    model = Classifier(mlp(), lr=0.1)
    seen = []

    def make():
        opt = Wrapped(model.parameters(), lr=0.1)
        opt.register_step_post_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
        return opt

    model.configure_optimizers = make
    fit(tmp_path, model, [FixedSignal(lambda step: 1.0), Half()])
    assert seen[0::2] == [0.05] * 4 and model.optimizers().optimizer.param_groups[0]["lr"] == 0.1


def test_nonfinite_gradient_with_a_finite_loss_is_caught_when_skipping(tmp_path):
    class NaNGrad(Classifier):
        def on_after_backward(self):
            if self.global_step == 1:
                self.net[0].weight.grad[0, 0] = float("inf")  # backward overflow: the loss itself is finite

        def configure_optimizers(self):
            return RecordingSGD(self.parameters(), lr=self.lr)

    model = NaNGrad(mlp(), lr=0.1)
    controller = CurvatureLRController(skip_nonfinite=True)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller])
    assert controller.states[0].n_emergencies == 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("loss", "finite"),
    [(1.0, True), (math.nan, False), (math.inf, False), ([1.0, 2.0], True), ([1.0, math.nan], False)],
)
def test_loss_check_of_scalar_and_non_scalar_losses(tmp_path, loss, finite):
    """Scalar losses are read with `.item()`; a non-scalar one (manual optimization) is checked element-wise."""
    controller = CurvatureLRController()
    controller.on_before_backward(Trainer(**trainer_kwargs(tmp_path)), None, torch.tensor(loss))
    assert controller._loss_finite is finite


class SpikeAt(Classifier):
    """SGD at ``lr``; the loss is multiplied by ``factor`` at step ``spike_step`` (a spike the loss reader sees)."""

    def __init__(self, lr=0.01, spike_step=None, factor=3.0, shift=0.0):
        super().__init__(mlp(), lr=lr)
        self.spike_step, self.factor, self.shift = spike_step, factor, shift
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx) + self.shift
        loss = loss * self.factor if self.global_step == self.spike_step else loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=self.lr)


class BoundRecorder(FixedSignal):
    """The fixed signal, plus the controller's bound after every step."""

    def __init__(self, lam, controller):
        super().__init__(lambda step: lam)
        self.controller, self.bounds = controller, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bounds.append(self.controller.states[0].bound)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["adaptive", "strict", "guard"])
def test_adaptive_bound_grows_while_calm_and_halves_on_a_spike_cutting_that_step(tmp_path, mode, order):
    """In both hook orders: the spike's step is cut by the spike handler or, where it runs first, by the pre-hook."""
    controller = CurvatureLRController(mode=mode, margin=0.5, bound_growth=1.2, max_ratio=2.0, recovery=2.0)
    recorder = BoundRecorder(400.0, controller)  # lr 0.01: unthrottled ratio 2
    model = SpikeAt(spike_step=8)
    fit(tmp_path, model, [recorder, controller], data=random_data(192), **ORDERS[order])
    used = [row[0] * 400.0 / 2 for row in model.optimizers().optimizer.used]  # effective ratios
    bounds = recorder.bounds
    assert len(used) == 12 and controller.n_spikes == 1  # the 3x loss, and no false alarm on the others
    average = model.losses[0]
    for loss in model.losses[1:]:
        average = 0.9 * average + 0.1 * loss  # the moving average spikes are judged against
    assert controller.loss_ema == pytest.approx(average, rel=1e-12)
    if mode != "adaptive":
        assert bounds == [controller.initial_bound] * 12
        return
    expected = [min(2.0, 0.5 * 1.2 ** (t + 1)) for t in range(8)]  # grows from the margin, capped at max_ratio
    assert bounds[:8] == pytest.approx(expected, rel=1e-12)
    assert bounds[8] == pytest.approx(bounds[7] / 2, rel=1e-12) and bounds[9] == pytest.approx(bounds[8] * 1.2)
    assert used[8] == pytest.approx(bounds[8], rel=1e-12) and used[8] < used[7]  # the spike's step is cut at once
    # the bound each step's pre-hook saw: the previous step's, or this one's where the loss is read first
    in_force = bounds if order == "closure_first" else [0.5, *bounds[:-1]]
    assert all(u <= b * (1 + 1e-12) for u, b in zip(used, in_force))
    assert used[0] == pytest.approx(in_force[0]) and max(used) > 1.0  # strict at first, past the threshold when calm


def test_lbfgs_counts_the_loss_of_its_first_closure_evaluation_once_a_step(tmp_path):
    """LBFGS evaluates its closure (and Lightning's ``on_before_optimizer_step``) several times a step: the step's
    loss is the first evaluation's, at the parameters the step starts from."""

    class LBFGSModel(SpikeAt):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)

    controller = CurvatureLRController()
    model = LBFGSModel()
    with pytest.warns(UserWarning, match="No stability threshold is known for LBFGS"):
        trainer = fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller], max_steps=3)
    per_step = len(model.losses) // trainer.global_step
    assert trainer.global_step == 3 and per_step > 1 and len(model.losses) == 3 * per_step
    average = model.losses[0]
    for loss in model.losses[per_step::per_step]:
        average = 0.9 * average + 0.1 * loss
    assert controller.loss_ema == pytest.approx(average, rel=1e-12)


def test_the_step_loss_is_the_mean_over_accumulated_micro_batches(tmp_path):
    controller = CurvatureLRController()
    model = SpikeAt()
    fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller], max_steps=1, accumulate_grad_batches=2)
    assert len(model.losses) == 2
    assert controller.loss_ema == pytest.approx(sum(model.losses) / 2, rel=1e-6)  # Lightning divides each by 2


def test_a_step_with_fewer_micro_batches_reads_the_mean_of_those_it_has(tmp_path):
    """A ``training_step`` that returns ``None`` (or an epoch's last, incomplete accumulation window) leaves a step
    fewer micro-batches: its loss read as halved, and the next full step as a spike that cut the LR."""

    class SkipsSecond(SpikeAt):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    controller = CurvatureLRController()
    model = SkipsSecond()
    fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller], max_steps=2, accumulate_grad_batches=2)
    assert len(model.losses) == 3 and controller.n_spikes == 0  # step 1: micro-batch 0 alone; step 2: 2 and 3
    decay = controller.LOSS_EMA_DECAY
    mean = decay * model.losses[0] + (1 - decay) * (model.losses[1] + model.losses[2]) / 2
    assert controller.loss_ema == pytest.approx(mean, rel=1e-6)


def test_the_loss_read_is_the_controlled_optimizers_own(tmp_path):
    """Two optimizers stepping in turn on every batch (manual optimization, a GAN's pattern), the second on a loss
    100x larger: the controller, which controls the first, reads the first's loss alone. It read the mean of the
    second's loss of the last batch and the first's: the ``spike_factor`` saw the average jump, and the LR was cut."""

    class TwoPlayers(Classifier):
        def __init__(self):
            super().__init__(mlp(), lr=0.01)
            self.automatic_optimization = False
            self.losses = []

        def lip_loss(self, batch):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def training_step(self, batch, batch_idx):
            first, second = self.optimizers()
            for optimizer, scale in ((first, 1.0), (second, 100.0)):
                loss = scale * self.lip_loss(batch)
                if optimizer is first:
                    self.losses.append(loss.item())
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[i].parameters(), lr=0.01) for i in (0, 4)]

    controller = CurvatureLRController()
    model = TwoPlayers()
    with pytest.warns(UserWarning, match="controls the first optimizer only"):
        fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller])
    average = model.losses[0]
    for loss in model.losses[1:]:
        average = controller.LOSS_EMA_DECAY * average + (1 - controller.LOSS_EMA_DECAY) * loss
    assert len(model.losses) == 4 and controller.n_spikes == 0
    assert controller.loss_ema == pytest.approx(average, rel=1e-6)


def test_a_negative_loss_warns_once_and_holds_the_bound(tmp_path):
    controller = CurvatureLRController(margin=0.5)
    recorder = BoundRecorder(400.0, controller)
    with pytest.warns(UserWarning, match="negative loss") as record:
        fit(tmp_path, SpikeAt(shift=-10.0), [recorder, controller])
    assert sum("negative loss" in str(w.message) for w in record) == 1
    assert recorder.bounds == [0.5] * 4 and controller.n_spikes == 0


class CounterRecorder(FixedSignal):
    """The fixed signal, plus the controller's event counters after every step (placed after the controller)."""

    def __init__(self, lam, controller):
        super().__init__(lam)
        self.controller, self.counts = controller, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(self.controller._event_counts())


@pytest.mark.parametrize("every", [1, 2])
def test_event_counters_reach_every_logging_step_but_are_passed_to_log_only_when_they_change(tmp_path, every):
    from lightning.pytorch.loggers import CSVLogger

    class Spy(SpikeAt):
        def log_dict(self, dictionary, **kwargs):
            if kwargs["on_step"]:  # not the values handed to the monitors at the epochs' ends
                self.passed.append(sorted(key for key in dictionary if "/n_" in key))
            super().log_dict(dictionary, **kwargs)

    controller = CurvatureLRController(mode="strict", recovery=2.0)
    recorder = CounterRecorder(lambda step: 400.0 if step == 1 else 1.0, controller)  # a cut, two recoveries
    model, logger, counters = Spy(), CSVLogger(tmp_path), sorted(controller._event_counts())
    model.passed = []
    fit(tmp_path, model, [controller, recorder], random_data(80), logger=logger, log_every_n_steps=every, max_epochs=2)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["lip/lr/throttle"]]
    logged = [t for t in range(10) if (t + 1) % every == 0]  # epochs of 5 steps
    assert [int(row["step"]) for row in rows] == logged and all(row["lip/lr/signal"] for row in rows)
    assert [{key: float(row[key]) for key in counters} for row in rows] == [recorder.counts[t] for t in logged]
    seen = [(recorder.counts[t], t // 5) for t in logged]  # changed since the last logging step, or a new epoch
    changed = [i == 0 or seen[i] != seen[i - 1] for i in range(len(seen))]
    assert sum(changed) < len(logged) and model.passed == [counters if c else [] for c in changed]


def test_under_a_grad_scaler_the_loss_is_read_unscaled_and_overflows_are_no_emergency(tmp_path):
    """``precision="16-mixed"``: Lightning hands ``on_before_backward`` the loss times the GradScaler's scale. Read
    as is, every doubling of the scale was a loss spike that halved the bound (15 spikes in 32 steps here). With
    ``skip_nonfinite`` the gradients of the steps the scaler skips for overflowing were an emergency that cut the LR
    (the scaler drops those updates itself)."""
    controller = CurvatureLRController(skip_nonfinite=True)
    model = OverflowsAt(mlp(), lr=0.05)
    scaler = fp16_grad_scaler(init_scale=2.0**10, growth_interval=2)
    fit(tmp_path, model, [FixedSignal(lambda step: 1.0), controller], max_epochs=8, plugins=[scaler])
    changes = [b / a for a, b in zip(model.scales, model.scales[1:]) if a != b]
    assert 2.0 in changes and 0.5 in changes  # the scale grew, and the scaler skipped overflowing steps
    assert len(model.stepped) < len(model.losses) == 32
    average = model.losses[0]
    for loss in model.losses[1:]:
        average = controller.LOSS_EMA_DECAY * average + (1 - controller.LOSS_EMA_DECAY) * loss
    assert controller.loss_ema == pytest.approx(average, rel=1e-12)  # scaling by a power of two is exact
    assert controller.n_spikes == 0 and controller.states[0].n_emergencies == 0


def test_gradient_ascent_is_left_alone(tmp_path):
    """``maximize=True`` ascends the loss: its stability is set by ``-lambda_min``, not ``lambda_max``. The
    controller throttled it on ``lambda_max`` as if it descended."""
    controller = CurvatureLRController()
    model = Classifier(mlp(), optimizer=lambda params: RecordingSGD(params, lr=0.01, maximize=True))
    with pytest.warns(UserWarning, match="maximize=True ascends the loss"):
        fit(tmp_path, model, [FixedSignal(lambda step: 1000.0), controller])  # lr * lambda_max / 2 = 5
    assert model.optimizers().optimizer.used == [[0.01]] * 4 and controller.states[0].throttle == 1.0
