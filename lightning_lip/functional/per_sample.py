r"""Per-sample gradients with ``torch.func``: ``vmap`` of ``grad`` over the samples of a batch, optionally chunked.

Each sample is fed as a batch of one, so ``loss_fn`` is the user's mean-loss function unchanged. The module is
called through ``functional_call`` (its parameters are never touched, no ``.backward()`` runs). A BatchNorm in
training mode couples the samples of a batch, so it has no per-sample gradient: it must be in eval mode. Random
draws in the loss (noise augmentation, dropout in training mode) are independent between samples, as they are in
a batch. Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) run as primitive ops, which ``vmap`` can batch.
Batches may hold more than tensors (file names, metadata) in any containers (see
:mod:`~lightning_lip.functional.batch`): only tensors whose leading dimension is the batch size are split into
samples; everything else reaches ``loss_fn`` whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_lip.functional._stateless import LossFn, rnn_decompositions, stateless_loss, trainable_parameters
from lightning_lip.functional.batch import Rebuild, batch_size, batch_tree, sample_dims, slice_tree

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def per_sample_grads(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: dict[str, Tensor] | None = None,
    chunk_size: int | None = None,
    autograd: bool = False,
) -> dict[str, Tensor]:
    r"""Gradients :math:`g_i = \nabla_\theta \ell(\theta; x_i)` of every sample of ``batch``.

    Args:
        module: the model; BatchNorm layers must be in eval mode (running statistics).
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss of a batch; called on batches of one sample.
        batch: a tensor, or containers holding tensors whose leading dimension ``B`` indexes samples (see
            :mod:`~lightning_lip.functional.batch`); other entries are passed whole to every sample's loss.
        params: ``{name: tensor}`` to differentiate, default the trainable parameters; others stay fixed.
        chunk_size: samples processed at once by ``vmap``: bounds the memory of the intermediates (the output,
            ``B`` x the parameters, is allocated once); ``None``: all ``B`` at once.
        autograd: a Python loop over the samples with plain ``torch.autograd`` instead of ``vmap``: ``B`` forward and
            backward passes of one sample (1.6-8.2x slower on the benchmark's models), for models ``torch.func``
            cannot transform (activation checkpointing, an ``autograd.Function`` without ``setup_context``,
            ``.item()`` in the loss); ``chunk_size`` does not apply.

    Returns:
        ``{name: tensor of shape [B, *param.shape]}`` in the dtype of the parameters.

    Raises:
        ValueError: a BatchNorm is in training mode, or ``chunk_size < 1``.
        MemoryError: the computation ran out of memory; the message names ``chunk_size``.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be None or an integer >= 1, got {chunk_size!r}.")
    training_bn = [name for name, m in module.named_modules() if isinstance(m, _BATCH_NORMS) and m.training]
    if training_bn:
        raise ValueError(
            f"BatchNorm layers in training mode have no per-sample gradient (they mix the samples): {training_bn}. "
            "Call `module.eval()` (running statistics) first."
        )
    params = trainable_parameters(module) if params is None else params
    loss = stateless_loss(module, loss_fn)
    n = batch_size(batch)
    tree, rebuild = batch_tree(batch)
    dims = sample_dims(tree, n)

    def sample_loss(p: dict[str, Tensor], sample: Any) -> Tensor:
        return loss(p, rebuild(tree_map(lambda t, dim: t if dim is None else t.unsqueeze(0), sample, dims)))

    if autograd:
        return _loop(loss, params, tree, dims, rebuild, n)
    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, dims), randomness="different")
    step = n if chunk_size is None else chunk_size
    try:
        with rnn_decompositions(module):
            if step >= n:
                return grads(params, tree)
            # chunks written into the output in place: vmap's own chunking concatenates, holding the output twice
            out = {name: p.new_empty(n, *p.shape) for name, p in params.items()}
            for start in range(0, n, step):
                part = grads(params, slice_tree(tree, dims, start, start + step))
                for name, g in part.items():
                    out[name][start : start + step] = g
            return out
    except RuntimeError as error:  # torch.OutOfMemoryError on GPUs, a RuntimeError from the CPU allocator
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        raise MemoryError(
            f"Per-sample gradients ran out of memory ({error}). Pass a smaller `chunk_size` (now {chunk_size}) "
            "or fewer samples."
        ) from error


def _loop(
    loss: Callable[[dict[str, Tensor], Any], Tensor],
    params: dict[str, Tensor],
    tree: Any,
    dims: Any,
    rebuild: Rebuild,
    n: int,
) -> dict[str, Tensor]:
    """Per-sample gradients by ``torch.autograd.grad`` on each sample in turn (a batch of one)."""
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    out = {name: p.new_zeros(n, *p.shape) for name, p in params.items()}
    with torch.enable_grad():
        for i in range(n):
            grads = torch.autograd.grad(
                loss(leaves, rebuild(slice_tree(tree, dims, i, i + 1))), list(leaves.values()), allow_unused=True
            )
            for name, g in zip(leaves, grads):
                if g is not None:
                    out[name][i] = g
    return out
