r"""Hessian-vector products of a loss with respect to a module's parameters, on flat vectors.

Reverse-over-reverse with plain ``torch.autograd`` (a backward pass that records its graph, then a second backward
through it) on ``torch.func.functional_call``: the module's own parameters are never touched, ``.grad`` is never
written, and buffers (BatchNorm running statistics) are passed as copies so that a product leaves them unchanged.
Measured against ``torch.func``'s forward-over-reverse (``jvp`` of ``grad``) on CPU, plain autograd is as fast or
faster (0.98-1.39x on four networks, 2.4x on a small MLP, ``benchmarks/RESULTS.md``), peaks 25-45 % lower in memory,
and differentiates what ``torch.func``'s transforms refuse: activation checkpointing (non-reentrant), old-style
``autograd.Function``\ s without ``setup_context``, ``.item()`` in the loss, and ops without a forward-mode formula
(``F.grid_sample``, ``F.huber_loss``); in a survey of 23 ops none had a forward-over-reverse product but no double
backward. Weight normalization runs as primitive ops (its fused kernel's second derivative is wrong in torch 2.13),
and scaled dot-product attention on its math backend. A loss that draws random numbers (noise augmentation in
``training_step``) is differentiated at one fixed draw: every product replays the random state the operator was
made with, and leaves the global one untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lip.functional._stateless import LossFn, stateless_loss, trainable_parameters


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one 1-D vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vector`` into tensors shaped like ``like`` (inverse of :func:`flatten`)."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def hvp_operator(
    module: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    batch_sizes: Sequence[int] | None = None,
    params: dict[str, Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    r"""The map :math:`v \mapsto H v` with :math:`H = \nabla^2_\theta \bar L`, flat vectors in and out.

    :math:`\bar L = \sum_b n_b L_b / \sum_b n_b` is the mean loss over ``batches`` weighted by batch size.

    Args:
        module: the model; called through ``functional_call`` with ``params`` (and copies of its buffers).
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss of one batch; it calls ``module`` (possibly through
            a method such as ``training_step``), whose parameters are swapped for the ones being differentiated.
        batches: the batches the Hessian is taken over.
        batch_sizes: weights of the batches; default all equal.
        params: ``{name: tensor}`` to differentiate, default :func:`trainable_parameters`; others stay fixed.

    Returns:
        ``hvp(v)`` for ``v`` of shape ``[P]``, ``P`` the total number of elements of ``params``; the products run in
        the parameters' precision and are summed over batches in ``v``'s (float32 vectors for bfloat16
        parameters, float64 vectors for float64 ones). Every call runs ``loss_fn`` from the random state of the CPU
        and of the CUDA devices holding ``params`` as it was when the operator was made, so that random draws in
        the loss are the same for every product (one symmetric operator).

    With a single batch the gradient and its graph are built by the first product and kept: every later product
    is one backward pass through them (a warm measurement of 6 products 1.6-1.9x faster, no more memory than one
    product). With several, every product rebuilds each batch's graph in turn, so that no more than one is held.
    The operator is for the parameters as they are when it is first called.
    """
    params = trainable_parameters(module) if params is None else params
    names, values = list(params), list(params.values())
    devices = list(dict.fromkeys(v.device for v in values if v.device.type == "cuda"))
    cpu_state, cuda_states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
    sizes = [1.0] * len(batches) if batch_sizes is None else [float(n) for n in batch_sizes]
    total = sum(sizes)
    stateless = stateless_loss(module, loss_fn)

    kept: list[tuple[list[Tensor], list[Tensor | None]]] = []  # a single batch's gradient graph, for every product

    def gradient(batch: Any) -> tuple[list[Tensor], list[Tensor | None]]:
        """The leaves standing for ``params`` and the gradients with their graph, to be differentiated once more;
        ``None`` where the gradient does not depend on the parameters (none, or a constant one)."""
        leaves = [value.detach().requires_grad_() for value in values]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                stateless(dict(zip(names, leaves)), batch), leaves, create_graph=True, allow_unused=True
            )
        return leaves, [g if g is not None and g.requires_grad else None for g in grads]

    def product(batch: Any, tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(batches) == 1 and not kept:
            kept.append(gradient(batch))
        leaves, grads = kept[0] if kept else gradient(batch)
        pairs = [(g, t) for g, t in zip(grads, tangents) if g is not None]
        products = (
            torch.autograd.grad(
                [g for g, _ in pairs], leaves, [t for _, t in pairs], retain_graph=bool(kept), allow_unused=True
            )
            if pairs
            else [None] * len(leaves)  # a loss linear in the parameters
        )
        return tuple(torch.zeros_like(value) if h is None else h for value, h in zip(values, products))

    def hvp(v: Tensor) -> Tensor:
        tangents = tuple(unflatten(v.to(values[0].dtype), values))
        out = torch.zeros_like(v)
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            for batch, n in zip(batches, sizes):
                out += (n / total) * flatten(product(batch, tangents)).to(v.dtype)
        return out

    return hvp
