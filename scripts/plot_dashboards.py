"""Draw the dashboards of docs/monitoring.md and the picture of docs/choosing_weight_decay.md from real runs.

Three runs of ``examples/char_gpt.py`` with its defaults (a small GPT on Genesis and Exodus, 1,500 steps, a cosine
lr schedule from 3e-3 to 0, decoupled decay):

- "not acting" (the example as it ships): ``weight_decay=0.1``, so τ = 1/(lr·wd) is 3,333 steps at the peak lr and
  longer still as the lr falls: over the run the decay applies about a fifth of an e-fold, and the decay report says
  it did not act. The dashboard of docs/monitoring.md's broken case.
- "from the starting lr": ``--timescale-fraction 0.3 --no-hold-timescale``: wd = 1/(lr₀·0.3·T), computed once, so τ
  is 450 steps at the peak lr and lengthens as the lr falls. The decay acts and the norm levels off: the healthy
  dashboard.
- "held": ``--timescale-fraction 0.3``: τ held at 450 steps through the whole cosine schedule, wd ∝ 1/lr.

The figures are read back from the runs' TensorBoard event files and drawn with matplotlib in the layout of the
monitor's custom-scalars tab (one chart per metric, titled as the monitor titles it). A screenshot of TensorBoard
itself needs Chromium (``scripts/screenshot.py``); this needs nothing beyond the examples' environment. It also prints
each run's decay report, as the monitor shows it at the end of training, and its final validation loss.

Run from the repository root (about four minutes on a 2-core CPU)::

    .venv/bin/python scripts/plot_dashboards.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples import char_gpt  # noqa: E402
from lit_decay.diagnostics import report_text  # noqa: E402
from lit_decay.tensorboard import chart_title  # noqa: E402

RUNS = {
    "not acting": ([], "weight_decay=0.1 as given: τ = 1/(lr·wd) longer than the run"),
    "from the starting lr": (
        ["--timescale-fraction", "0.3", "--no-hold-timescale"],
        "timescale_fraction=0.3, hold_timescale=False: wd set once, τ = 0.3 of the run at the peak lr",
    ),
    "held": (["--timescale-fraction", "0.3"], "timescale_fraction=0.3: τ held at 0.3 of the run, wd ∝ 1/lr"),
}
DASHBOARDS = {"broken": "not acting", "healthy": "from the starting lr"}
CHARTS = ("weight_norm", "update_ratio", "effective_decay", "equilibrium", "weight_decay", "decay_progress")
COLORS = {"decay": "tab:blue", "no_decay": "tab:orange"}


def train(extra: list[str], logdir: Path, steps: int | None) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """One run of the example; its scalars by tag, and its decay report as the monitor showed it (with the final
    validation loss)."""
    argv = ["--logdir", str(logdir), *extra, *(["--steps", str(steps)] if steps else [])]
    run = char_gpt.prepare(char_gpt.parse_args(argv))
    run.trainer.enable_progress_bar = False
    run.fit()
    events = EventAccumulator(run.trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert run.monitor.report is not None
    loss = float(run.trainer.callback_metrics["val/loss"])
    return scalars, f"{report_text(run.monitor.report)}\nfinal validation loss {loss:.3f} nats per character"


def dashboard(scalars: dict[str, list[tuple[int, float]]], title: str, out: Path) -> None:
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.4), dpi=110)
    for axis, metric in zip(axes.flat, CHARTS):
        for group, color in COLORS.items():
            points = scalars.get(f"decay/{metric}/{group}")
            if points:
                axis.plot([s for s, _ in points], [v for _, v in points], color=color, label=group, linewidth=1.2)
        if metric in ("effective_decay", "weight_decay") and any(
            v > 0 for g in COLORS for _, v in scalars.get(f"decay/{metric}/{g}", [])
        ):
            axis.set_yscale("symlog", linthresh=1e-6 if metric == "effective_decay" else 1e-3)
        if metric == "equilibrium":
            axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        if metric == "decay_progress":
            axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        axis.set_title("\n".join(textwrap.wrap(chart_title(metric), 48)), fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.supxlabel("optimizer step", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    print(f"wrote {out}")


def comparison(runs: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110)
    colors = dict(zip(RUNS, ("tab:red", "tab:green", "tab:purple")))
    for name, (_, label) in RUNS.items():
        for axis, tag in zip(axes[:2], ("decay/weight_norm/decay", "val/loss")):
            points = runs[name][tag]
            axis.plot([s for s, _ in points], [v for _, v in points], color=colors[name], label=f"{name}: {label}")
    axes[0].set_title("weight_norm of the decay group", fontsize=9)
    axes[1].set_title("validation loss (nats per character)", fontsize=9)
    handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5)
    for name in ("from the starting lr", "held"):
        lr, wd = dict(runs[name]["lr-Adam/decay"]), runs[name]["decay/weight_decay/decay"]
        axes[2].plot([s for s, _ in wd], [v for _, v in wd], color=colors[name], label=f"weight_decay, {name}")
        axes[2].plot([s for s, v in wd if s in lr], [v * lr[s] for s, v in wd if s in lr], color=colors[name],
                     linestyle="--", label=f"lr·wd = 1/τ, {name}")  # fmt: skip
    lr = runs["held"]["lr-Adam/decay"]
    axes[2].plot([s for s, _ in lr], [v for _, v in lr], color="black", linewidth=0.8, label="lr (cosine schedule)")
    axes[2].set_yscale("log")
    axes[2].set_title("what the scheduler wrote", fontsize=9)
    axes[2].legend(fontsize=6.5)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("optimizer step", fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(out)
    plt.close(figure)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default: the example's)")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (extra, _)) in enumerate(RUNS.items()):
            runs[name], report = train(extra, Path(tmp) / str(index), args.steps)
            print(f"\n{name}:\n{report}\n")
    for picture, name in DASHBOARDS.items():
        dashboard(
            runs[name], f"{picture}: {RUNS[name][1]} (examples/char_gpt.py)", args.out_dir / f"dashboard_{picture}.png"
        )
    comparison(runs, args.out_dir / "timescale_fraction.png")


if __name__ == "__main__":
    main()
