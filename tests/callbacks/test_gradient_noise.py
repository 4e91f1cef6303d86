import copy
import math
import random
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning, ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from lightning_lip import GradientNoiseEstimator, KappaBudgetProjection, LipRegistry
from lightning_lip.callbacks._state import TimeBudget
from tests.models import (
    GAN,
    Classifier,
    Finetuned,
    NoisyInputs,
    OverflowsAt,
    PairedNoiseEstimator,
    cnn,
    fp16_grad_scaler,
    loader,
    mlp,
    random_data,
    trainer_kwargs,
)
from tests.reference import dense_operator_norm


def fit(tmp_path, model, data, callbacks, batch_size=16, **kw):
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, loader(data, batch_size))
    return trainer


class LastBatch(GradientNoiseEstimator):
    """Keeps the batch and parameters of the last measurement, for the dense references."""

    def measure(self, trainer, pl_module, optimizer, batch, step_batch):
        self.seen = ([t.clone() for t in batch], {k: v.detach().clone() for k, v in pl_module.named_parameters()})
        return super().measure(trainer, pl_module, optimizer, batch, step_batch)


def loop_grads(net, x, y):
    rows = []
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_statistics_equal_dense_covariance_of_a_per_sample_loop(tmp_path, arch):
    net, shape = (mlp((8, 12, 4)), (8,)) if arch == "mlp" else (cnn(), (1, 8, 8))
    noise = LastBatch(every_n_steps=3, k=3)
    trainer = fit(tmp_path, Classifier(net), random_data(64, shape), [noise])
    (x, y), params = noise.seen
    ref = mlp((8, 12, 4)) if arch == "mlp" else cnn()
    ref.load_state_dict({k[len("net.") :]: v for k, v in params.items()})
    grads = loop_grads(ref.double(), x.double(), y)
    cov = torch.cov(grads.T)  # dense P x P reference
    mean_sq = grads.mean(0).square().sum()
    # float32 per-sample gradients against a float64 loop: 1e-5 relative
    assert noise.last["lip/noise/trace"] == pytest.approx(cov.trace().item(), rel=1e-5)
    assert noise.last["lip/noise/grad_norm_sq"] == pytest.approx(mean_sq.item(), rel=1e-5)
    eig = torch.linalg.eigvalsh(cov).flip(0)
    for i in range(3):
        assert noise.last[f"lip/noise/eigenvalue_{i + 1}"] == pytest.approx(eig[i].item(), rel=1e-5)
    # sampling without replacement does not enter the per-sample statistics, only the step's noise
    unbiased = (mean_sq - cov.trace() / 16).item()
    assert noise.last["lip/noise/grad_norm_sq_unbiased"] == pytest.approx(unbiased, rel=1e-4)
    expected_scale = cov.trace().item() / unbiased if unbiased > 0 else math.inf  # random labels: noise dominates
    assert noise.last["lip/noise/scale"] == pytest.approx(expected_scale, rel=1e-4)
    registry = LipRegistry.of(trainer)
    assert (
        registry.get("noise/trace") == noise.last["lip/noise/trace"] and registry.step_of("noise/trace") == 2
    )  # before step 3
    layers = {"net.0", "net.2"} if arch == "mlp" else {"net.0", "net.2", "net.5"}
    assert {k.split("/")[-1] for k in noise.last if k.startswith("lip/noise/snr/")} == layers
    assert {k.split("/")[-1] for k in noise.last if k.startswith("lip/noise/drift/")} == layers
    assert all(registry.get(f"noise/diffusion/{name}") >= 0 for name in layers)


def test_statistics_cover_the_parameters_the_optimizer_steps(tmp_path):
    """A head trained alone (only its parameters passed to SGD, the backbone still trainable): its update's noise is
    the head's. The whole model's was measured, 1.4x the head's trace here."""
    model = Classifier(mlp((8, 12, 4)))
    model.make_optimizer = lambda params: torch.optim.SGD(model.net[2].parameters(), lr=0.1)
    noise = LastBatch(every_n_steps=3, k=1)
    fit(tmp_path, model, random_data(64, (8,)), [noise])
    (x, y), params = noise.seen
    ref = mlp((8, 12, 4))
    ref.load_state_dict({k[len("net.") :]: v for k, v in params.items()})
    grads = loop_grads(ref.double(), x.double(), y)
    head = grads[:, -(12 * 4 + 4) :]  # the head's weight and bias come last
    assert grads.var(0).sum() > 1.3 * head.var(0).sum()
    assert noise.last["lip/noise/trace"] == pytest.approx(head.var(0).sum().item(), rel=1e-5)
    assert noise.last["lip/noise/grad_norm_sq"] == pytest.approx(head.mean(0).square().sum().item(), rel=1e-5)
    assert {k.rsplit("/", 1)[1] for k in noise.last if "/snr/" in k or "/drift/" in k} == {"net.2"}


def test_weight_normalized_layer_has_statistics_and_snr_but_no_dynamics(tmp_path, recwarn):
    """The optimizer steps weight normalization's magnitude and direction, not the weight: that layer has no
    dynamics (warned once), but its gradients count in the statistics and in its SNR, against a per-sample loop."""
    net = mlp((8, 12, 4))
    nn.utils.parametrizations.weight_norm(net[0])
    noise = LastBatch(every_n_steps=3)
    fit(tmp_path, Classifier(net), random_data(64, (8,)), [noise])
    warned = [str(w.message) for w in recwarn if "no Lipschitz dynamics" in str(w.message)]
    assert len(warned) == 1 and ": net.0." in warned[0]
    (x, y), params = noise.seen
    ref = copy.deepcopy(net)
    ref.load_state_dict({k[len("net.") :]: v for k, v in params.items()})
    grads = loop_grads(ref.double(), x.double(), y)
    first = torch.tensor([n.startswith("0.") for n, p in ref.named_parameters() for _ in range(p.numel())])
    layer = grads[:, first]  # bias, magnitude and direction of net.0
    expected = layer.mean(0).square().sum() / (torch.cov(layer.T).trace() / len(x))
    assert noise.last["lip/noise/snr/net.0"] == pytest.approx(expected.item(), rel=1e-4)
    assert noise.last["lip/noise/trace"] == pytest.approx(torch.cov(grads.T).trace().item(), rel=1e-5)
    assert {k.split("/")[-1] for k in noise.last if k.startswith("lip/noise/drift/")} == {"net.2"}


def pruned(net: nn.Sequential) -> nn.Sequential:
    """``net`` with half of its first layer's weights pruned (``torch.nn.utils.prune``, as ``ModelPruning`` does)."""
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    return net


@pytest.mark.parametrize(
    "arch, clip",
    [("mlp", None), ("cnn", None), ("mlp", "norm"), ("cnn", "value"), ("mlp-pruned", None), ("cnn-pruned", None)],
)
def test_full_batch_step_is_predicted_to_third_order(tmp_path, arch, clip):
    """A full-batch SGD step has no noise: the published drift of each sigma is its change up to O(eta^3), for
    matrices (closed form) and convolutions (matrix-free), against the dense operator of tests/reference.py; also
    with the Trainer clipping the gradient, by norm (to a tenth) or by value (a third of the coordinates held), and
    for a pruned first layer (its weight is ``weight_orig * weight_mask``)."""
    linear = arch.startswith("mlp")
    base, shape = (partial(mlp, (8, 12, 4)), (8,)) if linear else (partial(cnn, padding_mode="zeros"), (1, 8, 8))

    def make():
        return pruned(base()) if arch.endswith("pruned") else base()

    x, y = random_data(32, shape).tensors
    torch.manual_seed(0)
    start = make().double()
    F.cross_entropy(start(x.double()), y).backward()
    grads = torch.cat([p.grad.flatten() for p in start.parameters()])
    clip_kwargs = {
        None: {},
        "norm": dict(gradient_clip_val=0.1 * grads.norm().item()),
        "value": dict(gradient_clip_val=grads.abs().quantile(2 / 3).item(), gradient_clip_algorithm="value"),
    }[clip]
    errors = {}
    for lr in [0.1, 0.05, 0.025]:
        torch.manual_seed(0)
        model = Classifier(make().double(), lr=lr)
        noise = GradientNoiseEstimator(every_n_steps=1, predict=False)
        trainer = Trainer(callbacks=[noise], **trainer_kwargs(tmp_path, max_steps=1, **clip_kwargs))
        trainer.fit(model, DataLoader(TensorDataset(x.double(), y), batch_size=32))
        layers = [k.split("/")[-1] for k in noise.last if k.startswith("lip/noise/drift/")]
        assert len(layers) == (2 if linear else 3)
        assert all(noise.last[f"lip/noise/diffusion/{name}"] == 0.0 for name in layers)  # full batch: no noise

        def norm(net, name):
            layer = net[int(name.split(".")[1])]
            if hasattr(layer, "weight_mask"):  # pruned: the weight the next forward pass computes, in a plain layer
                weight = (layer.weight_orig * layer.weight_mask).detach()
                if isinstance(layer, nn.Linear):
                    return torch.linalg.matrix_norm(weight, ord=2).item()
                layer = nn.Conv2d(1, 4, 3, padding=1, bias=False).double()
                layer.weight.data = weight
            return dense_operator_norm(layer, noise._shapes.shapes[name][0] if name in noise._shapes.shapes else None)

        errors[lr] = max(
            abs(norm(model.net, name) - norm(start, name) - noise.last[f"lip/noise/drift/{name}"]) for name in layers
        )
    assert errors[0.05] < errors[0.1] / 6 and errors[0.025] < errors[0.05] / 6, errors  # O(eta^3): /8 per halving


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "cnn", "mlp-clipped"])
def test_zscores_are_standard_normal_on_digits(tmp_path, arch):
    """Stochastic prediction on real data: observed vs predicted change of each sigma and of log K; also with the
    gradient clipped by norm to 0.1, about half its median norm (ignoring the clipping, the means were -0.6 to
    -2.9)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    data = TensorDataset(x.view(-1, 1, 8, 8) if arch == "cnn" else x, torch.tensor(y))
    zs = []

    class Record(GradientNoiseEstimator):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            zs.append({k: v for k, v in self._pending.items() if "zscore" in k})
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    torch.manual_seed(0)
    net = cnn(1, 10, padding_mode="zeros") if arch == "cnn" else mlp((64, 64, 64, 10))
    model = Classifier(net, lr=0.05)
    clip = dict(gradient_clip_val=0.1) if arch == "mlp-clipped" else {}
    trainer = Trainer(
        callbacks=[Record(every_n_steps=2, max_samples=128)], **trainer_kwargs(tmp_path, max_epochs=12, **clip)
    )
    trainer.fit(model, DataLoader(data, batch_size=128, shuffle=True, drop_last=True))
    zs = [z for z in zs if z]
    assert len(zs) >= 80
    for key in zs[0]:
        z = torch.tensor([row[key] for row in zs])
        # ~80 roughly independent draws: the mean of N(0, 1) has standard error 0.11, the std ~0.08
        assert abs(z.mean()) < 0.3 and 0.75 < z.std() < 1.3, (key, z.mean(), z.std())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_training_is_bit_identical_with_and_without_the_estimator(tmp_path, arch):
    def run(callbacks):
        torch.manual_seed(0)
        if arch == "mlp":
            net, shape = nn.Sequential(nn.Linear(16, 12), nn.Dropout(0.3), nn.ReLU(), nn.Linear(12, 4)), (16,)
        else:
            net, shape = nn.Sequential(cnn(), nn.Dropout(0.3)), (1, 8, 8)  # conv layers: Lanczos draws noise
        model = Classifier(net, momentum=0.9)
        fit(tmp_path, model, random_data(64, shape), callbacks, max_epochs=2)
        return model

    plain, measured = run([]), run([GradientNoiseEstimator(every_n_steps=1)])
    for a, b in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(a, b)


def test_a_training_step_drawing_random_numbers_is_measured_and_training_stays_bit_identical(tmp_path):
    class Noisy(NoisyInputs, Classifier):
        pass

    def run(callbacks):
        torch.manual_seed(0)
        random.seed(0)
        model = Noisy(mlp(), momentum=0.9)
        fit(tmp_path, model, random_data(64), callbacks, max_epochs=2)
        return model

    estimator = GradientNoiseEstimator(every_n_steps=1)
    plain, measured = run([]), run([estimator])
    assert estimator.failure is None and estimator.n_runs == 8
    for a, b in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(a, b)


def test_lbfgs_is_measured_once_a_step(tmp_path):
    """LBFGS evaluates its closure (and Lightning's ``on_before_optimizer_step``) several times a step."""

    class LBFGSModel(Classifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)

    estimator = GradientNoiseEstimator(every_n_steps=2)
    with pytest.warns(UserWarning, match="no linear step map for LBFGS"):
        trainer = fit(tmp_path, LBFGSModel(mlp()), random_data(64), [estimator], max_steps=4)
    assert trainer.global_step == 4 and estimator.n_runs == 2 and math.isfinite(estimator.last["lip/noise/trace"])


def test_observation_precedes_the_projection(tmp_path):
    """A projection registered first still runs after the observation: it cuts the weights by far more than the
    step's noise, which would show as huge z-scores."""
    zs = []

    class Record(GradientNoiseEstimator):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            zs.extend(v for k, v in self._pending.items() if "zscore/" in k)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    class Halve(KappaBudgetProjection):
        def allocate(self, sigmas):
            return {name: 0.5 * sigma for name, sigma in sigmas.items()}

    kappa = Halve(max_lipschitz=1e6)
    fit(tmp_path, Classifier(mlp()), random_data(256), [kappa, Record(every_n_steps=1)], batch_size=32)
    assert len(zs) == 3 * 7 and kappa.n_projections == 8
    assert max(abs(z) for z in zs) < 6


def test_a_convolution_with_one_input_gets_finite_dynamics_and_zscores(tmp_path):
    """A convolution on one channel of one pixel: its input space has two unit vectors, so the fresh noise mixed into
    the warm start of its Lanczos cancelled it half the time; sigma was then NaN, and so were the z-scores."""

    class Observed(GradientNoiseEstimator):
        def _observe(self, expected):
            super()._observe(expected)
            self.zscores += [v for k, v in self._pending.items() if "/zscore/" in k]

    noise = Observed(every_n_steps=1)
    noise.zscores = []
    model = Classifier(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Flatten()))
    fit(tmp_path, model, random_data(64, (1, 1, 1)), [noise], max_epochs=2)
    assert noise.n_runs == 8 and len(noise.zscores) == 7 and all(math.isfinite(z) for z in noise.zscores)
    assert math.isfinite(noise.last["lip/noise/drift/net.0"]) and noise.n_skipped == 0


class NaNGradients(Classifier):
    def lip_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1]) * float("nan")


def test_nan_per_sample_gradients_and_batch_of_one_are_skipped(tmp_path):
    noise = GradientNoiseEstimator(every_n_steps=1)
    model = NaNGradients(mlp())
    with pytest.warns(UserWarning, match="non-finite per-sample gradients"):
        trainer = fit(tmp_path, model, random_data(64), [noise])
    assert trainer.global_step == 4 and noise.n_skipped == 4 and "noise/trace" not in LipRegistry.of(trainer)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    single = GradientNoiseEstimator(every_n_steps=1)
    with pytest.warns(UserWarning, match="batch size 1"):
        fit(tmp_path, Classifier(mlp()), random_data(4), [single], batch_size=1)
    assert single.n_skipped == 4


class TwoLoaders(Classifier):
    """Trains on the batches of two loaders at once, as Lightning combines a dict of loaders."""

    def training_step(self, batch, batch_idx):
        return sum(F.cross_entropy(self(x), y) for x, y in batch.values())


@pytest.mark.parametrize("sizes", [(16, 16), (16, 24)])
def test_loaders_combined_with_other_batch_sizes_warn_once(tmp_path, recwarn, sizes):
    """Samples are taken along the first tensor's leading dimension: two loaders' batches of one size pair up into
    samples; of different sizes, the second's are shared by every sample, which a warning says once."""
    noise = GradientNoiseEstimator(every_n_steps=1)
    loaders = {name: loader(random_data(64, seed=i), size) for i, (name, size) in enumerate(zip("ab", sizes))}
    Trainer(callbacks=[noise], **trainer_kwargs(tmp_path)).fit(TwoLoaders(mlp()), loaders)
    warned = [str(w.message) for w in recwarn if "shared by every sample" in str(w.message)]
    assert noise.n_runs == 4 and len(warned) == (sizes[0] != sizes[1])
    assert all("tensors of 16 samples and tensors whose leading dimension is 24" in w for w in warned)


def test_layers_pruned_during_fit_keep_their_dynamics(tmp_path, recwarn):
    """``ModelPruning`` makes every weight ``weight_orig * weight_mask`` at the first epoch's end: the layers keep
    their SNR and their dynamics (they lost them, silently at first, then with a warning), and the z-scores of the
    pruned weights' observed steps are finite."""

    class Observed(GradientNoiseEstimator):
        def _observe(self, expected):
            super()._observe(expected)
            self.zscores.append({k.split("/")[-1]: v for k, v in self._pending.items() if "/zscore/net" in k})

    noise = Observed(every_n_steps=2)
    noise.zscores = []
    pruning = ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False, verbose=0)
    fit(tmp_path, Classifier(mlp()), random_data(64), [noise, pruning], max_epochs=2)
    assert not [w for w in recwarn if "no Lipschitz dynamics" in str(w.message)]
    layers = {f"net.{i}" for i in (0, 2, 4)}
    assert noise.n_runs == 4 and {k.split("/")[-1] for k in noise.last if "/snr/" in k} == layers
    assert {k.split("/")[-1] for k in noise.last if "/drift/" in k} == layers
    assert len(noise.zscores) == 3 and all(set(z) == layers for z in noise.zscores)  # the 4th measures the last step
    assert all(math.isfinite(value) for z in noise.zscores for value in z.values())


@pytest.mark.parametrize("backbone", ["linear", "conv"])
def test_a_layer_unfrozen_during_fit_gets_dynamics_from_then_on(tmp_path, backbone):
    """``BackboneFinetuning`` freezes the backbone at setup and unfreezes it at epoch 1: its layer has dynamics from
    then on (it was left out for the whole run where frozen when the callback found its layers). A convolution's
    shape is recorded only while it is trained (no hook slows a frozen one): from the per-sample forward passes of
    the measurement that finds it trained."""

    class DriftLayers(GradientNoiseEstimator):
        def measure(self, *args):
            metrics = super().measure(*args)
            self.seen.append((sorted(k.split("/")[-1] for k in metrics if "/drift/" in k), sorted(self._shapes.shapes)))
            return metrics

    noise = DriftLayers(every_n_steps=2)
    noise.seen = []
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    data = random_data(64, (16,) if backbone == "linear" else (1, 8, 8))
    fit(tmp_path, Finetuned(mlp() if backbone == "linear" else cnn()), data, [finetuning, noise], max_epochs=2)
    if backbone == "linear":
        assert [drift for drift, _ in noise.seen] == [["net.2", "net.4"]] * 2 + [["net.0", "net.2", "net.4"]] * 2
    else:
        assert [drift for drift, _ in noise.seen] == [["net.2", "net.5"]] * 2 + [["net.0", "net.2", "net.5"]] * 2
        assert [shapes for _, shapes in noise.seen] == [["net.2"]] * 2 + [["net.0", "net.2"]] * 2


def test_layers_may_name_a_layer_by_an_alias(tmp_path):
    """``backbone`` is ``net.0`` (``self.backbone = self.net[0]``, as ``BackboneFinetuning`` asks): naming it so
    raised "module not found"; it has the SNR and dynamics of ``net.0``, logged under the name given."""
    runs = {}
    for first in ("net.0", "backbone"):
        torch.manual_seed(0)
        noise = GradientNoiseEstimator(every_n_steps=2, layers=[first, "net.4"])
        fit(tmp_path, Finetuned(mlp()), random_data(64, (16,)), [noise], max_steps=4)
        runs[first] = {k.replace(first, "first"): v for k, v in noise.last.items() if "/drift/" in k or "/snr/" in k}
    names = [f"lip/noise/{kind}/{layer}" for kind in ("drift", "snr") for layer in ("first", "net.4")]
    assert sorted(runs["backbone"]) == sorted(names)
    assert runs["backbone"] == runs["net.0"]


def test_adam_momentum_frozen_parameters_and_accumulation(tmp_path):
    class AdamPartly(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.net[0].requires_grad_(False)

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    class Record(GradientNoiseEstimator):
        step_batches = []

        def measure(self, trainer, pl_module, optimizer, batch, step_batch):
            self.step_batches.append(step_batch)
            return super().measure(trainer, pl_module, optimizer, batch, step_batch)

    noise = Record(every_n_steps=2)
    fit(tmp_path, AdamPartly(), random_data(64), [noise], max_epochs=2, accumulate_grad_batches=2)
    assert noise.n_runs == 2 and {k for k in noise.last if "/drift/" in k} == {
        f"lip/noise/drift/net.{i}" for i in (2, 4)
    }
    assert math.isfinite(noise.last["lip/noise/log_lipschitz_drift"])
    assert noise.step_batches == [pytest.approx(32 * 63 / (64 - 32))] * 2  # accumulated batch, without replacement


def test_adams_first_step_is_predicted(tmp_path, recwarn):
    """Adam's first step, from the zero moments torch creates in it, has a step map (tested against the real step in
    tests/functional/test_stability.py): it was warned about as "no linear step map for Adam" and not predicted."""
    noise = GradientNoiseEstimator(every_n_steps=1)
    model = Classifier(mlp(), optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    fit(tmp_path, model, random_data(64), [noise], max_steps=1)
    assert not [w for w in recwarn if "no linear step map" in str(w.message)]
    assert {k for k in noise.last if "/drift/" in k} == {f"lip/noise/drift/net.{i}" for i in (0, 2, 4)}


@pytest.mark.parametrize("short", ["last-window", "skipped-micro-batch"])
def test_a_step_of_fewer_micro_batches_is_predicted_as_the_fraction_of_the_gradient_it_takes(tmp_path, short):
    """Lightning divides each micro-batch's loss by ``accumulate_grad_batches``, so a step of 3 micro-batches out of 4
    (an epoch's last window; a ``training_step`` that returned None) moves the weights by 3/4 of the mean gradient's
    step over 3 micro-batches: exactly the step of accumulating 3 at 3/4 of the LR. Both runs see the same weights,
    the same last micro-batch and the same population, so they must predict the same; the short step was predicted as
    a full one (4/3 of the drift, the noise of 4 micro-batches' samples)."""

    class SkipsTheSecond(Classifier):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    def first_prediction(data, accumulate, lr, model_class=Classifier):
        torch.manual_seed(0)
        noise = GradientNoiseEstimator(every_n_steps=1)
        fit(tmp_path, model_class(mlp(), lr=lr), data, [noise], max_steps=1, accumulate_grad_batches=accumulate)
        return {k: v for k, v in noise.last.items() if "/drift/" in k or "/diffusion/" in k}

    data = random_data(64)
    if short == "last-window":  # the epoch (the whole data set) ends after 3 micro-batches: no noise
        data = torch.utils.data.Subset(data, range(48))
        short_step, reference = first_prediction(data, 4, 0.3), first_prediction(data, 3, 0.3 * 3 / 4)
    else:  # 4 batches, the second skipped; the reference steps on the other 3 first, from the same population
        order = [*range(16), *range(32, 64), *range(16, 32)]
        short_step = first_prediction(data, 4, 0.3, SkipsTheSecond)
        reference = first_prediction(torch.utils.data.Subset(data, order), 3, 0.3 * 3 / 4)
    assert short_step.keys() == reference.keys()
    assert all(v != 0 for k, v in reference.items() if short != "last-window" or "/drift/" in k)
    for key, value in reference.items():
        assert short_step[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("kind", ["items-are-batches", "sampler-of-batches"])
def test_loaders_that_do_not_batch_count_the_samples_of_their_batches(tmp_path, kind):
    """With ``batch_size=None`` the data set's items are batches (or a sampler yields a batch's indices): ``N`` is
    the loader's length in batches times the batch size, and every statistic equals that of the same samples
    batched by the loader. (``len(dataset)`` of a list of 4 batches of 16 read as 4 samples: no noise at all.)"""
    data = random_data(64)
    if kind == "items-are-batches":
        unbatched = DataLoader([data[i : i + 16] for i in range(0, 64, 16)], batch_size=None)
    else:
        sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 16, drop_last=False)
        unbatched = DataLoader(data, sampler=sampler, batch_size=None)

    def last(data_loader):
        torch.manual_seed(0)
        noise = GradientNoiseEstimator(every_n_steps=2)
        Trainer(callbacks=[noise], **trainer_kwargs(tmp_path)).fit(Classifier(mlp()), data_loader)
        return {k: v for k, v in noise.last.items() if k not in ("lip/noise/seconds", "lip/noise/overhead")}

    batched = last(loader(data))
    assert batched["lip/noise/diffusion/net.2"] > 0
    assert last(unbatched) == pytest.approx(batched, rel=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adamax(ps, lr=1e-2),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=1e-3),
    ],
    ids=["adamax", "rmsprop", "adagrad"],
)
def test_other_preconditioned_optimizers_predict_their_steps(tmp_path, make, recwarn):
    noise = GradientNoiseEstimator(every_n_steps=2)
    fit(tmp_path, Classifier(mlp(), optimizer=make), random_data(64), [noise], max_epochs=2)
    assert noise.n_runs == 4 and math.isfinite(noise.last["lip/noise/log_lipschitz_drift"])
    assert not [w for w in recwarn if "no linear step map" in str(w.message)]


def test_each_param_group_predicts_with_its_own_learning_rate(tmp_path):
    def first_measurement(lr_first, lr_rest):  # at step 0, before any update: the same weights in every run
        class TwoGroups(Classifier):
            def configure_optimizers(self):
                groups = [self.net[0].parameters(), self.net[2:].parameters()]
                return torch.optim.SGD([{"params": p, "lr": lr} for p, lr in zip(groups, (lr_first, lr_rest))])

        torch.manual_seed(0)
        noise = GradientNoiseEstimator(every_n_steps=1, predict=False)
        fit(tmp_path, TwoGroups(mlp()), random_data(64), [noise], max_steps=1)
        return {k: v for k, v in noise.last.items() if "/drift/" in k or "/diffusion/" in k}

    mixed, low, high = first_measurement(0.1, 0.5), first_measurement(0.1, 0.1), first_measurement(0.5, 0.5)
    for key, value in mixed.items():  # each layer's drift and diffusion come from its own group's step
        assert value == pytest.approx((low if "net.0" in key else high)[key], rel=1e-6, abs=1e-12), key
    assert high["lip/noise/drift/net.2"] != pytest.approx(low["lip/noise/drift/net.2"], rel=1e-2)


def test_two_optimizers_each_predict_the_layers_they_step(tmp_path, recwarn):
    class TwoOptimizers(LightningModule):  # manual optimization, as a GAN: d steps, then g, on every batch
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d = mlp((16, 32, 16)), mlp((16, 32, 4))

        def lip_loss(self, batch):
            return F.cross_entropy(self.d(self.g(batch[0])), batch[1])

        def training_step(self, batch, batch_idx):
            for optimizer in reversed(self.optimizers()):
                optimizer.zero_grad()
                self.manual_backward(self.lip_loss(batch))
                optimizer.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.g.parameters(), lr=0.5), torch.optim.SGD(self.d.parameters(), lr=0.5)

    class OnlyD(TwoOptimizers):  # the reference for d's first step: one optimizer, automatic optimization
        def __init__(self):
            super().__init__()
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            return self.lip_loss(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.d.parameters(), lr=0.5)

    class Record(GradientNoiseEstimator):
        def measure(self, *args):
            metrics = super().measure(*args)
            self.drifts = getattr(self, "drifts", []) + [{k: v for k, v in metrics.items() if "/drift/" in k}]
            return metrics

    noise, reference = Record(every_n_steps=1), Record(every_n_steps=1)
    torch.manual_seed(0)
    fit(tmp_path, TwoOptimizers(), random_data(64), [noise], max_epochs=1)
    torch.manual_seed(0)
    fit(tmp_path, OnlyD(), random_data(64), [reference], max_steps=1)
    layers = [sorted(k.rsplit("/", 1)[1] for k in drifts) for drifts in noise.drifts]
    assert layers == [["d.0", "d.2"], ["g.0", "g.2"]] * 4  # a layer another optimizer holds does not move
    assert noise.drifts[0] == pytest.approx(reference.drifts[0], rel=1e-6) and all(noise.drifts[0].values())
    assert not [w for w in recwarn if "step map" in str(w.message)]


def test_an_adversarial_players_steps_are_followed_up_at_its_next_step(tmp_path):
    """A GAN's critic measured alone (``lip_loss`` is its loss, ``should_run`` picks its steps, the odd ones, and
    ``layers`` names the critic, whose layers are reported; naming a module without a weight raised): the
    follow-up prediction and the observation wait for the critic's next step. They went to the generator's step in
    between, which moves none of the critic's layers and predicted the generator's from the critic's loss: no z-score
    for the critic, NaN for the generator."""

    class CriticSteps(GradientNoiseEstimator):
        def should_run(self, step):
            return step % 4 == 1

        def _observe(self, expected):
            super()._observe(expected)
            self.zscores.append({k.split("/")[-1]: v for k, v in self._pending.items() if "/zscore/" in k})

    noise = CriticSteps(every_n_steps=1, layers=["critic"])  # the critic's layers, as by name
    noise.zscores = []
    torch.manual_seed(0)
    fit(tmp_path, GAN(), random_data(64, (8,)), [noise], max_epochs=2)
    assert noise.n_runs == 4 and len(noise.zscores) == 4
    assert {k.rsplit("/", 1)[1] for k in noise.last if "/snr/" in k or "/drift/" in k} == {"critic.0", "critic.2"}
    assert all(set(z) == {"critic.0", "critic.2"} and all(map(math.isfinite, z.values())) for z in noise.zscores)


def test_resume_continues_exactly(tmp_path):
    data = random_data(64)

    def run(root, max_epochs, ckpt=None, callback=None):
        torch.manual_seed(0)
        callback = callback or GradientNoiseEstimator(every_n_steps=3)
        trainer = Trainer(callbacks=[callback], **trainer_kwargs(root, max_epochs=max_epochs))
        trainer.fit(Classifier(mlp(), momentum=0.9), loader(data), ckpt_path=ckpt)
        return trainer, callback

    _, full = run(tmp_path / "a", 4)
    t1, _ = run(tmp_path / "b", 3)  # stops right after a measurement at step 12: a prediction is pending
    t1.save_checkpoint(tmp_path / "c.ckpt")
    saved = next(v for v in torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"].values())["budget"]
    resumed = GradientNoiseEstimator(every_n_steps=3)  # a subclass would have another state key
    load = resumed.load_state_dict

    def load_and_record(state_dict):
        load(state_dict)
        resumed.loaded = resumed._budget.state_dict(0.0)

    resumed.load_state_dict = load_and_record
    _, second = run(tmp_path / "b", 4, ckpt=tmp_path / "c.ckpt", callback=resumed)
    assert second.n_runs == full.n_runs == 5
    timings = {key: second.last[key] for key in ("lip/noise/seconds", "lip/noise/overhead")}
    assert second.last == pytest.approx(full.last | timings)
    assert second.loaded == saved and saved["own"] > 0  # the time budget carries over the resume


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(max_samples=1), "max_samples"),
        (dict(k=0), "`k`"),
        (dict(max_overhead=0.0), "max_overhead"),
        (dict(max_overhead=1.5), "max_overhead"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNoiseEstimator(**kwargs)


def test_own_gradient_clipping_is_warned_once(tmp_path):
    class OwnClipping(Classifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, 0.01, "value")

    noise = GradientNoiseEstimator(every_n_steps=1)
    with pytest.warns(UserWarning, match="overrides `configure_gradient_clipping`") as record:
        fit(tmp_path, OwnClipping(mlp()), random_data(64), [noise], max_steps=3)
    assert sum("configure_gradient_clipping" in str(w.message) for w in record) == 1 and noise.n_runs == 3


@pytest.mark.parametrize(("name", "match"), [("net.9", "does not have: ..net.9"), ("net.1", "no weight.*net.1")])
def test_unknown_layer_is_a_clear_error(tmp_path, name, match):
    """An absent module, or one with neither a weight to report nor layers inside (a ReLU)."""
    with pytest.raises(ValueError, match=f"`layers` names modules.*{match}"):
        fit(tmp_path, Classifier(mlp()), random_data(64), [GradientNoiseEstimator(layers=[name])])


@pytest.mark.slow
def test_ddp_equals_single_process_on_the_global_batch(tmp_path):
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("ddp_noise.py", tmp_path)
    assert rank0["last"] == rank1["last"]
    assert rank0["budgeted_steps"] == rank1["budgeted_steps"] == [10, 20]  # rank 0's budget decides
    net = mlp((8, 12, 4))
    net.load_state_dict({k[len("net.") :]: v for k, v in rank0["params"].items()})
    x, y = torch.cat([rank0["x"], rank1["x"]]), torch.cat([rank0["y"], rank1["y"]])
    grads = loop_grads(net.double(), x.double(), y)
    assert rank0["last"]["lip/noise/n_samples"] == 16
    assert rank0["last"]["lip/noise/trace"] == pytest.approx(torch.cov(grads.T).trace().item(), rel=1e-5)
    assert rank0["last"]["lip/noise/grad_norm_sq"] == pytest.approx(grads.mean(0).square().sum().item(), rel=1e-5)


def test_time_budget_keeps_own_time_within_the_fraction_of_training_time():
    budget = TimeBudget(0.1)
    budget.start(100.0)
    assert budget.allows(100.0)  # nothing spent: the first measurement is always allowed
    budget.spend(2.0, new_measurement=True)
    budget.spend(1.0)  # its follow-up (the next step's prediction)
    assert (budget.own, budget.last_cost) == (3.0, 3.0)
    # one more costs 3 s: own 6 s <= 0.1 x training time (wall - 3 s) needs a wall time of 63 s
    assert not budget.allows(100.0 + 62.9) and budget.allows(100.0 + 63.0)
    assert budget.overhead(163.0) == pytest.approx(3.0 / 60.0)
    resumed = TimeBudget(0.1)
    resumed.load_state_dict(budget.state_dict(130.0))
    resumed.start(0.0)
    assert not resumed.allows(32.9) and resumed.allows(33.0)  # 30 s before the checkpoint count
    resumed.stop(10.0)  # a fit ends; the next fit of the same module adds its time to the 40 s so far
    resumed.start(1000.0)
    assert resumed.wall(1005.0) == 45.0 and not resumed.allows(1022.9) and resumed.allows(1023.0)


@pytest.mark.parametrize(("max_overhead", "steps"), [(1e-9, [10]), (1.0, [10, 20, 30, 40, 50, 60])])
def test_default_cadence_follows_the_time_budget(tmp_path, monkeypatch, max_overhead, steps):
    """Without ``every_n_steps`` the candidate steps are multiples of 10: the first is always measured; with a
    negligible budget no other one, with a budget that always allows (the clock patched) every one."""
    if max_overhead == 1.0:
        monkeypatch.setattr(TimeBudget, "allows", lambda self, now: True)

    class Steps(GradientNoiseEstimator):
        def measure(self, trainer, pl_module, optimizer, batch, step_batch):
            self.steps.append(trainer.global_step + 1)
            return super().measure(trainer, pl_module, optimizer, batch, step_batch)

    noise = Steps(max_overhead=max_overhead)
    noise.steps = []
    fit(tmp_path, Classifier(mlp()), random_data(240), [noise], max_steps=60, batch_size=4)
    assert noise.steps == steps
    assert noise.overhead > 0 and noise.last["lip/noise/overhead"] > 0


def test_convolution_sigmas_of_measurements_and_follow_ups_equal_the_dense_norm(tmp_path):
    """Every sigma of a convolution (a new measurement from a noisy warm start, and the follow-ups one step later
    from the vector just found with little noise) equals matrix_norm(ord=2) of the dense operator; Lanczos stops at
    1e-7 on sigma^2 (follow-ups at 1e-6), so sigma is within ~5e-7: 1e-6 relative."""
    checked = []

    class Checked(GradientNoiseEstimator):
        def _top_triplet(self, name, layer, follow_up=False):
            u, sigma, v = super()._top_triplet(name, layer, follow_up)
            dense = dense_operator_norm(layer.double(), self._shapes.shapes[name][0])
            layer.float()
            checked.append(follow_up)
            assert sigma.item() == pytest.approx(dense, rel=1e-6), (name, follow_up)
            return u, sigma, v

    torch.manual_seed(0)
    fit(tmp_path, Classifier(cnn(), momentum=0.9), random_data(64, (1, 8, 8)), [Checked(every_n_steps=3)], max_epochs=2)
    assert checked.count(False) >= 4 and checked.count(True) >= 8  # 2 conv layers: measurements and follow-ups


def test_a_prediction_for_a_step_the_grad_scaler_skipped_is_dropped(tmp_path):
    """``precision="16-mixed"``: the GradScaler skips a step whose gradients overflow, and its step hooks do not run.
    The prediction made for that step was observed at the next step taken instead, a step it did not predict."""

    noise = PairedNoiseEstimator(every_n_steps=3)
    model = OverflowsAt(mlp(), overflow_steps=(3,), lr=0.05)
    fit(tmp_path, model, random_data(128), [noise], plugins=[fp16_grad_scaler(init_scale=2.0**8)])
    assert 3 not in model.stepped and len(model.stepped) == 7  # steps 0..7; the scaler skipped step 3
    assert noise.n_runs == 2 and noise.predicted == [3, 6]  # measured at steps 2 and 5, followed up at 3 and 6
    assert noise.observed == [6]
