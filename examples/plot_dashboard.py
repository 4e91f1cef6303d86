"""Turn the TensorBoard event files of a run into one PNG dashboard of what lightning_lip measured.

    python examples/plot_dashboard.py runs/digits/version_0 [--out dashboard.png]

Panels: the network's Lipschitz bound and the per-layer operator norms (KappaBudgetProjection); lr * lambda_max
against the stability threshold (HessianEigenMonitor); the gradient-noise scale and the predicted vs observed
change of log K (GradientNoiseEstimator); scheduled vs effective learning rate (CurvatureLRController); and the
training loss. Panels whose tags the run does not have are left out.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

#: (title, y-scale, [(tag regex, label)])
PANELS = [
    ("Lipschitz bound (κ budget)", "log", [(r"lip/kappa/bound$", "∏ σ_l"), (r"lip/kappa/sigma/(.*)", "σ {}")]),
    (
        "Stability: lr·λ_max vs threshold",
        "linear",
        [(r"lip/hessian/eta_lambda_max$", "lr·λ_max"), (r"lip/hessian/threshold$", "threshold")],
    ),
    ("Hessian extreme eigenvalues", "linear", [(r"lip/hessian/lambda_(max|min)$", "λ_{}")]),
    ("Gradient noise scale B_noise", "log", [(r"lip/noise/scale$", "B_noise"), (r"lip/noise/trace$", "tr Σ")]),
    (
        "log K: predicted vs observed change",
        "linear",
        [(r"lip/noise/log_lipschitz_predicted$", "predicted"), (r"lip/noise/log_lipschitz_observed$", "observed")],
    ),
    ("Learning rate", "log", [(r"lip/lr/scheduled$", "scheduled"), (r"lip/lr/effective$", "effective")]),
    ("Training loss", "log", [(r"train.?loss.*", "training loss")]),
]


def load(logdir: Path) -> dict[str, tuple[list[int], list[float]]]:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


def dashboard(logdir: Path, out: Path) -> Path:
    scalars = load(logdir)
    panels = []
    for title, scale, series in PANELS:
        lines = []
        for pattern, label in series:
            for tag in sorted(scalars):
                match = re.fullmatch(pattern, tag)
                if match:
                    lines.append((label.format(*match.groups()) if match.groups() else label, *scalars[tag]))
        if lines:
            panels.append((title, scale, lines))
    if not panels:
        raise SystemExit(f"No lightning_lip scalars under {logdir}.")
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (title, scale, lines) in zip(axes.flat, panels):
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, lw=1.2, marker="." if len(steps) < 40 else None)
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"lightning_lip — {logdir}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    print(f"wrote {dashboard(args.logdir, args.out)}")


if __name__ == "__main__":
    main()
