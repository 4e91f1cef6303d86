"""What forward hooks record of the layers during training: convolutions' shapes and layers applied in a chain."""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn

from lightning_lip.callbacks._measuring import measuring
from lightning_lip.functional.spectral import Operator, layer_operator, sample_shape


class LayerShapes:
    r"""One sample's input and output shapes of convolutions, recorded by forward hooks, and the layers' true
    operators on them.

    A convolution that runs on inputs of several sizes (variable-length sequences, random crops, larger images in
    validation, an image pyramid) is measured on the largest: the elementwise maximum of every shape seen, input and
    output (the output's maximum is that of the largest input, a transposed convolution's largest output padding
    included). With zero padding that norm bounds the norm at every size seen: the operator on a smaller input is a
    compression :math:`P A E` of the one on a larger input (:math:`E` pads the input with zeros at the end,
    :math:`P` keeps the first outputs), so :math:`\|P A E\|_2 \le \|A\|_2`. Other padding modes give no such
    order; :attr:`varied` names the layers whose sizes have varied.
    """

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.varied: set[str] = set()
        self._handles: dict[str, Any] = {}

    def attach(self, layers: dict[str, nn.Module]) -> None:
        """Hook the convolutions not hooked yet; a ``Linear``'s operator needs no shape (and a hook would slow every
        forward)."""
        for name, layer in layers.items():
            if not isinstance(layer, nn.Linear) and name not in self._handles:
                self._handles[name] = layer.register_forward_hook(partial(self._record, name), with_kwargs=True)

    def _record(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> None:
        x = args[0] if args else kwargs["input"]  # `conv(input=x)`
        self.update(name, (sample_shape(module, x), sample_shape(module, output)))

    def update(self, name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        """Take ``(input_shape, output_shape)`` of one sample of layer ``name`` into the elementwise maxima."""
        seen = self.shapes.get(name)
        if seen != shapes:
            if seen is not None:
                self.varied.add(name)
                shapes = tuple(tuple(map(max, old, new)) for old, new in zip(seen, shapes))  # type: ignore[assignment]
            self.shapes[name] = shapes

    def all_reduce(self, layers: dict[str, nn.Module], strategy: Strategy) -> None:
        """Take the maxima over every rank (one collective of a few integers), so that every rank measures each
        convolution on the same shape, the largest any rank has run it on."""
        dims = {name: len(layer.kernel_size) + 1 for name, layer in layers.items() if not isinstance(layer, nn.Linear)}
        if not dims:
            return
        local = [
            d for name, n in dims.items() for d in (sum(self.shapes[name], ()) if name in self.shapes else (0,) * 2 * n)
        ]
        merged = strategy.reduce(torch.tensor(local, device=strategy.root_device), reduce_op="max").tolist()
        for name, n in dims.items():
            part, merged = merged[: 2 * n], merged[2 * n :]
            if any(part):
                self.update(name, (tuple(part[:n]), tuple(part[n:])))

    def input_shape(self, name: str, layer: nn.Module) -> tuple[int, ...] | None:
        """One sample's input shape; ``None`` for a convolution that has not run yet."""
        if name in self.shapes:
            return self.shapes[name][0]
        return (layer.in_features,) if isinstance(layer, nn.Linear) else None

    def output_shape(self, name: str, layer: nn.Module) -> tuple[int, ...] | None:
        """One sample's output shape; ``None`` for a convolution that has not run yet."""
        if name in self.shapes:
            return self.shapes[name][1]
        return (layer.out_features,) if isinstance(layer, nn.Linear) else None

    def operator(self, name: str, layer: nn.Module, weight: Tensor | None = None) -> Operator | None:
        """The layer's true operator (with ``weight`` instead of its own if given); ``None`` before a convolution's
        first forward pass."""
        if name in self.shapes:
            return layer_operator(layer, *self.shapes[name], weight=weight)
        return layer_operator(layer, weight=weight) if isinstance(layer, nn.Linear) else None

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}


class LayerChains:
    """The layers that a training step applies several times in a chain, and the longest chain of each: an
    application whose input autograd's graph leads back to an earlier application's output of the same weight (a
    block in a loop, tied layers in sequence). Forward hooks from :meth:`start` to :meth:`stop`, then removed, so
    that they cost nothing after that step. A network applied to several inputs side by side (two views of a batch,
    a critic on real and generated samples) makes no chain. Not seen: the callbacks' own measurements, compiled
    regions (``torch.compile`` traces no graph walk), and chains through tensors without a graph (no parameter
    upstream requires grad)."""

    def __init__(self) -> None:
        self.longest: dict[str, int] = {}
        self._outputs: dict[str, dict[Any, int]] = {}  # per layer: grad_fn of each application's output -> its depth
        self._handles: list[Any] = []

    def start(self, groups: dict[str, list[nn.Module]]) -> None:
        """Follow the applications of each name's modules (a layer and the layers tied to it) from now on."""
        self.remove()
        self.longest = dict.fromkeys(groups, 0)
        self._outputs = {name: {} for name in groups}
        hooks = [(m, partial(self._record, name)) for name, group in groups.items() for m in group]
        self._handles = [m.register_forward_hook(hook, with_kwargs=True) for m, hook in hooks]

    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if measuring() or torch.compiler.is_compiling() or not isinstance(output, Tensor):
            return
        outputs = self._outputs[name]
        depth = 1 + (_depth_upstream((*args, *kwargs.values()), outputs) if outputs else 0)
        if output.grad_fn is not None:
            outputs[output.grad_fn] = depth
        self.longest[name] = max(self.longest[name], depth)

    @property
    def following(self) -> bool:
        return bool(self._handles)

    def stop(self) -> dict[str, int]:
        """Remove the hooks; return ``{name: k}`` of the layers applied ``k > 1`` times in a chain."""
        self.remove()
        return {name: k for name, k in self.longest.items() if k > 1}

    def remove(self) -> None:
        """Remove the hooks and drop the outputs followed (autograd nodes, which hold the step's activations)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}


def _depth_upstream(args: tuple[Any, ...], outputs: dict[Any, int]) -> int:
    """Depth of the nearest of ``outputs`` (autograd nodes) upstream of the tensors in ``args``, 0 if none is: a
    breadth-first walk of autograd's graph, which stops at the first one found (in a chain, the latest)."""
    frontier = deque(t.grad_fn for t in args if isinstance(t, Tensor) and t.grad_fn is not None)
    seen: set[Any] = set()
    while frontier:
        node = frontier.popleft()
        if node in outputs:
            return outputs[node]
        if node not in seen:
            seen.add(node)
            frontier.extend(upstream for upstream, _ in node.next_functions if upstream is not None)
    return 0
