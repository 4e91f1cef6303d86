"""Dense references the tests compare against: built with torch.func / torch.linalg, never with our solvers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def dense_operator(module: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    """The layer's linear map on one sample, as a dense float64 matrix ``[out_numel, in_numel]``.

    Built by ``jacrev`` of ``module(x) - module(0)`` on a float64 copy, so it uses the module's own forward
    (padding modes included) and nothing of ``lightning_lip``.
    """
    m = _float64_copy(module)

    def f(x: Tensor) -> Tensor:
        zero = torch.zeros_like(x)
        return (m(x.unsqueeze(0)) - m(zero.unsqueeze(0))).squeeze(0)

    J = torch.func.jacrev(f)(torch.zeros(input_shape, dtype=torch.float64))
    n_in = int(torch.tensor(input_shape).prod())
    return J.reshape(-1, n_in)


def dense_operator_norm(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """Spectral norm of the layer's true operator (``matrix_norm(ord=2)`` of the dense Jacobian)."""
    if isinstance(module, nn.Linear):
        return torch.linalg.matrix_norm(module.weight.detach().double(), ord=2).item()
    return torch.linalg.matrix_norm(dense_operator(module, input_shape), ord=2).item()


def input_jacobian_norms(model: nn.Module, xs: Tensor) -> Tensor:
    """``||d model(x) / dx||_2`` for each row ``x`` of ``xs``: local Lipschitz constants of the network."""
    m = _float64_copy(model)
    jac = torch.func.vmap(torch.func.jacrev(lambda x: m(x.unsqueeze(0)).squeeze(0)))(xs.double())
    return torch.linalg.matrix_norm(jac, ord=2)


def _float64_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double().eval()


def dense_hessian(module: nn.Module, loss_of_output, inputs: Tensor, targets: Tensor) -> Tensor:
    """Exact Hessian ``[P, P]`` of ``loss_of_output(module(inputs), targets)`` w.r.t. the trainable parameters, by
    ``torch.autograd.functional.hessian`` on a flat parameter vector (parameter order of ``named_parameters``);
    attention runs on its math backend, the only one with a double backward."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for n, p in module.named_parameters() if p.requires_grad])

    def f(theta: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = int(torch.tensor(shape).prod()) if len(shape) else 1
            params[name] = theta[offset : offset + n].view(shape)
            offset += n
        return loss_of_output(torch.func.functional_call(module, params, (inputs,)), targets)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat)
