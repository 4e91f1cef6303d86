"""Per-sample gradients: ours (torch.func vmap) vs a Python loop, Opacus GradSampleModule and BackPACK BatchGrad.

    pip install -c constraints.txt opacus backpack-for-pytorch && pip uninstall -y torchvision  # torch==2.13.0
    python benchmarks/per_sample.py [--repeats 7]

1. Seconds for the per-sample gradients of a batch of 128 (MLP 64-256-256-10, MLP 256-512-512-10, the digits
   CNN, and a 2-conv CNN on 3x32x32 inputs with few parameters and large activations; cross-entropy),
   medians over interleaved repeats, and each method's time as a multiple of ours; next to them a floor on every
   method (the batch gradient written out per sample: loop / floor bounds what batching can gain over the loop).
2. Peak memory (resident set growth of a fresh process) of ours with and without chunking.
3. Amortized overhead of GradientNoiseEstimator at its default cadence (as often as its 5 % time budget allows)
   on the digits CNN and on a 3-conv CNN with 3x32x32 inputs, and at a fixed cadence of every 100 steps.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from lightning_lip.functional.per_sample import per_sample_grads  # noqa: E402

B = 128


MODELS = ["mlp", "wide", "cnn", "cnn32"]


def make(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)), (64,)
    if name == "wide":
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)), (256,)
    if name == "cnn32":  # few parameters, large activations: where chunking pays
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        ), (3, 32, 32)
    from digits import DigitsCNN  # noqa: PLC0415

    return DigitsCNN().net, (1, 8, 8)


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def ours(net, x, y, chunk_size=None):
    return per_sample_grads(net, ce, (x, y), chunk_size=chunk_size)


def floor(net, x, y):
    """The ordinary gradient of the batch mean, written out ``B`` times into fresh tensors of the per-sample shape:
    the forward and backward arithmetic and the output every method has, nothing per sample. loop / floor bounds
    the speed-up over the loop that any batched method can reach."""
    grads = torch.autograd.grad(ce(net, (x, y)), list(net.parameters()))
    return [g.expand(len(x), *g.shape).clone() for g in grads]


def loop(net, x, y):
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(ce(net, (x[i : i + 1], y[i : i + 1])), list(net.parameters()))
        out.append(grads)
    return [torch.stack(g) for g in zip(*out)]


def opacus_factory(net):
    from opacus import GradSampleModule  # noqa: PLC0415

    module = GradSampleModule(net)

    def run(_, x, y):
        module.zero_grad(set_to_none=True)
        for p in module.parameters():
            p.grad_sample = None
        F.cross_entropy(module(x), y).backward()
        return [p.grad_sample for p in module.parameters()]

    return run


def backpack_factory(net):
    from backpack import backpack, extend  # noqa: PLC0415
    from backpack.extensions import BatchGrad  # noqa: PLC0415

    module = extend(net)
    loss = extend(nn.CrossEntropyLoss())

    def run(_, x, y):
        module.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            loss(module(x), y).backward()
        return [p.grad_batch for p in module.parameters()]

    return run


def timing(repeats: int) -> None:
    print(f"## 1. Per-sample gradients, batch {B}, seconds (median of {repeats} interleaved repeats), 1 thread\n")
    print(
        "| model | ours (vmap) | Python loop | Opacus | BackPACK | floor: batch gradient + output | loop / ours | "
        "Opacus / ours | BackPACK / ours | loop / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        torch.manual_seed(0)
        net, shape = make(name)
        x, y = torch.randn(B, *shape), torch.randint(0, 10, (B,))
        methods = {
            "ours": ours,
            "loop": loop,
            "opacus": opacus_factory(make(name)[0]),
            "backpack": backpack_factory(make(name)[0]),
            "floor": floor,
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(repeats):
            for key, method in methods.items():
                start = time.perf_counter()
                method(net, x, y)
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        seconds = " | ".join(f"{med[k]:.4f}" for k in methods)
        ratios = " | ".join(f"{med[k] / med['ours']:.2f}" for k in ("loop", "opacus", "backpack"))
        print(f"| {name} | {seconds} | {ratios} | {med['loop'] / med['floor']:.1f} |")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, chunk: int) -> None:
    """Child process: peak resident-set growth (MiB) during one per-sample call (``chunk`` -1: unchunked)."""
    torch.manual_seed(0)
    net, shape = make(name)
    x, y = torch.randn(B, *shape), torch.randint(0, 10, (B,))
    ce(net, (x, y)).backward()  # warm up the allocator and autograd
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    before = _rss_kib("VmRSS")
    ours(net, x, y, None if chunk < 0 else chunk)
    print((_rss_kib("VmHWM") - before) / 1024)


def memory() -> None:
    print(f"\n## 2. Peak memory growth of one call, batch {B} (MiB, fresh process each)\n")
    print("| model | output size | unchunked | chunk_size=32 | chunk_size=8 |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        net, _ = make(name)
        size = B * sum(p.numel() for p in net.parameters()) * 4 / 2**20
        cells = []
        for chunk in [-1, 32, 8]:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(chunk)], capture_output=True, text=True
            )
            cells.append(f"{float(out.stdout.strip().splitlines()[-1]):.1f}")
        print(f"| {name} | {size:.1f} | " + " | ".join(cells) + " |")


def amortized(repeats: int) -> None:
    from _timing import overhead_ratios, quiet_trainer  # noqa: PLC0415
    from digits import DigitsCNN, digits_loaders  # noqa: PLC0415
    from kappa_overhead import Model, cnn  # noqa: PLC0415
    from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

    from lightning_lip import GradientNoiseEstimator  # noqa: PLC0415

    def random_images(steps: int) -> DataLoader:
        data = TensorDataset(torch.randn(B * steps, 3, 32, 32), torch.randint(0, 10, (B * steps,)))
        return DataLoader(data, batch_size=B)

    setups = [
        ("digits CNN, 3000 steps of batch 64", 3000, DigitsCNN, lambda: digits_loaders()[0], {}),
        ("digits CNN, 3000 steps of batch 64", 3000, DigitsCNN, lambda: digits_loaders()[0], {"every_n_steps": 100}),
        ("3-conv CNN on 3x32x32 (kappa_overhead.py), 600 steps of batch 128", 600, lambda: Model(cnn()), None, {}),
    ]
    print("\n## 3. Amortized overhead of GradientNoiseEstimator\n")
    print("| model | arguments | measurements | overhead (median) | pairs | self-timed |\n|---|---|---|---|---|---|")
    for label, steps, make_model, make_data, kwargs in setups:
        loader = make_data() if make_data else random_images(steps)
        made = []

        def make_callback() -> GradientNoiseEstimator:
            made.append(GradientNoiseEstimator(**kwargs))
            return made[-1]

        def fit(callbacks: list) -> None:
            quiet_trainer(max_steps=steps, callbacks=callbacks).fit(make_model(), loader)
            for c in callbacks:  # the callback's own time over the training time, as it counts them
                if isinstance(c, GradientNoiseEstimator):
                    c.self_timed = c.overhead

        ratios = overhead_ratios(fit, make_callback, repeats)
        print(
            f"| {label} | {kwargs or 'defaults'} | {statistics.median(c.n_runs for c in made):g} | "
            f"{100 * statistics.median(ratios):+.1f}% | {', '.join(f'{100 * r:+.1f}%' for r in ratios)} | "
            f"{100 * statistics.median(c.self_timed for c in made):.1f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-child", nargs=2)
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (the first repeat is a warm-up), got {args.repeats}")
    torch.set_num_threads(1)
    if args.memory_child:
        peak_memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    timing(args.repeats)
    memory()
    amortized(max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
