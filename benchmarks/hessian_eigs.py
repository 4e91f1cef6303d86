"""HVPs to reach a 1e-3 accurate lambda_max: our Lanczos vs PyHessian's power iteration and SciPy's eigsh.

    pip install -c constraints.txt pyhessian scipy && pip uninstall -y torchvision   # constraints: torch==2.13.0
    python benchmarks/hessian_eigs.py [--seeds 20]

1. Synthetic symmetric operators with lambda_2 / lambda_1 = 0.99 (n = 2000), cold starts and warm starts after
   the operator moved (top eigenvector rotated by ~3 degrees). PyHessian is run as shipped (its stopping rule:
   relative change < 1e-3) on a module whose loss Hessian is the operator; it and our Lanczos also with an oracle
   stop (the first iteration whose error is <= 1e-3). eigsh gets ``tol=1e-3`` and, warm, ``v0`` = previous eigenvector.
2. A digits MLP (sklearn, 2410 parameters) after a few epochs, probe of 256 samples: lambda_max against the
   dense Hessian (``torch.autograd.functional.hessian`` + ``eigvalsh``), HVPs and seconds.
3. The cost of one HVP as a multiple of one gradient (ours, a plain-autograd double backward, and torch.func's
   forward-over-reverse), and the amortized overhead of HessianEigenMonitor at its default cadence (every
   200 steps) on the digits CNN.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent))
from lightning_lip.callbacks.hessian_monitor import _COLD_RESIDUAL_FACTOR  # noqa: E402
from lightning_lip.functional.hvp import hvp_operator, trainable_parameters  # noqa: E402
from lightning_lip.functional.lanczos import lanczos  # noqa: E402

TOL = 1e-3


class Counted:
    """A matvec that counts its calls."""

    def __init__(self, matvec):
        self.matvec, self.n = matvec, 0

    def __call__(self, v):
        self.n += 1
        return self.matvec(v)


def near_degenerate(n: int, seed: int, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, Q)``: lambda_1 = 1, lambda_2 = 0.99, then network-like (10 outliers uniform in [0.2, 0.8],
    the bulk in [-0.02, 0.05]) or, ``hard``, everything else uniform in [-0.3, 0.95]."""
    g = torch.Generator().manual_seed(seed)
    if hard:
        rest = torch.rand(n - 2, generator=g) * 1.25 - 0.3
    else:
        rest = torch.cat([torch.rand(10, generator=g) * 0.6 + 0.2, torch.rand(n - 12, generator=g) * 0.07 - 0.02])
    eigs = torch.cat([torch.tensor([1.0, 0.99]), rest]).double()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return eigs, q


def _pyhessian_module():
    """The module ``pyhessian.hessian`` (the package re-exports a class of the same name over it)."""
    import importlib

    return importlib.import_module("pyhessian.hessian")


class Quadratic(nn.Module):
    """``forward() = theta``; with the loss ``theta^T A theta / 2`` its loss Hessian is ``A`` (for PyHessian)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return self.theta


def pyhessian_power(matrix: torch.Tensor, oracle_value: float | None, seed: int) -> tuple[int, float]:
    """PyHessian's ``eigenvalues()`` on the quadratic of ``matrix``: (HVPs, estimate). With ``oracle_value``, the
    HVPs of the first iterate within TOL of it instead of PyHessian's own stop."""
    ph = _pyhessian_module()
    model = Quadratic(matrix.shape[0])
    criterion = lambda out, target: 0.5 * out @ (matrix @ out)  # noqa: E731
    calls = {"n": 0, "values": []}
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        calls["n"] += 1
        hv = original(gradsH, params, v)
        calls["values"].append(sum((a * b).sum() for a, b in zip(hv, v)).item())
        return hv

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(seed)
        h = ph.hessian(model, criterion, data=(torch.zeros(1), torch.zeros(1)), cuda=False)
        max_iter = 2000 if oracle_value is not None else 100
        value = h.eigenvalues(maxIter=max_iter, tol=0.0 if oracle_value is not None else TOL)[0][0]
    finally:
        ph.hessian_vector_product = original
    if oracle_value is None:
        return calls["n"], value
    for i, v in enumerate(calls["values"]):
        if abs(v - oracle_value) <= TOL * abs(oracle_value):
            return i + 1, v
    return calls["n"], calls["values"][-1]


def scipy_eigsh(matvec, n: int, v0: np.ndarray | None) -> tuple[int, float]:
    counted = Counted(lambda x: matvec(torch.from_numpy(np.ascontiguousarray(x).reshape(-1))).numpy())
    op = LinearOperator((n, n), matvec=counted, dtype=np.float64)
    value = eigsh(op, k=1, which="LA", tol=TOL, v0=v0, ncv=20)[0][0]
    return counted.n, float(value)


def ours(matvec, v0: torch.Tensor, warm: bool = False) -> tuple[int, float, torch.Tensor]:
    """HVPs, lambda_max and its eigenvector, with the monitor's residual bar for a cold or warm start."""
    counted = Counted(matvec)
    res = lanczos(counted, v0, max_iter=100, tol=TOL, residual_factor=1.0 if warm else _COLD_RESIDUAL_FACTOR)
    return counted.n, res.eigenvalues[0].item(), res.eigenvectors[0]


def ours_oracle(matvec, v0: torch.Tensor, exact: float) -> tuple[int, float]:
    """Lanczos steps until the top Ritz value is first within TOL of ``exact`` (a stop no solver can apply)."""
    for steps in range(1, v0.numel() + 1):
        value = lanczos(matvec, v0, max_iter=steps, min_iter=steps, tol=math.inf).eigenvalues[0].item()
        if abs(value - exact) <= TOL * abs(exact):
            return steps, value
    return steps, value


def synthetic(seeds: int, hard: bool, n: int = 2000) -> None:
    spectrum = "rest uniform in [-0.3, 0.95]" if hard else "10 outliers in [0.2, 0.8], bulk in [-0.02, 0.05]"
    print(f"## 1. lambda_2/lambda_1 = 0.99, {spectrum}, n = {n}, {seeds} seeds, target relative error {TOL:g}\n")
    rows: dict[str, list] = {
        k: []
        for k in [
            "ours cold",
            "ours warm",
            "ours (oracle stop)",
            "PyHessian (own stop)",
            "PyHessian (oracle stop)",
            "eigsh cold",
            "eigsh warm",
        ]
    }
    exact_cold, exact_warm = [], []
    for seed in range(seeds):
        eigs, q = near_degenerate(n, seed, hard)
        a = q @ torch.diag(eigs) @ q.T
        g = torch.Generator().manual_seed(1000 + seed)
        v0 = torch.randn(n, generator=g, dtype=torch.float64)
        hvps, value, vec = ours(lambda x: a @ x, v0)
        rows["ours cold"].append((hvps, value))
        rows["ours (oracle stop)"].append(ours_oracle(lambda x: a @ x, v0, 1.0))
        rows["PyHessian (own stop)"].append(pyhessian_power(a, None, seed))
        rows["PyHessian (oracle stop)"].append(pyhessian_power(a, 1.0, seed))
        rows["eigsh cold"].append(scipy_eigsh(lambda x: a @ x, n, v0.numpy()))
        exact_cold.append(1.0)
        # the operator moves: rotate the top eigenvector by 0.05 rad (~3 degrees) and scale lambda_max by 1.01
        c, s = math.cos(0.05), math.sin(0.05)
        q2 = q.clone()
        q2[:, 0], q2[:, 2] = c * q[:, 0] + s * q[:, 2], -s * q[:, 0] + c * q[:, 2]
        eigs2 = eigs.clone()
        eigs2[0] = 1.01
        a2 = q2 @ torch.diag(eigs2) @ q2.T
        noise = torch.randn(n, generator=g, dtype=torch.float64)
        start = vec + 0.1 * noise / noise.norm()  # HessianEigenMonitor's default warm_mix
        rows["ours warm"].append(ours(lambda x: a2 @ x, start, warm=True)[:2])
        rows["eigsh warm"].append(scipy_eigsh(lambda x: a2 @ x, n, vec.numpy()))
        exact_warm.append(1.01)
    exact = {k: exact_warm if "warm" in k else exact_cold for k in rows}
    print("| method | median HVPs | max HVPs | median rel. error | max rel. error |")
    print("|---|---|---|---|---|")
    for name, results in rows.items():
        hvps = [r[0] for r in results]
        errors = [abs(r[1] - e) / abs(e) for r, e in zip(results, exact[name])]
        print(
            f"| {name} | {statistics.median(hvps):.0f} | {max(hvps)} | {statistics.median(errors):.1e} | "
            f"{max(errors):.1e} |"
        )


def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float64) / 16, torch.tensor(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(5):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return net, x[:256], y[:256]


def real_model(seeds: int) -> None:
    net, x, y = digits_mlp()
    params = trainable_parameters(net)
    n = sum(p.numel() for p in params.values())
    loss = lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])  # noqa: E731
    hvp = hvp_operator(net, loss, [(x, y)])
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    names, shapes = list(params), [p.shape for p in params.values()]

    def flat_loss(theta):
        split = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(torch.func.functional_call(net, split, (x,)), y)

    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat))
    exact = eigs[-1].item()
    print(f"\n## 2. Digits MLP 64-32-10 (tanh), {n} parameters, probe 256 samples, float64, {seeds} seeds\n")
    print(f"Dense Hessian: lambda_1 = {exact:.5f}, lambda_2 / lambda_1 = {eigs[-2].item() / exact:.3f}\n")
    rows: dict[str, list] = {"ours cold": [], "PyHessian (own stop)": [], "eigsh cold": []}
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    ph = _pyhessian_module()

    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        v0 = torch.randn(n, generator=g, dtype=torch.float64)
        t = time.perf_counter()
        rows["ours cold"].append(ours(hvp, v0)[:2])
        seconds["ours cold"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rows["eigsh cold"].append(scipy_eigsh(hvp, n, v0.numpy()))
        seconds["eigsh cold"].append(time.perf_counter() - t)
        calls = {"n": 0}
        original = ph.hessian_vector_product

        def counted(*args):
            calls["n"] += 1
            return original(*args)

        ph.hessian_vector_product = counted
        torch.manual_seed(seed)
        t = time.perf_counter()
        h = ph.hessian(net, F.cross_entropy, data=(x, y), cuda=False)
        value = h.eigenvalues(maxIter=100, tol=TOL)[0][0]
        seconds["PyHessian (own stop)"].append(time.perf_counter() - t)
        ph.hessian_vector_product = original
        rows["PyHessian (own stop)"].append((calls["n"], value))
    print("| method | median HVPs | max HVPs | median rel. error | max rel. error | median seconds |")
    print("|---|---|---|---|---|---|")
    for name, results in rows.items():
        hvps = [r[0] for r in results]
        errors = [abs(r[1] - exact) / exact for r in results]
        print(
            f"| {name} | {statistics.median(hvps):.0f} | {max(hvps)} | {statistics.median(errors):.1e} | "
            f"{max(errors):.1e} | {statistics.median(seconds[name]):.3f} |"
        )


def hvp_cost(repeats: int = 30) -> None:
    """One HVP as a multiple of one gradient (same loss and batch, the gradient by plain autograd): ours, a double
    backward, and torch.func's forward-over-reverse (``jvp`` of ``grad``, our products before 2026-12-07);
    interleaved, medians."""
    net, x, y = digits_mlp()
    params = trainable_parameters(net)
    names, values = list(params), tuple(params.values())

    def loss_of(p):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    func_grad = torch.func.grad(loss_of)
    ours = hvp_operator(net, lambda module, batch: F.cross_entropy(module(batch[0]), batch[1]), [(x, y)])
    leaves = [p.detach().requires_grad_() for p in values]
    v = torch.randn(sum(p.numel() for p in values), dtype=torch.float64)
    tangents = tuple(v_.view_as(p) for v_, p in zip(v.split([p.numel() for p in values]), values))
    runs = {
        "gradient": lambda: torch.autograd.grad(loss_of(leaves), leaves),
        "ours": lambda: ours(v),
        "torch.func": lambda: torch.func.jvp(func_grad, (values,), (tangents,)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    g = statistics.median(times["gradient"])
    print(f"\nOne HVP on the digits MLP (median of {repeats}, interleaved): ", end="")
    print(", ".join(f"{name} {statistics.median(times[name]) / g:.1f} gradients" for name in ("ours", "torch.func")))


def amortized_overhead(repeats: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    from _timing import overhead_ratios, quiet_trainer  # noqa: PLC0415
    from digits import DigitsCNN, digits_loaders  # noqa: PLC0415

    from lightning_lip import HessianEigenMonitor  # noqa: PLC0415

    train, _ = digits_loaders()
    ratios = overhead_ratios(
        lambda callbacks: quiet_trainer(max_steps=600, callbacks=callbacks).fit(DigitsCNN(), train),
        HessianEigenMonitor,
        repeats,
    )
    print(
        f"\n## 3. Amortized overhead, HessianEigenMonitor() defaults (every 200 steps, 256-sample probe), digits CNN, "
        f"600 steps of batch 64: {100 * statistics.median(ratios):+.1f}% (median of {repeats} interleaved pairs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    synthetic(args.seeds, hard=False)
    synthetic(args.seeds, hard=True)
    real_model(max(3, args.seeds // 4))
    hvp_cost()
    amortized_overhead(args.repeats)


if __name__ == "__main__":
    main()
