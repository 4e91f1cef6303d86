"""A module's loss as a pure function of its parameters, for the derivatives this package takes of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch._decomp import decompositions as _decompositions
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

LossFn = Callable[[nn.Module, Any], Tensor]


def trainable_parameters(module: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` of the parameters that require grad, detached."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def stateless_loss(module: nn.Module, loss_fn: LossFn) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """``loss(params, batch)``: ``loss_fn(module, batch)`` with ``module``'s parameters named in ``params`` swapped.

    Parameters not in ``params`` keep their values. Buffers are passed as fresh copies on every call, so that a
    train-mode BatchNorm cannot update the module's running statistics. Weight normalization runs as primitive ops
    (see :class:`_DecomposedWeightNorm`), and scaled dot-product attention (``nn.MultiheadAttention``,
    ``nn.Transformer*``) on its math backend: the fused kernels (flash, memory-efficient) have no double backward or
    forward-mode formula, so Hessian-vector products through them fail, and no ``vmap`` batching rule. Their
    inference fast path is off (``torch.backends.mha``): in eval mode it turns a padded batch into nested tensors
    (``src_key_padding_mask``), which ``vmap`` cannot batch.
    """
    call = _LossCall(module, loss_fn)
    param_paths, buffer_paths = _paths(module, module.named_parameters), _paths(module, module.named_buffers)
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    weight_norm = _DecomposedWeightNorm if uses_weight_norm(module) else nullcontext

    def loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        clones = {name: b.clone() for name, b in buffers.items()}
        state = {
            f"module.{path}": t
            for tensors, paths in ((params, param_paths), (clones, buffer_paths))
            for name, t in tensors.items()
            for path in paths.get(name, [name])
        }
        with weight_norm(), sdpa_kernel(SDPBackend.MATH), _attention_fast_path_off():
            return torch.func.functional_call(call, state, (batch,), tie_weights=False)

    return loss


def _paths(module: nn.Module, named: Callable[..., Iterator[tuple[str, Tensor]]]) -> dict[str, list[str]]:
    """``{name: paths}`` for the tensors ``named()`` lists: one path to each distinct (module, attribute) that holds
    the tensor. A tensor tied into several modules has several; a module registered under two names
    (``self.backbone = self.net[0]``) one, so that ``functional_call`` swaps each attribute once. Its own tying
    (``tie_weights=True``) swaps such an attribute twice, and puts the swapped-in tensor back into the module
    instead of the original (torch 2.13)."""
    first: dict[int, str] = {}
    paths: dict[str, list[str]] = {}
    owners: set[tuple[int, str]] = set()
    for path, tensor in named(remove_duplicate=False):
        prefix, _, attribute = path.rpartition(".")
        owner = (id(module.get_submodule(prefix)), attribute)
        if owner not in owners:
            owners.add(owner)
            paths.setdefault(first.setdefault(id(tensor), path), []).append(path)
    return paths


@contextmanager
def _attention_fast_path_off() -> Iterator[None]:
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoder*`` without their inference fast path (a global flag,
    restored afterwards)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def uses_weight_norm(module: nn.Module) -> bool:
    """Whether ``module`` holds weight normalization, as a parametrization or as the older forward pre-hook."""
    return any(
        isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
        for m in module.modules()
    )


class _DecomposedWeightNorm(TorchFunctionMode):
    """Runs ``torch._weight_norm`` (both weight normalizations) as ``v * (g / norm_except_dim(v))``.

    Its fused kernel has no forward-mode formula and, in torch 2.13, a wrong double backward (``gradgradcheck``
    fails): Hessian-vector products through it would be wrong. The primitive ops give the same values (up to
    rounding) and exact second derivatives; the mode is entered only for modules that use it (it adds
    Python work to every op).
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return (_weight_norm if func is torch._weight_norm else func)(*args, **kwargs)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` in primitive ops: ``v`` scaled to norm ``g`` over all dimensions but ``dim``."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def rnn_decompositions(module: nn.Module) -> AbstractContextManager[Any]:
    """Where ``module`` holds an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``: a mode that runs their kernels as primitive
    ops (:class:`_DecomposedRNN`), for ``vmap``; else a no-op."""
    return _DecomposedRNN() if any(isinstance(m, nn.RNNBase) for m in module.modules()) else nullcontext()


class _DecomposedRNN(TorchFunctionMode):
    """Runs the recurrent kernels (``torch.rnn_tanh``, ``rnn_relu``, ``gru``, ``lstm`` on padded input) as torch's
    own decompositions into primitive ops (``torch._decomp``, which ``torch.compile`` uses).

    ``vmap`` has no batching rule for those kernels: on CPU the RNN and GRU kernels fail inside it (they write into
    an unbatched output) and LSTM's falls back to a slow loop over the samples, warning. The decompositions give the
    same values up to rounding. Packed sequences keep the kernels.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        impl = _RNN_DECOMPOSITIONS.get(func)
        # padded input: (input, hx, params, has_biases, ...); packed: (data, batch_sizes, hx, params, ...)
        padded = impl is not None and len(args) == 9 and isinstance(args[3], bool)
        return (impl if padded else func)(*args, **kwargs)


_RNN_DECOMPOSITIONS = {
    getattr(torch, op): getattr(_decompositions, name)
    for op, name in [
        ("rnn_tanh", "rnn_tanh_input"),
        ("rnn_relu", "rnn_relu_input"),
        ("gru", "gru_impl"),
        ("lstm", "lstm_impl"),
    ]
    if hasattr(_decompositions, name)
}


class _LossCall(nn.Module):
    """``forward(batch) = loss_fn(module, batch)``, so that ``functional_call`` can swap ``module``'s tensors."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)
