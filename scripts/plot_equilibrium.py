"""Draw docs/img/equilibrium.png: the monitor's ``equilibrium`` figure in a real run of the quickstart.

The quickstart's MLP is Linear → BatchNorm1d → ReLU → Linear. The first Linear's weights are followed by a
normalization, so their scale does not matter and, under AdamW, their relative update settles at the rotational
equilibrium √(2·η·λ·(1−β₁)/(1+β₁)) (Kosson, Messmer & Jaggi, ICML 2024): ``equilibrium`` → 1 after a few decay
timescales τ = 1/(η·λ). The classifier head is not normalized, and its figure stays away from 1. The monitor logs
``equilibrium`` per group (the quickstart's ``decay`` group holds both tensors); per tensor it logs ``update_ratio``,
which this script divides by the prediction.

Run from the repository root (a minute or two on a 2-core CPU); the picture in the docs is of 40 epochs, twice
the quickstart's run, so that several timescales pass: .venv/bin/python scripts/plot_equilibrium.py --epochs 40
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import CSVLogger

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lit_decay
from examples._common import DigitsDataModule, quiet_lightning
from examples.quickstart import DigitClassifier, parse_args
from lit_decay.diagnostics import equilibrium_update_ratio

TENSORS = {
    "model.net.0.weight": "Linear followed by BatchNorm (scale-invariant)",
    "model.net.3.weight": "classifier head (not normalized)",
}


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def train(lr: float, weight_decay: float, epochs: int, log_dir: Path) -> dict[str, dict[int, float]]:
    """The quickstart's run, with every step's per-tensor figures logged to a CSV file; its columns by step."""
    quiet_lightning()
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=CSVLogger(log_dir, name="equilibrium"),
        callbacks=[lit_decay.WeightDecayMonitor(log_every_n_steps=1, per_parameter=True, audit=False)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitClassifier(lr=lr, weight_decay=weight_decay), datamodule=DigitsDataModule(batch_size=64, seed=0))
    columns: dict[str, dict[int, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key.startswith("decay/") and value != "":
                    columns.setdefault(key, {})[int(row["step"])] = float(value)
    return columns


def main() -> None:
    defaults = parse_args([])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/equilibrium.png")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        columns = train(args.lr, args.weight_decay, args.epochs, Path(tmp))
    tau = 1.0 / (args.lr * args.weight_decay)
    # constant lr and wd, Adam's default β₁ = 0.9: one prediction for every step
    predicted = equilibrium_update_ratio(args.lr, args.weight_decay, beta1=0.9)
    figure, axis = plt.subplots(figsize=(8, 3.6), dpi=120)
    for (name, label), color in zip(TENSORS.items(), ("tab:blue", "tab:orange")):
        series = columns[f"decay/update_ratio/decay/{name}"]
        steps = sorted(series)
        values = [series[s] / predicted for s in steps]
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axis.plot(steps, moving_average(values, 20), color=color, label=f"{name}: {label}")
        late = values[len(values) // 2 :]
        print(f"{name}: mean equilibrium over the second half of the run {sum(late) / len(late):.3f}")
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for k in range(1, int(max(steps) / tau) + 1):
        axis.axvline(k * tau, color="grey", linewidth=0.6, linestyle=":")
    axis.set_ylim(0, 2.5)
    axis.set_xlabel(f"optimizer step (dotted lines: multiples of τ = 1/(lr·wd) = {tau:.0f} steps)")
    axis.set_ylabel("equilibrium = update_ratio / prediction")
    axis.set_title(f"quickstart, AdamW-style decay, lr={args.lr:g}, weight_decay={args.weight_decay:g}", fontsize=9)
    axis.legend(fontsize=8, loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
