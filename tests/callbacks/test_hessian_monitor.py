import math
import random

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_lip import CurvatureLRController, HessianEigenMonitor, LipRegistry
from lightning_lip.callbacks._measuring import measurement_mode, module_loss
from lightning_lip.functional.hvp import hvp_operator
from tests.models import (
    Classifier,
    NoisyInputs,
    TinyRNN,
    TinyTransformer,
    cnn,
    loader,
    mlp,
    random_data,
    trainer_kwargs,
)
from tests.reference import dense_hessian


class Float64Classifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x.to(torch.float64)), y)
        self.log("train_loss", loss)
        return loss


def fit(tmp_path, model, data, callbacks, **kw):
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, loader(data))
    return trainer


def probe_tensors(monitor):
    xs = torch.cat([b[0] for b in monitor._probe])
    ys = torch.cat([b[1] for b in monitor._probe])
    return xs, ys


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer", "GRU", "LSTM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_max_and_min_match_dense_hessian(tmp_path, seed, arch, dtype):
    torch.manual_seed(seed)
    net, shape = {
        "mlp": (lambda: mlp((8, 12, 12, 4)), (8,)),
        "cnn": (cnn, (1, 8, 8)),
        "transformer": (lambda: TinyTransformer(classes=4), (5, 8)),
        "GRU": (lambda: TinyRNN("GRU", classes=4), (5, 8)),
        "LSTM": (lambda: TinyRNN("LSTM", classes=4), (5, 8)),
    }[arch]
    net = net()
    model = Float64Classifier(net.to(dtype), lr=0.1) if dtype == torch.float64 else Classifier(net, lr=0.1)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=400, tol=tol, num_samples=32, converge_min=True)
    fit(tmp_path, model, random_data(32, shape, seed=seed), [monitor])
    # the last measurement (step 2) saw the parameters of step 2 = the final ones
    xs, ys = probe_tensors(monitor)
    H = dense_hessian(model.net.double(), F.cross_entropy, xs.double(), ys)
    exact = torch.linalg.eigvalsh(H)
    assert monitor.last["lip/hessian/converged"] == 1.0
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(exact[-1].item(), rel=tol)
    scale = exact.abs().max().item()  # lambda_min can be ~0: its error is relative to the operator's scale
    assert monitor.last["lip/hessian/lambda_min"] == pytest.approx(exact[0].item(), abs=tol * scale)


def test_k_above_the_number_of_parameters_reports_every_eigenvalue(tmp_path):
    """``k=10`` on a model of 6 parameters (a 2-class logistic regression): one warning, and the 6 eigenvalues of
    the dense Hessian (float64, 1e-9: 6 products span the whole space). It raised in the middle of training."""
    torch.manual_seed(0)
    model = Float64Classifier(torch.nn.Linear(2, 2).double(), lr=0.1)
    monitor = HessianEigenMonitor(every_n_steps=2, k=10, tol=1e-9, num_samples=32)
    with pytest.warns(UserWarning, match=r"`k=10` exceeds the 6 parameters measured"):
        fit(tmp_path, model, random_data(32, (2,), classes=2), [monitor])
    xs, ys = probe_tensors(monitor)
    exact = torch.linalg.eigvalsh(dense_hessian(model.net, F.cross_entropy, xs.double(), ys)).flip(0)
    measured = [monitor.last[f"lip/hessian/lambda_{i + 1}"] for i in range(6)]
    assert "lip/hessian/lambda_7" not in monitor.last and monitor.last["lip/hessian/converged"] == 1.0
    assert measured == pytest.approx(exact.tolist(), abs=1e-9 * exact.abs().max().item())


def test_bf16_true_precision_matches_the_dense_hessian_of_its_weights(tmp_path):
    """``precision="bf16-true"``: the products run in bfloat16, Lanczos in float32. Against the float64 Hessian of
    the same bfloat16 weights and inputs: within 1e-2 (bfloat16 keeps 8 significant bits, 4e-3 per rounding; the
    measurement here is 4e-5 off, where Lanczos in bfloat16 was 86 % low)."""
    torch.manual_seed(0)
    model = Classifier(mlp((16, 32, 32, 4)), lr=0.1)
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=100, num_samples=64)
    fit(tmp_path, model, random_data(64), [monitor], precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16
    xs, ys = probe_tensors(monitor)
    exact = torch.linalg.eigvalsh(dense_hessian(model.net.double(), F.cross_entropy, xs.double(), ys))
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(exact[-1].item(), rel=1e-2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_warm_started_measurements_match_dense_hessian(tmp_path, seed, arch):
    """Runs 2 and 3 start from the previous eigenvector (residual bar = tol instead of tol/100): still within tol,
    in fewer HVPs than the cold first run."""
    torch.manual_seed(seed)
    net, shape = (mlp((8, 12, 12, 4)), (8,)) if arch == "mlp" else (cnn(), (1, 8, 8))
    model = Classifier(net, lr=0.1)
    tol = 1e-4
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=400, tol=tol, num_samples=32, cold_every_n_runs=0)
    hvps = []
    monitor_measure = monitor.measure

    def measure(*args, **kwargs):
        metrics = monitor_measure(*args, **kwargs)
        hvps.append(metrics["lip/hessian/n_hvp"])
        return metrics

    monitor.measure = measure
    fit(tmp_path, model, random_data(32, shape, seed=seed), [monitor], max_epochs=3)
    xs, ys = probe_tensors(monitor)
    exact = torch.linalg.eigvalsh(dense_hessian(model.net.double(), F.cross_entropy, xs.double(), ys))
    assert monitor.n_runs == 3 and monitor.last["lip/hessian/converged"] == 1.0
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(exact[-1].item(), rel=tol)
    assert max(hvps[1:]) < hvps[0]


class BNDropout(Classifier):
    def __init__(self):
        super().__init__(
            nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3))
        )


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_batchnorm_and_dropout_against_dense(tmp_path, bn_mode):
    model = BNDropout().double()
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    monitor = HessianEigenMonitor(
        every_n_steps=1, max_iter=200, tol=1e-8, num_samples=16, bn_mode=bn_mode, converge_min=True
    )
    trainer = Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model, loader(data, batch_size=16))
    reference = model.net
    reference.eval()  # dropout off
    if bn_mode == "train":
        reference[1].train()
    xs, ys = probe_tensors(monitor)
    H = dense_hessian(reference, F.cross_entropy, xs, ys)
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-7)


def test_sync_batchnorm_is_measured_on_its_ranks_batch_statistics(monkeypatch):
    """Under DDP a training-mode ``SyncBatchNorm`` synchronizes its statistics in an ``autograd.Function`` that
    ``torch.func`` cannot transform (on GPUs; on CPUs it refuses to run). The measurement gives it the rank's own
    batch statistics: the loss and its Hessian-vector products of a plain BatchNorm."""
    torch.manual_seed(0)
    synced = BNDropout().double()
    synced.net[1] = nn.SyncBatchNorm.convert_sync_batchnorm(synced.net[1])
    plain = BNDropout().double()
    plain.load_state_dict(synced.state_dict())
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the synchronizing branch
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        synced.train().net(x)
    v = torch.randn(sum(p.numel() for p in plain.parameters()), dtype=torch.float64)
    products = []
    for model in (synced, plain):
        with measurement_mode(model, batch_norm_train=True):
            products.append(hvp_operator(model, module_loss(model), [(x, y)])(v))
    assert torch.equal(products[0], products[1])
    assert "forward" not in vars(synced.net[1]) and synced.training  # restored


class NoisyBNDropout(NoisyInputs, BNDropout):
    pass


@pytest.mark.parametrize("make", [BNDropout, NoisyBNDropout])
def test_training_is_bit_identical_with_and_without_monitor(tmp_path, make):
    """Also when ``training_step``, which the monitor evaluates for the loss, draws random numbers."""

    def run(callbacks):
        torch.manual_seed(5)
        random.seed(5)
        model = make()
        fit(tmp_path, model, random_data(64, (6,), classes=3), callbacks, max_epochs=2)
        return model

    plain = run([])
    monitor = HessianEigenMonitor(every_n_steps=2, data="current")
    monitored = run([monitor])
    assert monitor.n_runs == 4
    for (k, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(
        p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), monitored.parameters())
    )


def test_publishes_and_logs_stability_ratio(tmp_path):
    monitor = HessianEigenMonitor(every_n_steps=2)
    model = Classifier(mlp(), lr=0.3, momentum=0.9)
    trainer = fit(tmp_path, model, random_data(64), [monitor], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    reg = LipRegistry.of(trainer)
    lam = reg.get("hessian/lambda_max")
    assert reg.step_of("hessian/lambda_max") == 4 and reg.get("hessian/preconditioned") is False
    assert reg.get("hessian/eigenvector").shape == (sum(p.numel() for p in model.parameters()),)
    logged = trainer.logged_metrics
    assert logged["lip/hessian/lambda_max"].item() == pytest.approx(lam)
    threshold = (2 + 2 * 0.9) / (1 - 0.0)
    assert logged["lip/hessian/threshold"].item() == pytest.approx(threshold)
    assert logged["lip/hessian/stability_ratio"].item() == pytest.approx(0.3 * lam / threshold, rel=1e-6)
    assert {"lip/hessian/lambda_min", "lip/hessian/residual", "lip/hessian/n_hvp", "lip/hessian/seconds"} <= set(logged)


class AdamClassifier(Float64Classifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


PRECONDITIONED = {  # optimizer, its preconditioner P from its state (the documented update rule), threshold
    "adam": (
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda s: (s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))).sqrt() + 1e-8,
        38.0,
    ),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), lambda s: s["exp_inf"], 38.0),
    "rmsprop": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
        lambda s: s["square_avg"].sqrt() + 1e-8,
        3.0,
    ),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-2), lambda s: s["sum"].sqrt() + 1e-10, 2.0),
}


@pytest.mark.parametrize("name", list(PRECONDITIONED))
def test_preconditioned_optimizers_use_the_preconditioned_hessian(tmp_path, name):
    make, from_state, threshold = PRECONDITIONED[name]
    model = Float64Classifier(mlp((5, 6, 3)).double(), optimizer=make)
    monitor = HessianEigenMonitor(every_n_steps=2, tol=1e-8, max_iter=200, num_samples=16, converge_min=True)
    trainer = fit(tmp_path, model, random_data(16, (5,), classes=3), [monitor], max_epochs=2)
    opt = trainer.optimizers[0]
    p_inv_sqrt = torch.cat([from_state(opt.state[p]).reshape(-1) for p in model.parameters()]).rsqrt()
    xs, ys = probe_tensors(monitor)
    H = dense_hessian(model.net, F.cross_entropy, xs.double(), ys)
    exact = torch.linalg.eigvalsh(p_inv_sqrt[:, None] * H * p_inv_sqrt[None, :])[-1].item()
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(exact, rel=1e-6)
    assert LipRegistry.of(trainer).get("hessian/preconditioned") is True
    assert monitor.last["lip/hessian/threshold"] == pytest.approx(threshold)


class AdamBatchNorm(AdamClassifier):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3)).double())


def test_adam_with_batchnorm_measures_the_hessian_the_optimizer_descends(tmp_path):
    """By default BatchNorm uses the probe batch's statistics, as in training, and coordinates whose gradient RMS
    stays at or below Adam's eps are left out. The bias before the BatchNorm gets no gradient in training but has
    curvature under running statistics: with the former default (``bn_mode="eval"``, every coordinate) its
    ``1/eps`` made lambda_max over 1e5 times larger here (~1e7 on a digits CNN)."""
    model = AdamBatchNorm()
    monitor = HessianEigenMonitor(every_n_steps=2, tol=1e-8, max_iter=200, num_samples=16)
    trainer = fit(tmp_path, model, random_data(16, (6,), classes=3), [monitor], max_epochs=2)
    opt = trainer.optimizers[0]
    rms = torch.cat(
        [
            (opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt().reshape(-1)
            for p in model.parameters()
        ]
    )
    assert (rms[60:70] <= 1e-8).all() and (rms[:60] > 1e-8).all() and (rms[70:] > 1e-8).all()  # net.0.bias only
    p_inv_sqrt = torch.where(rms > 1e-8, (rms + 1e-8).rsqrt(), torch.zeros(()))
    xs, ys = probe_tensors(monitor)
    net = model.net.train()
    H = dense_hessian(net, F.cross_entropy, xs.double(), ys)
    exact = torch.linalg.eigvalsh(p_inv_sqrt[:, None] * H * p_inv_sqrt[None, :])[-1].item()
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(exact, rel=1e-6)
    p_all = (rms + 1e-8).rsqrt()
    H_eval = dense_hessian(net.eval(), F.cross_entropy, xs.double(), ys)
    assert torch.linalg.eigvalsh(p_all[:, None] * H_eval * p_all[None, :])[-1].item() > 1e5 * exact


def test_the_controller_leaves_adam_with_batchnorm_alone_at_a_stable_lr(tmp_path):
    """The former measurement put this network's lambda_max over 1e5 times too high, and the controller cut the LR
    to ``s_min``; at ``lr=1e-2`` the ratio is far below the threshold and the LR stays the scheduled one."""
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=20)
    controller = CurvatureLRController()
    fit(tmp_path, AdamBatchNorm(), random_data(64, (6,), classes=3), [monitor, controller], max_epochs=2)
    assert monitor.n_runs == 4 and monitor.last["lip/hessian/stability_ratio"] < 0.1
    assert controller.states[0].throttle == 1.0 and controller.states[0].n_cuts == 0


class NaNAtStep(Classifier):
    """Its loss is NaN while the monitor measures (logging muted), finite for training."""

    def lip_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1]) * float("nan")


def test_nan_loss_skips_measurement_and_training_continues(tmp_path):
    monitor = HessianEigenMonitor(every_n_steps=1)
    model = NaNAtStep(mlp())
    with pytest.warns(UserWarning, match="non-finite loss or HVP"):
        trainer = fit(tmp_path, model, random_data(64), [monitor])
    assert trainer.global_step == 4 and monitor.n_skipped == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "hessian/lambda_max" not in LipRegistry.of(trainer)


def test_frozen_and_unused_parameters(tmp_path):
    class Partly(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.unused = nn.Linear(3, 3)  # gets no gradient
            self.net[0].requires_grad_(False)

    monitor = HessianEigenMonitor(every_n_steps=2)
    fit(tmp_path, Partly(), random_data(64), [monitor])
    assert monitor.n_runs == 2 and math.isfinite(monitor.last["lip/hessian/lambda_max"])


def test_the_hessian_is_over_the_parameters_the_optimizer_steps(tmp_path):
    """A head fine-tuned alone, its parameters alone passed to SGD, the backbone still trainable: the update map moves
    the head only, so its stability is the head's Hessian block. The whole model's Hessian was measured (Adam's
    preconditioner already gave the backbone's coordinates 0)."""
    torch.manual_seed(0)
    model = Float64Classifier(mlp((8, 12, 12, 4)).double())
    model.make_optimizer = lambda params: torch.optim.SGD(model.net[4].parameters(), lr=0.1)
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=200, tol=1e-8, num_samples=32, converge_min=True)
    fit(tmp_path, model, random_data(32, (8,)), [monitor])
    xs, ys = probe_tensors(monitor)
    whole = torch.linalg.eigvalsh(dense_hessian(model.net, F.cross_entropy, xs.double(), ys))
    model.net[:4].requires_grad_(False)
    head = torch.linalg.eigvalsh(dense_hessian(model.net, F.cross_entropy, xs.double(), ys))
    assert whole[-1] > 1.3 * head[-1]
    assert monitor.last["lip/hessian/lambda_max"] == pytest.approx(head[-1].item(), rel=1e-6)
    assert monitor.last["lip/hessian/lambda_min"] == pytest.approx(head[0].item(), abs=1e-6 * head[-1].item())


def test_cadence_counts_optimizer_steps_when_a_batch_takes_several(tmp_path):
    """Two optimizers stepping on every batch (manual optimization, a GAN's pattern): the optimizer step advances by 2
    a batch, so ``every_n_steps=3`` measures at the first batch end at or after each multiple of 3. Only the batches
    ending on a multiple of 3 (steps 6 and 12 of 12) were measured: every 6 steps."""

    class TwoOptimizers(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.automatic_optimization = False

        def lip_loss(self, batch):
            return F.cross_entropy(self(batch[0]), batch[1])

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                optimizer.zero_grad()
                self.manual_backward(self.lip_loss(batch))
                optimizer.step()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[i].parameters(), lr=0.1) for i in (0, 2)]

    class Steps(HessianEigenMonitor):
        def measure(self, trainer, pl_module, probe):
            self.steps = getattr(self, "steps", []) + [trainer.global_step]
            return super().measure(trainer, pl_module, probe)

    monitor = Steps(every_n_steps=3)
    trainer = fit(tmp_path, TwoOptimizers(), random_data(96), [monitor])
    assert trainer.global_step == 12 and monitor.steps == [4, 6, 10, 12]


def test_resume_continues_exactly(tmp_path):
    data = random_data(64)

    def cb():
        return HessianEigenMonitor(every_n_steps=3, cold_every_n_runs=2, num_samples=32)

    full = cb()
    torch.manual_seed(0)
    fit(tmp_path / "a", Classifier(mlp()), data, [full], max_epochs=4)
    first = cb()
    torch.manual_seed(0)
    model = Classifier(mlp())
    t1 = fit(tmp_path / "b", model, data, [first], max_epochs=2)
    t1.save_checkpoint(tmp_path / "c.ckpt")
    torch.load(tmp_path / "c.ckpt", weights_only=True)
    second = cb()
    torch.manual_seed(0)
    Trainer(callbacks=[second], **trainer_kwargs(tmp_path / "b", max_epochs=4)).fit(
        Classifier(mlp()), loader(data), ckpt_path=tmp_path / "c.ckpt"
    )
    assert second.n_runs == full.n_runs == 5
    assert second.last["lip/hessian/lambda_max"] == full.last["lip/hessian/lambda_max"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(k=0), "`k`"),
        (dict(max_iter=1), "max_iter"),
        (dict(tol=0.0), "tol"),
        (dict(data="random"), "data"),
        (dict(num_samples=0), "num_samples"),
        (dict(bn_mode="frozen"), "bn_mode"),
        (dict(warm_mix=-1.0), "warm_mix"),
        (dict(cold_every_n_runs=-1), "cold_every_n_runs"),
        (dict(density_vectors=0), "density_vectors"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianEigenMonitor(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("shards", ["even", "uneven"])
def test_ddp_equals_single_process_on_the_global_probe_set(tmp_path, shards):
    """Uneven shards (16 and 8 samples): the products are averaged over samples, not over ranks."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_hessian.py", tmp_path, shards)
    assert len(rank0["y"]) == 16 and len(rank1["y"]) == (8 if shards == "uneven" else 16)
    assert rank0["lambda_max"] == rank1["lambda_max"] and rank0["lambda_min"] == rank1["lambda_min"]
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key])
    net = mlp((8, 12, 12, 4)).double()
    net.load_state_dict({k[len("net.") :]: v.double() for k, v in rank0["params"].items()})
    xs = torch.cat([rank0["x"], rank1["x"]]).double()
    ys = torch.cat([rank0["y"], rank1["y"]])
    exact = torch.linalg.eigvalsh(dense_hessian(net, F.cross_entropy, xs, ys))
    assert rank0["lambda_max"] == pytest.approx(exact[-1].item(), rel=1e-5)
    assert rank0["lambda_min"] == pytest.approx(exact[0].item(), abs=1e-5 * exact.abs().max().item())


def test_stability_ratio_uses_the_least_stable_param_group(tmp_path):
    class TwoGroups(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(
                [{"params": self.net[0].parameters(), "lr": 0.1}, {"params": self.net[2:].parameters(), "lr": 0.3}],
                lr=0.1,
            )

    monitor = HessianEigenMonitor(every_n_steps=2)
    fit(tmp_path, TwoGroups(mlp()), random_data(64), [monitor])
    lam = monitor.last["lip/hessian/lambda_max"]
    assert monitor.last["lip/hessian/eta_lambda_max"] == pytest.approx(0.3 * lam)


def test_gradient_ascent_gets_no_stability_ratio(tmp_path):
    """``maximize=True``: stability depends on ``-lambda_min`` (``tests/functional/test_stability.py``)."""
    monitor = HessianEigenMonitor(every_n_steps=2)
    model = Classifier(mlp(), optimizer=lambda params: torch.optim.SGD(params, lr=0.1, maximize=True))
    with pytest.warns(UserWarning, match="No stability threshold is known for SGD with maximize=True"):
        fit(tmp_path, model, random_data(64), [monitor])
    assert monitor.n_runs == 2 and "lip/hessian/stability_ratio" not in monitor.last


def test_density_against_the_dense_spectrum_and_in_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Float64Classifier(mlp((8, 12, 4)).double(), lr=0.1)
    monitor = HessianEigenMonitor(every_n_steps=2, max_iter=60, num_samples=32, density=True, density_vectors=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fit(tmp_path, model, random_data(32, (8,)), [monitor], logger=logger, log_every_n_steps=1)
    density = LipRegistry.of(trainer).get("hessian/density")
    xs, ys = probe_tensors(monitor)
    exact = torch.linalg.eigvalsh(dense_hessian(model.net, F.cross_entropy, xs.double(), ys))
    # 60 steps on a 160-dim operator resolve the extremes; the weights are a probability per start vector
    assert density.nodes.max().item() == pytest.approx(exact[-1].item(), rel=1e-6)
    assert density.nodes.min().item() == pytest.approx(exact[0].item(), abs=1e-6 * exact.abs().max().item())
    torch.testing.assert_close(density.weights.sum(1), torch.ones(4, dtype=torch.float64))
    # Gauss quadrature reproduces the trace estimate: mean of nodes = tr(H)/n in expectation (Hutchinson, 4 vectors)
    mean = (density.nodes * density.weights).sum(1).mean().item()
    assert mean == pytest.approx(exact.mean().item(), abs=0.5 * exact.abs().max().item() / math.sqrt(4))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "lip/hessian/density" in events.Tags()["histograms"]
    assert "lip/hessian/stability_ratio" in events.Tags()["scalars"]


def test_a_checkpoints_probe_is_put_on_the_devices_of_the_resumed_batches():
    """A checkpoint saved under DDP holds every rank's probe on the CPU (and one saved on another device holds it
    there): the resumed run rebuilds it on its own batches' devices, leaf by leaf. ``meta`` stands in for an
    accelerator on this CPU machine."""
    monitor = HessianEigenMonitor()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    monitor.load_state_dict(monitor.state_dict() | {"probe_leaves": [[x, y, "digits"]], "probe_size": 4})
    batch = {"x": x[:2].to("meta"), "y": y[:2], "source": "digits"}
    (probe,) = monitor._restored_probe(batch)
    assert probe["x"].device.type == "meta" and probe["x"].shape == (4, 3)
    assert torch.equal(probe["y"], y) and probe["source"] == "digits"
