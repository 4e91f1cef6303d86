"""Batches as the callbacks meet them: a tensor, or tensors and other entries (file names, metadata) nested in
tuples, named tuples, lists, mappings (a tokenizer's ``BatchEncoding``), dataclasses and objects whose public
attributes hold tensors (the batch class of a custom ``collate_fn``).

Their samples are the tensors whose leading dimension is the batch size; every other entry belongs to the batch as
a whole. :func:`batch_tree` opens the containers into plain dicts, lists and tuples, the pytree ``torch.func``
maps over, and gives back the function that puts the user's containers back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, MutableMapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

Rebuild = Callable[[Any], Any]


def batch_tree(batch: Any) -> tuple[Any, Rebuild]:
    """``batch`` with its containers opened into plain dicts, lists and tuples, and ``rebuild``, which puts a tree of
    that structure (other leaves: sliced, copied, batched by ``vmap``) back into ``batch``'s own containers."""
    if isinstance(batch, Tensor):
        return batch, _same
    fields = _fields(batch)
    if fields is not None:
        tree, rebuild = batch_tree(fields)

        def rebuild_object(t: dict[str, Any]) -> Any:
            out = copy.copy(batch)  # no `__init__`/`__post_init__` again: fields set with `init=False` stay
            for name, value in rebuild(t).items():
                object.__setattr__(out, name, value)  # frozen dataclasses too
            return out

        return tree, rebuild_object
    if isinstance(batch, MutableMapping):
        keys = list(batch)
        parts = [batch_tree(batch[k]) for k in keys]

        def rebuild_mapping(t: dict[Any, Any]) -> Any:
            out = copy.copy(batch)  # its own class and attributes (a BatchEncoding's encodings), new entries
            out.clear()
            out.update({k: rebuild(t[k]) for k, (_, rebuild) in zip(keys, parts)})
            return out

        return {k: tree for k, (tree, _) in zip(keys, parts)}, rebuild_mapping
    if isinstance(batch, (list, tuple)):
        parts = [batch_tree(item) for item in batch]
        plain = list if isinstance(batch, list) else tuple

        def rebuild_sequence(t: Any) -> Any:
            items = [rebuild(item) for item, (_, rebuild) in zip(t, parts)]
            if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
                return type(batch)(*items)
            return type(batch)(items)

        return plain(tree for tree, _ in parts), rebuild_sequence
    return batch, _same


def batch_size(batch: Any) -> int:
    """The number of samples ``B`` in ``batch``: the leading dimension of its first tensor with one."""
    sizes = leading_sizes(batch)
    if not sizes:
        raise ValueError(
            f"Cannot tell the batch size of a {type(batch).__name__}: it holds no tensor with a dimension."
        )
    return sizes[0]


def leading_sizes(batch: Any) -> list[int]:
    """The distinct leading dimensions of ``batch``'s tensors, in order: ``[B]`` unless it also holds tensors that
    are not per sample (or samples batched differently, as a ``CombinedLoader`` of loaders with other batch
    sizes)."""
    leaves = tree_leaves(batch_tree(batch)[0])
    return list(dict.fromkeys(t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0))


def sample_dims(tree: Any, n: int) -> Any:
    """``vmap``'s ``in_dims`` for an opened batch of ``n`` samples: 0 for its per-sample tensors, else ``None``."""
    return tree_map(lambda t: 0 if _is_batched(t, n) else None, tree)


def slice_tree(tree: Any, dims: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of an opened batch whose per-sample tensors are marked 0 in ``dims``."""
    return tree_map(lambda t, dim: t if dim is None else t[start:stop], tree, dims)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of ``batch``, in its own containers; entries that are not per sample are kept whole."""
    tree, rebuild = batch_tree(batch)
    return rebuild(slice_tree(tree, sample_dims(tree, batch_size(batch)), start, stop))


def _fields(batch: Any) -> dict[str, Any] | None:
    """A dataclass's fields, or the public attributes of another object (a batch class of a custom ``collate_fn``)
    where one of them is a tensor; ``None`` for anything else (a leaf)."""
    if isinstance(batch, type):
        return None
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    attributes = {k: v for k, v in getattr(batch, "__dict__", {}).items() if not k.startswith("_")}
    return attributes if any(isinstance(v, Tensor) for v in attributes.values()) else None


def _is_batched(leaf: Any, n: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == n


def _same(leaf: Any) -> Any:
    return leaf
