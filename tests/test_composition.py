"""All four callbacks together: order, batch containers, resume, accumulation, bf16, compile, lazy modules, manual
optimization, evaluation stages, DDP, every documented tag."""

import copy
import dataclasses
import math
import pickle
import warnings
from collections import deque, namedtuple
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, default_collate
from torchmetrics.classification import MulticlassAccuracy

from lightning_lip import (
    CurvatureLRController,
    GradientNoiseEstimator,
    HessianEigenMonitor,
    KappaBudgetProjection,
    LipRegistry,
)
from lightning_lip.callbacks._measuring import measurement_mode
from tests.ddp import DestroyProcessGroup
from tests.models import (
    BuiltInConfigureModel,
    Classifier,
    Encoding,
    OldStyleReLU,
    OverflowsAt,
    PairedNoiseEstimator,
    cnn,
    conv1d,
    fp16_grad_scaler,
    loader,
    mlp,
    random_data,
    sequences,
    trainer_kwargs,
)
from tests.reference import dense_operator_norm


def four(**noise):
    return [
        KappaBudgetProjection(max_lipschitz=3.0, audit_every_n_steps=3),
        HessianEigenMonitor(every_n_steps=2, max_iter=10, num_samples=32, density=True),
        GradientNoiseEstimator(every_n_steps=2, **noise),
        CurvatureLRController(margin=0.5, probe_every_n_steps=2),
    ]


Sample = namedtuple("Sample", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    seen: int = dataclasses.field(default=0, init=False)


class Custom:
    """The batch class of a custom ``collate_fn``: tensors in public attributes, something private, a ``to``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self._source = x, y, "digits"

    def to(self, device):
        return Custom(self.x.to(device), self.y.to(device))


class Unwrapping(Classifier):
    """Takes its samples as a tuple, a named tuple, a mapping, a dataclass or an object with ``x`` and ``y``."""

    def training_step(self, batch, batch_idx):
        if isinstance(batch, Mapping):
            batch = batch["x"], batch["y"]
        elif isinstance(batch, (Batch, Custom)):
            assert not isinstance(batch, Custom) or batch._source == "digits"
            batch = batch.x, batch.y
        return super().training_step(tuple(batch), batch_idx)


def collate(container):
    """Batches of (x, y) samples as a tuple, a named tuple, a dict that also holds file names and a 0-dim tensor, a
    mapping class with an attribute, a dataclass, or an object."""

    def to(items):
        x, y = default_collate(items)
        if container == "tuple":
            return x, y
        if container == "namedtuple":
            return Sample(x, y)
        if container == "mapping":
            return Encoding({"x": x, "y": y}, source="digits")
        if container == "dataclass":
            return Batch(x, y)
        if container == "object":
            return Custom(x, y)
        return {"names": [f"img{i}.png" for i in range(len(x))], "x": x, "y": y, "epoch": torch.tensor(0)}

    return to


def run(tmp_path, callbacks, max_epochs=2, ckpt=None, container="tuple", channels=1, model=None, **kw):
    torch.manual_seed(0)
    model = model or Unwrapping(cnn(channels), lr=2.0, momentum=0.5)  # large enough for the controller to cut
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=max_epochs, **kw))
    data = DataLoader(random_data(64, (channels, 8, 8)), batch_size=16, collate_fn=collate(container))
    trainer.fit(model, data, ckpt_path=ckpt)
    return trainer, model


def summary(trainer, model, callbacks):
    kappa, monitor, noise, controller = callbacks
    registry = LipRegistry.of(trainer)
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "sigmas": kappa.sigmas,
        "hessian": {k: v for k, v in monitor.last.items() if k != "lip/hessian/seconds"},
        "noise": {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")},
        "throttle": [vars(s) for s in controller.states],
        "lr": registry.get("lr/effective"),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    for key in ("sigmas", "hessian", "noise", "throttle", "lr"):
        assert a[key] == b[key], key


def test_callback_order_does_not_change_results(tmp_path):
    forward = four()
    reverse = four()
    a = summary(*run(tmp_path, forward), forward)
    b = summary(*run(tmp_path, list(reversed(reverse))), reverse)
    assert a["throttle"][0]["n_cuts"] > 0 and a["hessian"] and a["noise"]  # every callback did something
    assert_same(a, b)


@pytest.mark.parametrize("container", ["namedtuple", "dict", "mapping", "dataclass", "object"])
def test_batches_in_other_containers_give_the_same_results(tmp_path, container):
    """The same samples as a named tuple, a dict that also holds file names and a 0-dim tensor, a mapping class (as
    a tokenizer's ``BatchEncoding``), a dataclass or an object: every callback takes the same decisions as with the
    plain tuple (the probe's copy rebuilt named tuples wrongly, per-sample gradients failed on the names, and
    mappings other than dicts, and objects other than dataclasses, had no batch size)."""
    plain, wrapped = four(), four()
    assert_same(summary(*run(tmp_path, plain), plain), summary(*run(tmp_path, wrapped, container=container), wrapped))


@pytest.mark.parametrize("container", ["tuple", "namedtuple", "dataclass", "object"])
def test_resume_equals_uninterrupted(tmp_path, container):
    """The checkpoint loads with ``weights_only=True`` also where the probe holds batches of a class (it keeps
    their leaves, and the resumed run puts them back into its batches' structure)."""
    full = four()
    expected = summary(*run(tmp_path / "a", full, max_epochs=4, container=container), full)
    first = four()
    trainer, _ = run(tmp_path / "b", first, max_epochs=2, container=container)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain tensors and numbers only
    second = four()
    resumed = run(tmp_path / "b", second, max_epochs=4, ckpt=tmp_path / "c.ckpt", container=container)
    assert_same(summary(*resumed, second), expected)


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted_with_every_ranks_probe(tmp_path):
    """Each rank measures its own share of the fixed probe, and Lightning writes rank 0's callback states only:
    resumed, both ranks measured rank 0's share (here lambda_max 1.24 instead of 0.88 at the end), and the
    controller's rates followed (1.42 instead of 1.59 from step 11 on). Checkpoints now hold every rank's probe."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_resume.py", tmp_path)
    for name in ("monitor", "controller"):
        for rank in (rank0, rank1):
            full, resumed = rank[name]["last"]
            assert full == resumed and "lip/hessian/lambda_max" in full, name
            assert rank[name]["used"][0] == rank[name]["used"][1] and len(rank[name]["used"][0]) == 16, name
        assert not torch.equal(rank0[name]["probe"], rank1[name]["probe"])  # each rank's own samples
    assert min(lr for (lr,) in rank0["controller"]["used"][0]) < 2.0  # the controller acted


def test_inputs_of_varying_size_resume_equals_uninterrupted(tmp_path):
    """Sequences of another length in every batch: the convolutions are measured on the largest shapes seen, which
    the checkpoints keep, so a run resumed after the first epoch (whose first batch is shorter than the longest)
    equals the uninterrupted one."""

    def fit(path, callbacks, max_epochs, ckpt=None):
        torch.manual_seed(0)
        model = Classifier(conv1d(), lr=5.0, momentum=0.5)  # large enough for the controller to cut
        trainer = Trainer(callbacks=callbacks, **trainer_kwargs(path, max_epochs=max_epochs))
        trainer.fit(model, sequences(), ckpt_path=ckpt)
        return trainer, model

    full = four()
    expected = summary(*fit(tmp_path / "a", full, 4), full)
    assert "lip/noise/drift/net.0" in full[2].last and full[3].states[0].n_cuts > 0
    first = four()
    trainer, _ = fit(tmp_path / "b", first, 2)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    second = four()
    assert_same(summary(*fit(tmp_path / "b", second, 4, tmp_path / "c.ckpt"), second), expected)


def test_a_checkpoints_probe_that_does_not_fit_the_resumed_batches_is_collected_anew(tmp_path):
    first = four()
    trainer, _ = run(tmp_path, first, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    second = four()
    with pytest.warns(UserWarning, match="probe does not fit this run's batches"):
        run(tmp_path, second, max_epochs=2, ckpt=tmp_path / "c.ckpt", container="dict")
    monitor = second[1]
    assert all(isinstance(b, dict) for b in monitor._probe) and monitor._probe_size == 32
    assert monitor.n_runs == first[1].n_runs + 2


def test_a_fit_on_another_module_starts_afresh(tmp_path):
    """Callbacks reused for another network (other shapes under the same layer names) crashed on the first fit's
    pending prediction, probe and warm vectors; they now take the decisions new callbacks take. So do copies pickled
    after a fit (as ``ddp_spawn`` sends them), which forget the module."""
    reused, new = four(), four()
    run(tmp_path, reused, max_epochs=1)
    copies = pickle.loads(pickle.dumps(reused))
    expected = summary(*run(tmp_path, new, channels=3), new)
    assert_same(summary(*run(tmp_path, reused, channels=3), reused), expected)
    assert_same(summary(*run(tmp_path, copies, channels=3), copies), expected)


def test_a_second_fit_of_the_same_module_continues(tmp_path):
    """A fit that continues the same module (a new Trainer, no checkpoint) keeps the callbacks' state: the counters,
    the probe and the throttle go on."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    _, model = run(tmp_path, callbacks, max_epochs=1)
    probe, cuts = monitor._probe, controller.states[0].n_cuts
    assert (kappa.n_projections, monitor.n_runs, noise.n_runs) == (4, 2, 2) and cuts > 0
    run(tmp_path, callbacks, max_epochs=1, model=model)
    assert (kappa.n_projections, monitor.n_runs, noise.n_runs) == (8, 4, 4) and monitor._probe is probe
    assert controller.states[0].n_cuts >= cuts


class WithoutBatchIndex(Unwrapping):
    def training_step(self, batch):  # Lightning passes no batch_idx to a step that takes none
        return super().training_step(batch, 0)


def test_a_training_step_without_batch_idx(tmp_path):
    """The measurements called ``training_step(batch, 0)``, a ``TypeError`` that stopped the run."""
    torch.manual_seed(0)
    net, with_index, without = cnn(), four(), four()
    expected = summary(
        *run(tmp_path, with_index, model=Unwrapping(copy.deepcopy(net), lr=2.0, momentum=0.5)), with_index
    )
    got = summary(*run(tmp_path, without, model=WithoutBatchIndex(copy.deepcopy(net), lr=2.0, momentum=0.5)), without)
    assert_same(got, expected)
    assert without[1].n_runs == without[2].n_runs == 4 and without[3].states[0].n_cuts > 0


def test_gradient_accumulation(tmp_path):
    """One projection per optimizer step, and one at the end of fit: the circular convolution's estimate after the
    last step is 2 % below its norm (a Fourier block the tracked vector is locked out of took the top; only an
    audit finds it), and the end of fit's tight measurement corrects that."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    steps, project = [], kappa.project
    kappa.project = lambda trainer, step, audit=None: steps.append((step, audit)) or project(trainer, step, audit)
    trainer, model = run(tmp_path, callbacks, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and steps == [(1, None), (2, None), (3, None), (4, None), (4, True)]
    assert kappa.n_projections == 5 and monitor.n_runs == 2 and noise.n_runs == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


class SwitchesOptimizer(Callback):
    """From epoch 1 on, SGD with momentum instead of Adam, set on the strategy in ``on_train_epoch_start`` (Lightning's
    answer to "how do I change the optimizer during training", and PINA's ``SwitchOptimizer``). The new optimizer
    records the rate of each update (a step post-hook registered before the controller restores the scheduled one)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.old = trainer.optimizers[0]
            new = torch.optim.SGD(pl_module.parameters(), lr=8.0, momentum=0.9)
            new.used = []
            new.register_step_post_hook(lambda opt, args, kwargs: opt.used.append(opt.param_groups[0]["lr"]))
            trainer.strategy.optimizers = [new]


def test_an_optimizer_switched_during_fit_is_followed(tmp_path):
    """The projection and the estimator hook every optimizer step, the controller the first optimizer's: they move
    their hooks to the optimizer that replaces it. They stayed on the old one: no more projections (the product of
    the dense norms grew to 7e10 against the budget of 1), no throttle on a rate that makes training diverge."""

    class Norms(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            linears = [m for m in pl_module.modules() if isinstance(m, torch.nn.Linear)]
            products.append(math.prod(torch.linalg.matrix_norm(m.weight.detach(), 2).item() for m in linears))
            effective.append(LipRegistry.of(trainer).get("lr/effective")[0])

    products, effective = [], []
    switch, noise = SwitchesOptimizer(), PairedNoiseEstimator(every_n_steps=2)
    kappa, controller = KappaBudgetProjection(max_lipschitz=1.0), CurvatureLRController(mode="strict")
    callbacks = [switch, kappa, HessianEigenMonitor(every_n_steps=1, max_iter=10), noise, controller, Norms()]
    torch.manual_seed(0)
    model = Classifier(mlp(), optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model, loader(random_data(64)))
    assert trainer.global_step == 12 and kappa.n_projections >= 12
    assert max(products) <= 1.0 * (1 + 1e-2)  # the tolerance of the per-step estimate (see test_kappa_budget)
    assert not switch.old._optimizer_step_pre_hooks and not switch.old._optimizer_step_post_hooks
    (new,) = trainer.optimizers
    assert new.used == effective[4:] and min(new.used) < 8.0 / 2  # the rates the controller set, and it cut
    assert noise.predicted == noise.observed and max(noise.observed) >= 4


def test_bf16_autocast_on_cpu(tmp_path):
    callbacks = four()
    trainer, model = run(tmp_path, callbacks, precision="bf16-mixed")
    kappa, monitor, noise, controller = callbacks
    assert math.isfinite(monitor.last["lip/hessian/lambda_max"]) and math.isfinite(noise.last["lip/noise/trace"])
    assert kappa.bound <= 3.0 * (1 + 1e-2) and all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_autocast_with_a_grad_scaler_that_skips_a_step(tmp_path):
    """``precision="16-mixed"`` (its GradScaler on CPU): the step whose gradients overflow is skipped by the scaler,
    and by the projection; every measurement stays finite."""
    callbacks = four()
    model = OverflowsAt(cnn(), overflow_steps=(2,), lr=2.0, momentum=0.5)
    run(tmp_path, callbacks, model=model, plugins=[fp16_grad_scaler(init_scale=2.0**8)])
    kappa, monitor, noise, controller = callbacks
    assert model.stepped == [0, 1, 3, 4, 5, 6, 7] and kappa.n_projections == 7
    assert math.isfinite(monitor.last["lip/hessian/lambda_max"]) and math.isfinite(noise.last["lip/noise/trace"])
    assert kappa.bound <= 3.0 * (1 + 1e-2) and all(torch.isfinite(p).all() for p in model.parameters())
    assert controller.states[0].n_emergencies == 0 and 0 < controller.states[0].throttle <= 1


class Unlogged(Classifier):
    """Dynamo cannot trace Lightning's ``self.log`` inside a compiled ``training_step`` (with or without callbacks)."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("compiled", ["network", "module"])
def test_compiled(tmp_path, compiled):
    """``torch.compile`` on the network or on the whole LightningModule (dynamo traces the callbacks' forward hooks;
    the eager backend needs no C compiler): every callback measures and the budget holds."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    torch.manual_seed(0)
    model = Unlogged(cnn(), lr=2.0, momentum=0.5)
    if compiled == "network":
        model.net = torch.compile(model.net, backend="eager")
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(
        model if compiled == "network" else torch.compile(model, backend="eager"), loader(random_data(64, (1, 8, 8)))
    )
    assert kappa.n_projections == trainer.global_step == 8 and len(kappa.sigmas) == 3 and kappa.bound <= 3.0 * 1.01
    assert math.isfinite(monitor.last["lip/hessian/lambda_max"]) and math.isfinite(noise.last["lip/noise/trace"])
    prefix = "lip/noise/drift/net._orig_mod." if compiled == "network" else "lip/noise/drift/net."
    assert sum(key.startswith(prefix) for key in noise.last) == 3  # convs and linear
    assert controller.states[0].n_cuts > 0


def test_a_barebones_trainer_trains_with_every_callback_acting_and_nothing_logged(tmp_path):
    """``Trainer(barebones=True)`` disables logging: the callbacks' ``self.log`` calls warned as if the user's code
    logged ("You are trying to `self.log()`"), hundreds of times with the ``always`` filter."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    torch.manual_seed(0)
    trainer = Trainer(callbacks=callbacks, barebones=True, accelerator="cpu", max_epochs=2, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Unlogged(cnn(), lr=2.0, momentum=0.5), loader(random_data(64, (1, 8, 8))))
    assert not [w for w in caught if "barebones" in str(w.message)]
    assert kappa.n_projections == 8 and monitor.n_runs == 4 and noise.n_runs == 4 and controller.states[0].n_cuts > 0


def test_embeddings_with_sparse_gradients_are_measured_as_with_dense_ones(tmp_path, recwarn):
    """``torch.func`` and double backward take no sparse tensors: the monitor and the estimator stopped measuring a
    model with ``nn.Embedding(sparse=True)`` ("cannot differentiate"). They measure it with dense gradients: the
    same values as for ``sparse=False``, and the controller scans its sparse gradients."""
    data = torch.utils.data.TensorDataset(torch.randint(0, 50, (64, 2)), torch.randint(0, 4, (64,)))
    runs = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = Classifier(
            torch.nn.Sequential(torch.nn.Embedding(50, 8, sparse=sparse), torch.nn.Flatten(), torch.nn.Linear(16, 4)),
            lr=5.0,  # the controller cuts
        )
        monitor = HessianEigenMonitor(every_n_steps=2, max_iter=10, num_samples=32)
        noise = GradientNoiseEstimator(every_n_steps=2)
        controller = CurvatureLRController(margin=0.5, probe_every_n_steps=2, skip_nonfinite=True)
        Trainer(callbacks=[monitor, noise, controller], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            model, loader(data)
        )
        assert monitor.n_runs == noise.n_runs == 4 and monitor.failure is None and noise.failure is None
        measured = {k: v for k, v in (monitor.last | noise.last).items() if not k.endswith(("seconds", "overhead"))}
        runs[sparse] = measured, controller.states[0].throttle, model.state_dict()
    (sparse_metrics, sparse_throttle, sparse_params), (dense_metrics, dense_throttle, dense_params) = runs.values()
    # sparse and dense SGD updates round apart by an ulp (2.4e-7 here), which moves the metrics by up to 1.4e-6
    assert sparse_metrics == pytest.approx(dense_metrics, rel=1e-5) and sparse_throttle < 0.5
    assert sparse_throttle == pytest.approx(dense_throttle, rel=1e-6)
    assert all(torch.allclose(sparse_params[k], dense_params[k], rtol=0, atol=1e-6) for k in dense_params)


def test_lazy_modules(tmp_path):
    """Lazy layers have no parameters before the first forward pass: the controller's first measurement, which runs
    before it, waits for the next batch (it used to crash the run on an uninitialized parameter), and the
    projection covers the layers once they exist."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    torch.manual_seed(0)
    model = Classifier(
        torch.nn.Sequential(torch.nn.LazyConv2d(4, 3, padding=1), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    )
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, loader(random_data(64, (1, 8, 8))))
    assert controller._bootstrapped and monitor.n_runs == 4 and noise.n_runs == 4
    assert kappa.n_projections == 8 and list(kappa.sigmas) == ["net.0", "net.2"] and kappa.bound <= 3.0 * 1.01
    assert dense_operator_norm(model.net[0], (1, 8, 8)) * dense_operator_norm(model.net[2]) <= 3.0 * 1.01


def test_a_network_created_in_configure_model(tmp_path, recwarn):
    """Every callback takes the decisions it takes on the same network created in ``__init__``: the projection and
    the dynamics find their layers at the start of fit (at ``setup`` there were none: the projection was inert and
    no layer had dynamics)."""
    eager, lazy = four(), four()
    expected = summary(*run(tmp_path, eager), eager)
    got = summary(*run(tmp_path, lazy, model=BuiltInConfigureModel(cnn, lr=2.0, momentum=0.5)), lazy)
    assert_same(got, expected)
    assert set(got["sigmas"]) == {"net.0", "net.2", "net.5"} and any("/drift/net.0" in k for k in got["noise"])
    assert not [w for w in recwarn if "inert" in str(w.message)]


def test_weight_normalized_network(tmp_path, recwarn):
    """Weight normalization on every layer (as in audio models): all four callbacks work, the projection through
    the parametrization."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    torch.manual_seed(0)
    net = cnn()
    for i in (0, 2, 5):
        torch.nn.utils.parametrizations.weight_norm(net[i])
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(Classifier(net, lr=2.0, momentum=0.5), loader(random_data(64, (1, 8, 8))))
    assert kappa.n_projections == 8 and set(kappa.sigmas) == {"net.0", "net.2", "net.5"}
    assert kappa.bound <= 3.0 * (1 + 1e-2)
    assert monitor.n_runs == 4 and math.isfinite(monitor.last["lip/hessian/lambda_max"])
    assert noise.n_runs == 4 and math.isfinite(noise.last["lip/noise/trace"])
    assert controller.states[0].n_cuts > 0
    assert not [w for w in recwarn if "torch.func cannot" in str(w.message) or "frozen" in str(w.message)]


class Manual(Classifier):
    """Manual optimization: ``training_step`` steps the optimizer itself, so the loss comes from ``lip_loss``."""

    def __init__(self):
        super().__init__(mlp(), lr=2.0)
        self.automatic_optimization = False
        self.n_training_steps = 0

    def lip_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()
        self.n_training_steps += 1


def test_manual_optimization_with_lip_loss(tmp_path):
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    model = Manual()
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, loader(random_data(64)))
    assert model.n_training_steps == trainer.global_step == kappa.n_projections == 8  # no step from the callbacks
    assert monitor.n_runs == noise.n_runs == 4 and controller.states[0].n_cuts > 0
    assert math.isfinite(monitor.last["lip/hessian/lambda_max"]) and math.isfinite(noise.last["lip/noise/trace"])


@pytest.mark.parametrize("index", [1, 2, 3])
def test_manual_optimization_without_lip_loss_is_a_clear_error_at_setup(tmp_path, index):
    class NoLipLoss(Manual):
        lip_loss = None

    callback, model = four()[index], NoLipLoss()
    trainer = Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=f"{type(callback).__name__} evaluates the loss.*define `lip_loss"):
        trainer.fit(model, loader(random_data(64)))
    assert model.n_training_steps == 0


class _Checkpointed(torch.nn.Module):
    """Activation checkpointing: torch.func refuses its saved-tensor hooks; plain autograd differentiates the
    non-reentrant variant twice, not the reentrant one (``reentrant=None``: no checkpointing)."""

    def __init__(self, reentrant: bool | None = False):
        super().__init__()
        self.inner = mlp((32, 32, 32))
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.inner(x)
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


def _checkpointed(reentrant):
    return torch.nn.Sequential(mlp((16, 32)), torch.nn.ReLU(), _Checkpointed(reentrant), mlp((32, 4)))


def _fit_mlp(tmp_path, callbacks, model):
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, loader(random_data(64)))
    return trainer, model


def _measured(tmp_path, callbacks, make, lr=2.0, module=Classifier):
    torch.manual_seed(0)
    model = module(make(), lr=lr, momentum=0.5)
    return summary(*_fit_mlp(tmp_path, callbacks, model), callbacks)


@pytest.mark.parametrize(
    ("make", "plain"),
    [
        (
            lambda: torch.nn.Sequential(mlp((16, 32)), OldStyleReLU(), mlp((32, 4))),
            lambda: torch.nn.Sequential(mlp((16, 32)), torch.nn.ReLU(), mlp((32, 4))),
        ),
        (lambda: _checkpointed(False), lambda: _checkpointed(None)),
    ],
    ids=["function_without_setup_context", "activation_checkpointing"],
)
def test_models_torch_func_cannot_transform_are_measured_with_plain_autograd(tmp_path, make, plain, recwarn):
    """The Hessian's products are plain autograd double backwards anyway; the estimator warns once and loops over
    the samples with plain autograd instead of ``vmap``: the run takes the decisions it takes on the same network
    without the obstacle, up to float32 rounding (different operation orders)."""
    callbacks, reference = four(), four()
    got = _measured(tmp_path, callbacks, make)
    expected = _measured(tmp_path, reference, plain)
    kappa, monitor, noise, controller = callbacks
    assert monitor.failure is None and noise.failure is None and monitor.n_runs == noise.n_runs == 4
    warned = [str(w.message) for w in recwarn if "torch.func cannot transform" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith("GradientNoiseEstimator") and "loop over the samples" in warned[0]
    assert controller.states[0].n_cuts == reference[3].states[0].n_cuts > 0
    assert got["throttle"][0] == pytest.approx(expected["throttle"][0], rel=1e-5)
    for key in ("sigmas", "hessian", "noise"):  # measured: at most 3e-6 apart
        assert got[key] == pytest.approx(expected[key], rel=2e-5, abs=1e-7), key
    for key, value in expected["params"].items():
        torch.testing.assert_close(got["params"][key], value, rtol=1e-5, atol=1e-6)


def test_models_nothing_can_differentiate_train_on(tmp_path, recwarn):
    """Reentrant activation checkpointing: neither torch.func nor plain autograd (``.grad()``) can differentiate
    through it. The measuring callbacks warn once each with the reasons and stop measuring; projection and the
    controller's emergency cuts carry on, and the run finishes."""
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    trainer, model = _fit_mlp(tmp_path, callbacks, Classifier(_checkpointed(True), lr=0.5))
    assert trainer.global_step == kappa.n_projections == 8 and kappa.bound <= 3.0 * (1 + 1e-2)
    assert monitor.n_runs == noise.n_runs == 0
    assert monitor.n_skipped == noise.n_skipped == 1  # tried once each, then stopped
    assert "incompatible with .grad()" in monitor.failure
    assert noise.failure.startswith("torch.func: ") and "; torch.autograd: " in noise.failure
    warned = [str(w.message) for w in recwarn if "cannot differentiate this model's loss" in str(w.message)]
    assert sorted(m.split(" ")[0] for m in warned) == ["GradientNoiseEstimator", "HessianEigenMonitor"]
    assert controller.states[0].n_cuts == 0 and all(torch.isfinite(p).all() for p in model.parameters())


class TinyLM(LightningModule):
    """A next-token model: an embedding tied to the output layer, a transformer encoder layer with dropout, and
    padded sequences of token ids in dict batches with an attention mask (the loss ignores the padding)."""

    def __init__(self, vocab=20, width=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, 2, 16, dropout=0.1, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 1)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.head(self.enc(self.emb(ids), src_key_padding_mask=~mask))
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return (losses * mask[:, 1:]).sum() / mask[:, 1:].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.5)


def test_a_language_model_with_tied_embeddings_and_padded_batches(tmp_path, recwarn):
    """Every callback measures it (in eval mode the encoder's fast path would turn the padded batch into nested
    tensors, which ``vmap`` refused); the tied output layer is projected once, the embedding listed as uncertified."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (64,), generator=g)
    ids = torch.randint(0, 20, (64, 8), generator=g)
    data = [{"input_ids": i, "attention_mask": torch.arange(8) < n} for i, n in zip(ids, lengths)]
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    torch.manual_seed(0)
    Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2)).fit(TinyLM(), DataLoader(data, 16))
    assert monitor.n_runs == noise.n_runs == 4 and monitor.failure is None and noise.failure is None
    assert not [w for w in recwarn if "torch.func cannot transform" in str(w.message)]
    assert "head" in kappa.sigmas and "emb" not in kappa.sigmas and kappa.bound <= 3.0 * (1 + 1e-2)
    assert any("emb (Embedding)" in str(w.message) for w in recwarn)
    assert math.isfinite(monitor.last["lip/hessian/lambda_max"]) and math.isfinite(noise.last["lip/noise/trace"])


class Bookkeeping(Classifier):
    """Lightning's documented bookkeeping in ``training_step``: a torchmetrics metric updated, outputs
    collected for ``on_train_epoch_end``, a counter, the last logits kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accuracy = MulticlassAccuracy(num_classes=4)
        self.training_step_outputs, self.epoch_losses, self.n_steps = [], [], 0

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("train_acc", self.accuracy(logits, batch[1]))
        loss = F.cross_entropy(logits, batch[1])
        self.training_step_outputs.append(loss.detach())
        self.n_steps += 1
        self.last_logits = logits.detach()
        return loss

    def on_train_epoch_end(self):
        self.epoch_losses.append(torch.stack(self.training_step_outputs).mean())
        self.training_step_outputs.clear()


def test_bookkeeping_in_training_step_sees_only_the_real_steps(tmp_path):
    """The measurements evaluate ``training_step`` under ``torch.func`` transforms: the metric's state and the
    module's attributes would take in their tensors (the next real step failed), and see extra steps."""

    def bookkeeping(callbacks):
        torch.manual_seed(0)
        model = Bookkeeping(cnn(), lr=0.5)
        Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            model, loader(random_data(64, (1, 8, 8)))
        )
        return model

    plain = bookkeeping([])
    monitor, noise = HessianEigenMonitor(every_n_steps=1, max_iter=5), GradientNoiseEstimator(every_n_steps=1)
    measured = bookkeeping([monitor, noise])  # measurement only: training itself is unchanged
    assert monitor.n_runs == noise.n_runs == 8
    assert measured.n_steps == plain.n_steps == 8 and not measured.training_step_outputs
    assert torch.equal(torch.stack(measured.epoch_losses), torch.stack(plain.epoch_losses))
    assert torch.equal(measured.last_logits, plain.last_logits)
    assert measured.accuracy.metric_state.keys() == plain.accuracy.metric_state.keys()
    for key, value in plain.accuracy.metric_state.items():
        assert torch.equal(measured.accuracy.metric_state[key], value), key
    assert measured.accuracy._update_count == plain.accuracy._update_count == 8


class LogsItsFirstBatch(Classifier):
    """Logs a histogram of each epoch's first batch straight to TensorBoard (``if batch_idx == 0:``, a common
    pattern), and records the indices its ``training_step`` is called with (private: not put back)."""

    def training_step(self, batch, batch_idx):
        self._indices = [*getattr(self, "_indices", []), batch_idx]
        if batch_idx == 0:
            self.logger.experiment.add_histogram("first_batch", batch[0], self.global_step)
        return super().training_step(batch, batch_idx)


def test_measurements_do_not_run_a_steps_first_batch_block(tmp_path, recwarn):
    """The measurements called ``training_step(batch, 0)``: the first-batch block ran in each of them, a histogram
    of a ``vmap``-batched tensor failed, and the noise estimator fell back to a loop over the samples, logging one
    histogram per sample. They pass ``batch_idx=-1``, which no batch of an epoch has."""
    torch.manual_seed(0)
    model, callbacks = LogsItsFirstBatch(cnn(), lr=0.5), four()
    logger = TensorBoardLogger(tmp_path)
    Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2, logger=logger)).fit(
        model, loader(random_data(64, (1, 8, 8)))
    )
    assert [i for i in model._indices if i >= 0] == [0, 1, 2, 3] * 2  # the real steps
    assert set(model._indices) == {-1, 0, 1, 2, 3} and callbacks[2].n_runs == 4
    assert not [w for w in recwarn if "cannot transform" in str(w.message)]


def test_measurement_mode_undoes_changes_to_the_modules_attributes():
    model = Bookkeeping(mlp())
    model.seen, model.classes, model.window = {"a": 1}, {1, 2}, deque([1.0], maxlen=3)
    before = {k: (v, copy.copy(v)) for k, v in vars(model).items() if not k.startswith("_")}
    with measurement_mode(model):
        model.training_step((torch.randn(8, 16), torch.randint(0, 4, (8,))), 0)
        model.seen["b"] = 2
        model.classes.add(3)
        model.window.append(2.0)
        model.n_steps, model.added = 5, True
    assert {k for k in vars(model) if not k.startswith("_")} == before.keys()
    for key, (value, contents) in before.items():
        assert getattr(model, key) is value and value == contents, key
    assert model.accuracy._update_count == 0 and model.training


class Skipping(Classifier):
    """Skips the update on batches whose loss is high: torch.func cannot evaluate this `training_step`."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if loss.item() > 10.0 else loss


class SkippingWithLipLoss(Skipping):
    def lip_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])


def test_a_training_step_torch_func_cannot_run_is_measured_with_plain_autograd(tmp_path, recwarn):
    """`.item()` in `training_step`, which `vmap` refuses: the estimator warns once and loops over the samples with
    plain autograd (the Hessian's transforms take it); its statistics equal those that `lip_loss` gives under
    torch.func."""
    callbacks, reference = four(), four()
    got = _measured(tmp_path, callbacks, mlp, lr=0.1, module=Skipping)
    expected = _measured(tmp_path, reference, mlp, lr=0.1, module=SkippingWithLipLoss)
    warned = [str(w.message) for w in recwarn if "torch.func cannot transform" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith("GradientNoiseEstimator")
    assert callbacks[2].n_runs == callbacks[1].n_runs == 4 and callbacks[2].failure is None
    assert got["noise"] == pytest.approx(expected["noise"], rel=2e-5, abs=1e-7)  # measured: 1.3e-7 apart


class Evaluated(Classifier):
    """A classifier with validation, test and predict steps."""

    def validation_step(self, batch, batch_idx):
        self.log("loss", F.cross_entropy(self(batch[0]), batch[1]))

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_evaluation_stages_around_fit_change_nothing(tmp_path):
    callbacks = four()
    kappa, monitor, noise, controller = callbacks
    model, data = Evaluated(cnn(), lr=2.0, momentum=0.5), loader(random_data(64, (1, 8, 8)))
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.validate(model, data, verbose=False)  # before fit: the callbacks set up for another stage
    trainer.fit(model, data, data)
    assert controller.states[0].n_cuts > 0 and kappa.n_projections == trainer.global_step == 8
    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    runs = (monitor.n_runs, noise.n_runs, kappa.n_projections)
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    trainer.predict(model, data)
    assert all(torch.equal(v, fitted[k]) for k, v in model.state_dict().items())
    assert (monitor.n_runs, noise.n_runs, kappa.n_projections) == runs
    assert trainer.optimizers[0].param_groups[0]["lr"] == 2.0  # the scheduled LR: the throttle never stays behind


DOCUMENTED_TAGS = [
    "lip/kappa/bound",
    "lip/kappa/log10_bound",
    "lip/kappa/n_projected",
    "lip/kappa/n_skipped",
    "lip/kappa/seconds",
    "lip/kappa/audit_bound",
    "lip/kappa/sigma/net.0",
    "lip/kappa/kappa/net.0",
    "lip/hessian/lambda_max",
    "lip/hessian/lambda_min",
    "lip/hessian/residual",
    "lip/hessian/residual_min",
    "lip/hessian/n_hvp",
    "lip/hessian/converged",
    "lip/hessian/n_skipped",
    "lip/hessian/seconds",
    "lip/hessian/eta_lambda_max",
    "lip/hessian/threshold",
    "lip/hessian/stability_ratio",
    "lip/noise/trace",
    "lip/noise/grad_norm_sq",
    "lip/noise/grad_norm_sq_unbiased",
    "lip/noise/scale",
    "lip/noise/effective_rank",
    "lip/noise/eigenvalue_1",
    "lip/noise/snr/net.0",
    "lip/noise/drift/net.5",
    "lip/noise/diffusion/net.5",
    "lip/noise/log_lipschitz_drift",
    "lip/noise/log_lipschitz_std",
    "lip/noise/log_lipschitz_std_blockdiag",
    "lip/noise/observed/net.5",
    "lip/noise/predicted/net.5",
    "lip/noise/zscore/net.5",
    "lip/noise/log_lipschitz_observed",
    "lip/noise/log_lipschitz_predicted",
    "lip/noise/log_lipschitz_zscore",
    "lip/noise/n_samples",
    "lip/noise/n_skipped",
    "lip/noise/seconds",
    "lip/noise/overhead",
    "lip/lr/effective",
    "lip/lr/scheduled",
    "lip/lr/throttle",
    "lip/lr/bound",
    "lip/lr/ratio",
    "lip/lr/threshold",
    "lip/lr/signal",
    "lip/lr/n_cuts",
    "lip/lr/n_recoveries",
    "lip/lr/n_emergencies",
    "lip/lr/n_spikes",
]


class Monitored(Callback):
    """What a monitor reads at the end of validation and of the epoch, next to the callbacks' own values."""

    def __init__(self, kappa, controller):
        self.kappa, self.controller, self.seen = kappa, controller, []

    def record(self, trainer):
        read = {k: trainer.callback_metrics[k].item() for k in ("lip/kappa/bound", "lip/lr/throttle")}
        own = {"lip/kappa/bound": self.kappa.bound, "lip/lr/throttle": self.controller.states[0].throttle}
        self.seen.append((read, own))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.record(trainer)


def test_monitors_read_the_latest_values_of_the_projection_and_the_controller(tmp_path):
    """``ModelCheckpoint`` and ``EarlyStopping`` on metrics that are logged on the loggers' steps only, in epochs of 4
    steps under ``log_every_n_steps=50`` and validations every 2 steps: they raised "metric not available"; at the
    end of validation and of the epoch they read the latest values."""
    callbacks = four()
    kappa, _, _, controller = callbacks
    monitored = Monitored(kappa, controller)
    checkpoint = ModelCheckpoint(tmp_path, monitor="lip/kappa/bound", mode="max")
    stopping = EarlyStopping("lip/lr/throttle", mode="max", patience=5, check_on_train_epoch_end=True)
    data = loader(random_data(64, (1, 8, 8)))
    trainer = Trainer(
        callbacks=[*callbacks, monitored, checkpoint, stopping],
        **trainer_kwargs(tmp_path, max_epochs=2, val_check_interval=2, enable_checkpointing=True, log_every_n_steps=50),
    )
    trainer.fit(Evaluated(cnn(), lr=2.0, momentum=0.5), data, data)
    # the logged values are float32: equal to 1e-7 relative
    assert len(monitored.seen) == 6 and all(read == pytest.approx(own, rel=1e-7) for read, own in monitored.seen)
    assert checkpoint.best_model_score.item() == max(read["lip/kappa/bound"] for read, _ in monitored.seen)
    assert stopping.best_score.item() == max(read["lip/lr/throttle"] for read, _ in monitored.seen)


class OnPlateau(Classifier):
    """SGD under a ``ReduceLROnPlateau`` on the projection's bound."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "lip/kappa/bound"}}


def test_a_plateau_scheduler_reads_the_bound_at_every_epoch_end(tmp_path):
    """Lightning steps a ``ReduceLROnPlateau`` after the callbacks' ``on_train_epoch_end``: on a metric logged on the
    loggers' steps only it raised "not available" in epochs shorter than ``log_every_n_steps``."""
    callbacks = four()
    model = OnPlateau(cnn(), lr=2.0)
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model, loader(random_data(64, (1, 8, 8))))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 3 and scheduler.best <= callbacks[0].max_lipschitz * (1 + 1e-2)


def test_every_documented_tag_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import metadata

    logger = TensorBoardLogger(tmp_path, name="tb")
    run(tmp_path, four(), logger=logger, log_every_n_steps=1)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    missing = sorted(set(DOCUMENTED_TAGS) - set(events.Tags()["scalars"]))
    assert not missing, missing
    assert {"lip/kappa/sigma", "lip/hessian/density"} <= set(events.Tags()["histograms"])
    layout = events.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0]
    for title in [
        b"kappa: Lipschitz bound",
        b"stability: eta*lambda_max vs threshold",
        b"noise: z-scores",
        b"lr: throttle",
    ]:
        assert title in layout


@pytest.mark.slow
def test_ddp_spawn_pickles_the_callbacks_and_trains_as_ddp_fork(tmp_path):
    """``strategy="ddp_spawn"`` pickles the Trainer, callbacks included, into new processes, where a plain
    ``torch.Generator`` crashed them (pytorch/pytorch#146828). The weights rank 0 sends back equal a ``ddp_fork``
    run's."""

    def weights(strategy):
        torch.manual_seed(0)
        model = Classifier(cnn(), lr=2.0, momentum=0.5)
        callbacks = [*four(), DestroyProcessGroup()]
        trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, devices=2, strategy=strategy, max_epochs=2))
        trainer.fit(model, loader(random_data(64, (1, 8, 8)), batch_size=8))
        return model.state_dict()

    forked, spawned = weights("ddp_fork"), weights("ddp_spawn")
    for key, value in forked.items():
        assert torch.equal(value, spawned[key]), key


@pytest.mark.slow
def test_ddp_gan_with_all_four_takes_identical_decisions_on_both_ranks(tmp_path):
    """Two optimizers in turn on every batch: the projection follows the critic's steps only (8 of 16), the estimator
    follows each of its measurements up at the critic's next step (4 z-score pairs), and both ranks end with the same
    weights, z-scores and LR."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_gan.py", tmp_path)
    assert rank0["global_step"] == 16 and rank0["n_projections"] == rank1["n_projections"] == 8
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    assert rank0["bound"] == rank1["bound"] <= 1 + 1e-2
    assert len(rank0["zscores"]) == 4 and rank0["zscores"] == rank1["zscores"]
    assert all(len(z) == 2 and all(map(math.isfinite, z.values())) for z in rank0["zscores"])
    assert (rank0["lr"], rank0["throttle"]) == (rank1["lr"], rank1["throttle"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [(), ("weight_norm",)], ids=["plain", "weight_norm"])
def test_ddp_all_four_take_identical_decisions_on_both_ranks(tmp_path, variant):
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_all.py", tmp_path, *variant)
    assert rank0["used"] == rank1["used"] and min(lr for row in rank0["used"] for lr in row) < 2.0  # throttled
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    assert rank0["metrics"] == rank1["metrics"] and not rank0["metrics"]["sync_warnings"]
    assert rank0["metrics"]["monitored"][1] == pytest.approx(rank0["metrics"]["throttle"][0]["throttle"], rel=1e-7)
    assert any("parametrizations" in key for key in rank0["params"]) == bool(variant)
    assert len(rank0["metrics"]["sigmas"]) == 3 and math.prod(rank0["metrics"]["sigmas"].values()) <= 3.0 * (1 + 1e-2)


@pytest.mark.slow
def test_ddp_with_a_zero_redundancy_optimizer_equals_the_plain_optimizer(tmp_path):
    """``ZeroRedundancyOptimizer`` (which Lightning checkpoints) steps each rank's shard of the parameters with a local
    optimizer that holds that shard's state. The callbacks read the class it wraps and every rank's state: the
    runs equal those with the plain optimizer bit for bit, step maps, stability ratios and the Adam throttle
    included. Before, they found no threshold, no step map and no preconditioner: the controller let Adam's
    steps through unthrottled (other weights), and the monitor measured the raw Hessian (lambda_max 1.34, not
    59.5)."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_zero.py", tmp_path)
    for name in ("sgd", "adam"):
        plain, zero = rank0[f"{name}/plain"], rank0[f"{name}/zero"]
        for key in plain["params"]:
            assert torch.equal(plain["params"][key], zero["params"][key]), (name, key)
            assert torch.equal(zero["params"][key], rank1[f"{name}/zero"]["params"][key]), (name, key)
        for key in ("hessian", "noise", "throttle", "preconditioned"):
            assert plain[key] == zero[key] == rank1[f"{name}/zero"][key], (name, key)
        assert "lip/hessian/stability_ratio" in zero["hessian"] and "lip/noise/drift/net.0" in zero["noise"]
        assert zero["preconditioned"] == (name == "adam")
    assert rank0["adam/zero"]["throttle"][0]["n_cuts"] > 0


@pytest.mark.parametrize(
    "pair",
    [
        [HessianEigenMonitor(every_n_steps=2), HessianEigenMonitor(every_n_steps=2, data="current")],
        [GradientNoiseEstimator(layers=["net.0"]), GradientNoiseEstimator(layers=["net.2"])],
        [CurvatureLRController(mode="guard"), CurvatureLRController(mode="strict")],
    ],
    ids=lambda pair: type(pair[0]).__name__,
)
def test_a_second_instance_of_a_callback_that_publishes_trainer_wide_keys_raises_at_setup(tmp_path, pair):
    """Two monitors (other data), two estimators (other layers) or two controllers (other modes) have distinct state
    keys, which Lightning accepts; they wrote the same registry entries and metrics (``hessian/lambda_max``, which
    the controller reads, was whichever came last), and two controllers both throttled the LR."""
    model = Classifier(mlp())
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"A Trainer takes one {type(pair[0]).__name__}, got 2"):
        Trainer(callbacks=pair, **trainer_kwargs(tmp_path)).fit(model, loader(random_data()))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
