import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_lip.functional._stateless import rnn_decompositions
from lightning_lip.functional.per_sample import per_sample_grads
from tests.models import Aliased, TinyRNN, TinyTransformer, cnn, mlp


def ce(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def loop_grads(module, batch):
    """Reference: one backward per sample."""
    x, y = batch
    out = []
    for i in range(x.shape[0]):
        module.zero_grad()
        ce(module, (x[i : i + 1], y[i : i + 1])).backward()
        out.append({n: p.grad.clone() for n, p in module.named_parameters()})
    return {n: torch.stack([o[n] for o in out]) for n in out[0]}


CASES = {
    "mlp": (lambda: mlp((6, 10, 10, 3)), (6,)),
    "cnn": (lambda: cnn(2, 3), (2, 8, 8)),
    "transformer": (TinyTransformer, (5, 8)),
    "GRU": (lambda: TinyRNN("GRU"), (5, 8)),
    "LSTM": (lambda: TinyRNN("LSTM"), (5, 8)),
    "RNN-2-layers-bidirectional": (lambda: TinyRNN("RNN", num_layers=2, bidirectional=True), (5, 8)),
    "weight_norm": (lambda: nn.Sequential(weight_norm(nn.Conv2d(2, 3, 3)), nn.Flatten(), nn.Linear(108, 3)), (2, 8, 8)),
}


def _tensors(module):
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


@pytest.mark.parametrize("autograd", [False, True])
def test_a_module_registered_under_two_names_keeps_its_own_tensors(autograd):
    """``functional_call`` swapped the attributes of a module reached by two names twice, and left the swapped-in
    tensors in it (``vmap``'s wrappers in place of the parameters: the run crashed at the end of fit)."""
    module = Aliased().double().eval()
    before = _tensors(module)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = per_sample_grads(module, ce, (x, y), autograd=autograd)
    assert all(t is before[name] for name, t in _tensors(module).items())
    expected = loop_grads(module, (x, y))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_plain_autograd_loop_equals_python_loop_float64(case):
    """``autograd=True``: a loop with plain autograd, the fallback for models torch.func cannot transform."""
    make, shape = CASES[case]
    module = make().double().eval()
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = per_sample_grads(module, ce, (x, y), autograd=True)
    assert all(p.grad is None for p in module.parameters())
    expected = loop_grads(module, (x, y))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_python_loop_float64(case):
    make, shape = CASES[case]
    module = make().double().eval()
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    with warnings.catch_warnings():  # attention on its math backend, RNNs decomposed: no slow vmap fallback
        warnings.simplefilter("error")
        got = per_sample_grads(module, ce, (x, y))
    chunked = per_sample_grads(module, ce, (x, y), chunk_size=3)
    assert all(p.grad is None for p in module.parameters())  # .grad untouched
    expected = loop_grads(module, (x, y))
    assert set(got) == set(expected)
    for name in expected:
        # float64: both are exact up to rounding of a few hundred flops
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(chunked[name], got[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("chunk_size", "autograd"), [(None, False), (3, False), (None, True)])
def test_random_draws_in_the_loss_are_independent_between_samples(chunk_size, autograd):
    """A loss scaled by a factor r ~ U(0, 1) drawn inside it: each sample's gradient is its own r times the loop's
    gradient, with a different r for every sample, as in a batch."""
    module = mlp((6, 10, 3)).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    scaled = lambda m, b: torch.rand((), dtype=torch.float64) * ce(m, b)  # noqa: E731
    got = per_sample_grads(module, scaled, (x, y), chunk_size=chunk_size, autograd=autograd)
    expected = loop_grads(module, (x, y))
    got, expected = (torch.cat([g[n].reshape(7, -1) for n in expected], 1) for g in (got, expected))
    r = (got * expected).sum(1) / expected.square().sum(1)  # least-squares factor per sample
    torch.testing.assert_close(got, r[:, None] * expected, rtol=1e-10, atol=1e-14)
    assert ((r > 0) & (r < 1)).all() and len(set(r.tolist())) == 7


@pytest.mark.parametrize(("chunk_size", "autograd"), [(None, False), (3, False), (None, True)])
def test_batches_holding_more_than_tensors(chunk_size, autograd):
    """A dict batch with file names and a tensor that is not per sample (class weights of the loss): only the
    per-sample tensors are split, the rest reaches every sample's loss whole."""
    module = mlp((6, 10, 3)).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    batch = {"names": [f"img{i}.png" for i in range(7)], "x": x, "y": y, "class_weights": weights}

    def weighted(m, b):
        assert b["names"] == batch["names"] and torch.equal(b["class_weights"], weights)
        return F.cross_entropy(m(b["x"]), b["y"], weight=b["class_weights"])

    got = per_sample_grads(module, weighted, batch, chunk_size=chunk_size, autograd=autograd)
    expected = {n: [] for n, _ in module.named_parameters()}
    for i in range(7):
        module.zero_grad()
        F.cross_entropy(module(x[i : i + 1]), y[i : i + 1], weight=weights).backward()
        for n, p in module.named_parameters():
            expected[n].append(p.grad.clone())
    for name, rows in expected.items():
        torch.testing.assert_close(got[name], torch.stack(rows), rtol=1e-6, atol=1e-10)


def test_params_subset_and_frozen_parameters_are_left_out():
    module = mlp((4, 5, 3))
    module[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    assert set(per_sample_grads(module, ce, (x, y))) == {"0.bias", "2.weight", "2.bias"}
    only = per_sample_grads(module, ce, (x, y), params={"2.bias": module[2].bias.detach()})
    assert set(only) == {"2.bias"} and only["2.bias"].shape == (4, 3)


def test_batchnorm_eval_mode_works_train_mode_is_a_clear_error():
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    module(torch.randn(32, 4))  # running statistics
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="BatchNorm.*training mode.*eval"):
        per_sample_grads(module, ce, (x, y))
    module.eval()
    before = module[1].running_mean.clone()
    got = per_sample_grads(module.double(), ce, (x.double(), y))
    expected = loop_grads(module, (x.double(), y))
    torch.testing.assert_close(got["1.weight"], expected["1.weight"], rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(module[1].running_mean, before.double())


def test_bad_chunk_size_and_out_of_memory_name_chunk_size(monkeypatch):
    module = mlp((4, 3))
    batch = (torch.randn(2, 4), torch.randint(0, 3, (2,)))
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(module, ce, batch, chunk_size=0)

    def exhausted(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

        return run

    monkeypatch.setattr(torch.func, "vmap", exhausted)
    with pytest.raises(MemoryError, match="chunk_size"):
        per_sample_grads(module, ce, batch, chunk_size=8)


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
def test_rnn_decompositions_compute_the_kernels_values_and_leave_packed_sequences_to_them(cell):
    rnn = getattr(nn, cell)(4, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, [6, 4, 2], batch_first=True)
    with rnn_decompositions(rnn):
        padded_out, packed_out = rnn(x)[0], rnn(packed)[0].data
    torch.testing.assert_close(padded_out, rnn(x)[0], rtol=1e-12, atol=1e-14)  # float64 rounding of the same sums
    assert torch.equal(packed_out, rnn(packed)[0].data)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = mlp((6, 10, 3))

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def test_plain_autograd_loop_through_activation_checkpointing():
    """``vmap`` refuses checkpointing's saved-tensor hooks; the loop equals one backward per sample."""
    module = _Checkpointed().double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    with pytest.raises(RuntimeError, match="saved tensor hooks|does not have vmap support"):  # torch 2.13 | 2.4
        per_sample_grads(module, ce, (x, y))
    got = per_sample_grads(module, ce, (x, y), autograd=True)
    for name, expected in loop_grads(module, (x, y)).items():
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-10)


def test_padded_batches_through_a_transformer_encoder_in_eval_mode():
    """In eval mode ``nn.TransformerEncoder`` turns a batch with ``src_key_padding_mask`` into nested tensors (its
    inference fast path), which ``vmap`` cannot batch: the measurements turn the fast path off, and restore it."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double().eval()
    x = torch.randn(6, 7, 8, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor([[3], [7], [5], [4], [7], [2]])

    def loss(m, batch):
        return m(batch[0], src_key_padding_mask=~batch[1]).square().mean()

    got = per_sample_grads(module, loss, (x, mask))
    assert torch.backends.mha.get_fastpath_enabled()
    for name, g in got.items():
        expected = torch.stack(
            [
                torch.autograd.grad(
                    loss(module, (x[i : i + 1], mask[i : i + 1])), dict(module.named_parameters())[name]
                )[0]
                for i in range(6)
            ]
        )
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-10)
