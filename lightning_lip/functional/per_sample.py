r"""Per-sample gradients with ``torch.func``: ``vmap`` of ``grad`` over the samples of a batch, optionally chunked.

Each sample is fed as a batch of one, so ``loss_fn`` is the user's mean-loss function unchanged. The module is
called through ``functional_call`` (its parameters are never touched, no ``.backward()`` runs). A BatchNorm in
training mode couples the samples of a batch, so it has no per-sample gradient: it must be in eval mode. Random
draws in the loss (noise augmentation, dropout in training mode) are independent between samples, as they are in
a batch. Batches may hold more than tensors (file names, metadata): only tensors whose leading dimension is the
batch size are split into samples; everything else reaches ``loss_fn`` whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_lip.functional._stateless import LossFn, stateless_loss, trainable_parameters

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def per_sample_grads(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: dict[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r"""Gradients :math:`g_i = \nabla_\theta \ell(\theta; x_i)` of every sample of ``batch``.

    Args:
        module: the model; BatchNorm layers must be in eval mode (running statistics).
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss of a batch; called on batches of one sample.
        batch: a tensor or a (nested) tuple/list/dict holding tensors whose leading dimension ``B`` indexes samples
            (see :func:`batch_size`); other entries are passed whole to every sample's loss.
        params: ``{name: tensor}`` to differentiate, default the trainable parameters; others stay fixed.
        chunk_size: samples processed at once by ``vmap``: bounds the memory of the intermediates (the output,
            ``B`` x the parameters, is allocated once); ``None``: all ``B`` at once.

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
    dims = tree_map(lambda t: 0 if _is_batched(t, n) else None, batch)

    def sample_loss(p: dict[str, Tensor], sample: Any) -> Tensor:
        return loss(p, tree_map(lambda t, dim: t if dim is None else t.unsqueeze(0), sample, dims))

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, dims), randomness="different")
    step = n if chunk_size is None else chunk_size
    try:
        if step >= n:
            return grads(params, batch)
        # chunks written into the output in place: vmap's own chunking concatenates, holding the output twice
        out = {name: p.new_empty(n, *p.shape) for name, p in params.items()}
        for start in range(0, n, step):
            part = grads(params, slice_batch(batch, start, start + step))
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


def batch_size(batch: Any) -> int:
    """The number of samples ``B`` in ``batch``: the leading dimension of its first tensor with one (a tensor or
    nested tuples, lists and dicts; other entries, such as file names, are ignored)."""
    sizes = (t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0)
    size = next(sizes, None)
    if size is None:
        raise ValueError(
            f"Cannot tell the batch size of a {type(batch).__name__}: it holds no tensor with a dimension."
        )
    return size


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of ``batch``: its tensors whose leading dimension is the batch size are sliced, all
    other entries kept whole."""
    n = batch_size(batch)
    return tree_map(lambda t: t[start:stop] if _is_batched(t, n) else t, batch)


def _is_batched(leaf: Any, n: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == n
