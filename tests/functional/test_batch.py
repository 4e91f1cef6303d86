import dataclasses
import types
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from torch.utils._pytree import tree_flatten

from lightning_lip.functional.batch import batch_size, batch_tree, leading_sizes, slice_batch
from tests.models import Encoding

Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    meta: dict
    seen: int = dataclasses.field(default=0, init=False)


def nested(n=4):
    batch = Batch(torch.randn(n, 3), {"names": [f"f{i}" for i in range(n)], "weights": torch.ones(2)})
    batch.seen = 7
    return {
        "pair": Pair(torch.arange(n), torch.zeros(n, 2)),
        "encoding": Encoding({"ids": torch.ones(n, 5, dtype=torch.long)}, source="tokenizer"),
        "counts": defaultdict(int, {"a": torch.tensor(1.0)}),
        "ordered": OrderedDict(z=torch.randn(n)),
        "batch": batch,
        "list": [torch.randn(n), "tag"],
    }


def test_the_tree_is_plain_and_rebuilds_every_container():
    batch = nested()
    tree, rebuild = batch_tree(batch)
    leaves, _ = tree_flatten(tree)
    assert all(isinstance(leaf, (torch.Tensor, str, int)) for leaf in leaves) and len(leaves) == 14
    back = rebuild(tree)
    assert type(back["pair"]) is Pair and torch.equal(back["pair"].y, batch["pair"].y)
    assert type(back["encoding"]) is Encoding and back["encoding"].source == "tokenizer"
    assert type(back["counts"]) is defaultdict and back["counts"].default_factory is int
    assert type(back["ordered"]) is OrderedDict and type(back["batch"]) is Batch
    assert back["batch"].seen == 7 and back["batch"].meta["names"] == batch["batch"].meta["names"]
    assert back["list"][1] == "tag" and back is not batch and back["encoding"] is not batch["encoding"]


def test_batch_size_and_slices_take_the_per_sample_tensors_only():
    batch = nested()
    assert batch_size(batch) == 4 and batch_size(Encoding({"ids": torch.ones(6, 2)})) == 6
    part = slice_batch(batch, 1, 3)
    assert torch.equal(part["pair"].x, torch.arange(1, 3)) and part["batch"].x.shape == (2, 3)
    assert part["encoding"]["ids"].shape == (2, 5) and part["encoding"].source == "tokenizer"
    assert part["batch"].meta["names"] == batch["batch"].meta["names"]  # not a tensor: the batch's as a whole
    assert part["batch"].meta["weights"].shape == (2,) and part["counts"]["a"].shape == ()  # not per sample
    with pytest.raises(ValueError, match="batch size"):
        batch_size({"names": ["a", "b"], "step": torch.tensor(3)})
    assert leading_sizes(batch) == [4, 2] and leading_sizes({"names": ["a"], "step": torch.tensor(3)}) == []


class Custom:
    def __init__(self, x, tag):
        self.x, self.tag, self._private = x, tag, torch.zeros(1)


def test_objects_open_on_their_public_attributes_where_one_is_a_tensor():
    batch = {"custom": Custom(torch.randn(4, 2), "t"), "plain": types.SimpleNamespace(name="a"), "class": Custom}
    tree, _ = batch_tree(batch)
    assert set(tree["custom"]) == {"x", "tag"} and tree["plain"] is batch["plain"] and tree["class"] is Custom
    assert batch_size(batch) == 4
    part = slice_batch(batch, 1, 3)
    assert type(part["custom"]) is Custom and torch.equal(part["custom"].x, batch["custom"].x[1:3])
    assert part["custom"].tag == "t" and part["custom"]._private is batch["custom"]._private
    assert part["plain"] is batch["plain"] and batch["custom"].x.shape == (4, 2)  # the batch itself is untouched
