"""Draw docs/img/schedules.png: the weight-decay schedule shapes of lit_decay.WeightDecayScheduler.

Run from the repository root: .venv/bin/python scripts/plot_schedules.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lit_decay.schedule import schedule_factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/img/schedules.png")
    args = parser.parse_args()
    total = 1000
    steps = range(total)
    base = 0.04
    panels = {
        "decreasing / constant (base wd 0.04)": {
            "constant": {"shape": "constant"},
            "linear 1→0": {"shape": "linear", "end_factor": 0.0},
            "cosine 1→0, 100 warmup steps": {"shape": "cosine", "end_factor": 0.0, "warmup_steps": 100},
        },
        "increasing (DINO-style 0.04 → 0.4)": {
            "cosine 1→10": {"shape": "cosine", "end_factor": 10.0},
            "linear 1→10": {"shape": "linear", "end_factor": 10.0},
        },
    }
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    for axis, (title, curves) in zip(axes, panels.items()):
        for label, options in curves.items():
            shape = options.pop("shape")
            axis.plot(steps, [base * schedule_factor(shape, s, total, **options) for s in steps], label=label)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("weight decay coefficient")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
