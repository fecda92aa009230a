"""The five decay modes side by side on one over-fitting task: TensorBoard runs, a plot and a markdown report.

What it shows: the same model, data, seed, learning rate and number of steps trained under ``none``, ``l2``,
``decoupled``, ``l1`` and ``decoupled_l1`` (``lit_decay.configure_adam(mode=...)``), each run logged by
``lit_decay.WeightDecayMonitor`` to ``<logdir>/compare_modes/<mode>`` so TensorBoard overlays them. At the end it
writes ``<out-dir>/img/modes_comparison.png`` (validation accuracy and loss, the decay group's weight norm and, for the
L1 modes, its fraction of exact zeros, against the step) and ``<out-dir>/modes_comparison.md`` (the command, the
machine, a table per mode and what the numbers say). ``--logdir`` defaults to ``runs`` and ``--out-dir`` to
``<logdir>/compare_modes``, both git-ignored: a run never rewrites a tracked file unless told to.

The task over-fits on purpose, so that regularization has something to do: 100 training digits (10 per class) from
scikit-learn's bundled 8×8 digits, the other 1,697 for validation, and a wide MLP (64 → 512 → 10, ReLU, no
normalization layer, so decaying a weight changes the function rather than only the effective learning rate). The
decay group is the two Linear weights; the biases are not decayed.

Why each mode gets its own coefficient: one number means very different strengths across modes. ``decoupled`` shrinks
the weights by lr·wd per step whatever the gradient, so with lr = 1e-3 it needs wd of order 1 to act within 1,500
steps. ``l2`` and ``l1`` add wd·w or wd·sign(w) to the gradient *before* Adam divides by √v̂, and once the training
loss is near zero √v̂ is tiny, so the same wd acts about a thousand times harder (with wd = 0.01, ``l1`` pulls every
weight to zero and the model stops learning). The defaults (``l2`` 1e-3, ``decoupled`` 1, ``l1`` 3e-4,
``decoupled_l1`` 0.3) come from a coarse sweep (factors of about 3; a plain PyTorch loop with this model, data, lr and
step count), each the one with the lowest final validation loss. The report's table gives the per-step effective decay
each one produced (the monitor's ``effective_decay``), the measure of strength that compares across modes. Change
them with ``--weight-decay l2=3e-3 decoupled=2 ...``.

Run it from the repository root with the environment ``bash scripts/setup.sh`` made (``.venv/bin/python``, or
``python`` after ``source .venv/bin/activate``); about a minute on a 2-core CPU, and ``--fast`` is a few-second smoke
test::

    .venv/bin/python examples/compare_modes.py
    .venv/bin/tensorboard --logdir runs/compare_modes

The documentation's page and picture (docs/modes_comparison.md, docs/img/modes_comparison.png) are this report;
to regenerate them, name the docs folder::

    .venv/bin/python examples/compare_modes.py --out-dir docs
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import lit_decay

if __package__ in (None, ""):
    # Run as a script, Python puts examples/ on sys.path; the imports below need the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples._common import DigitsDataModule, print_tensorboard_hint, quiet_lightning

MODES = ("none", "l2", "decoupled", "l1", "decoupled_l1")
DEFAULT_WEIGHT_DECAY = {"none": 0.0, "l2": 1e-3, "decoupled": 1.0, "l1": 3e-4, "decoupled_l1": 0.3}
L1_MODES = ("l1", "decoupled_l1")


class WideMLP(L.LightningModule):
    """64 → ``hidden`` → 10 with ReLU; evaluates on the training set (dataloader 0) and the validation set (1)."""

    def __init__(self, mode: str, weight_decay: float, lr: float = 1e-3, hidden: int = 512) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.acc = nn.ModuleList([MulticlassAccuracy(num_classes=10, average="micro") for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int) -> None:
        x, y = batch
        logits = self(x)
        split = ("train_eval", "val")[dataloader_idx]
        self.acc[dataloader_idx](logits, y)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), add_dataloader_idx=False)
        self.log(f"{split}/acc", self.acc[dataloader_idx], add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lit_decay.configure_adam(
            self, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, mode=self.hparams.mode
        )


class MemoryLogger(Logger):
    """Keeps every logged scalar as ``{tag: [(step, value), ...]}``: the same figures TensorBoard receives."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.history[tag].append((int(step or 0), float(value)))

    def last(self, tag: str) -> float:
        return self.history[tag][-1][1] if self.history.get(tag) else float("nan")


@dataclass
class Result:
    mode: str
    weight_decay: float
    history: dict[str, list[tuple[int, float]]]
    final: dict[str, float] = field(default_factory=dict)


def train_one(mode: str, weight_decay: float, args: argparse.Namespace) -> Result:
    # The same seed before building the model and the data: every mode starts from the same weights and sees the
    # same batches in the same order.
    L.seed_everything(args.seed, workers=True, verbose=False)
    data = DigitsDataModule(
        batch_size=args.batch_size,
        train_size=args.train_size,
        seed=args.seed,
        evaluate_train=True,
        samples_per_epoch=args.steps * args.batch_size,
    )
    model = WideMLP(mode=mode, weight_decay=weight_decay, lr=args.lr, hidden=args.hidden)
    run_dir = Path(args.logdir) / "compare_modes" / mode
    # A rerun replaces the previous run of the mode, so that TensorBoard shows one curve per mode.
    shutil.rmtree(run_dir, ignore_errors=True)
    memory = MemoryLogger()
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=args.steps,
        accelerator="cpu",  # the report names the CPU; a model this small gains nothing from a GPU
        devices=1,
        logger=[TensorBoardLogger(args.logdir, name="compare_modes", version=mode, default_hp_metric=False), memory],
        callbacks=[lit_decay.WeightDecayMonitor(metrics=("weight_norm", "effective_decay", "sparsity"))],
        log_every_n_steps=args.log_every,
        val_check_interval=args.eval_every,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)

    decay_params = next(g["params"] for g in trainer.optimizers[0].param_groups if g["name"] == "decay")
    zeros = sum(int((p == 0).sum()) for p in decay_params)
    effective = [value for _, value in memory.history.get("decay/effective_decay/decay", [])]
    val_acc = [value for _, value in memory.history["val/acc"]]
    val_loss_step, val_loss_min = min(memory.history["val/loss"], key=lambda item: item[1])
    late = torch.tensor(val_acc[len(val_acc) // 2 :])
    final = {
        "val_acc": memory.last("val/acc"),
        "train_acc": memory.last("train_eval/acc"),
        "val_loss": memory.last("val/loss"),
        "train_loss": memory.last("train_eval/loss"),
        "weight_norm": float(torch.sqrt(sum(p.detach().double().square().sum() for p in decay_params))),
        "sparsity": zeros / sum(p.numel() for p in decay_params),
        # Within one Adam step (about lr) of zero: where L1 through Adam leaves the weights it cannot zero.
        "near_zero": sum(int((p.abs() <= args.lr).sum()) for p in decay_params) / sum(p.numel() for p in decay_params),
        "val_acc_std": float(late.std()) if len(late) > 1 else 0.0,
        "val_loss_min": val_loss_min,
        # Lightning logs an in-epoch validation one step before global_step reaches the check (49 for step 50).
        "val_loss_min_step": float(round(val_loss_step + 1, -1)),
        "decay_elements": float(sum(p.numel() for p in decay_params)),
        "effective_decay": sum(effective) / len(effective) if effective else 0.0,
        "train_images": float(len(data.train_set)),
        "val_images": float(len(data.val_set)),
    }
    return Result(mode, weight_decay, dict(memory.history), final)


# ---- report --------------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores available, torch set to {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}, "
        f"lit_decay {lit_decay.__version__}"
    )


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("val/acc", "validation accuracy", MODES),
        ("val/loss", "validation loss", MODES),
        ("decay/weight_norm/decay", "weight norm of the decay group", MODES),
        ("decay/sparsity/decay", "fraction of exact zeros (L1 modes)", L1_MODES),
    ]
    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (tag, title, modes) in zip(axes.flat, panels):
        for result in results:
            if result.mode in modes and result.history.get(tag):
                steps, values = zip(*result.history[tag])
                ax.plot(steps, values, color=colors[result.mode], label=f"{result.mode} (wd={result.weight_decay:g})")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lit_decay: decay modes on 100 training digits, MLP 64-512-10, Adam")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(results: list[Result]) -> str:
    """The "What the runs show" paragraphs: every figure in them is read from ``results``."""
    by_mode = {r.mode: r.final for r in results}
    base = by_mode["none"]
    n_val = int(base["val_images"])
    regularized = [r for r in results if r.mode != "none"]
    best_loss = min(regularized, key=lambda r: r.final["val_loss"])
    accs = [r.final["val_acc"] for r in results]
    spread = max(accs) - min(accs)
    best_acc = max(results, key=lambda r: r.final["val_acc"])
    wobble = max(r.final["val_acc_std"] for r in results)
    lower_loss = [r.mode for r in regularized if r.final["val_loss"] < base["val_loss"]]
    smaller_acc_gap = [
        r.mode for r in regularized if r.final["train_acc"] - r.final["val_acc"] < base["train_acc"] - base["val_acc"]
    ]
    smaller_loss_gap = [
        r.mode
        for r in regularized
        if r.final["val_loss"] - r.final["train_loss"] < base["val_loss"] - base["train_loss"]
    ]

    def modes(names: list[str], verb: str, verb_plural: str) -> str:
        if not names:
            return f"no mode {verb}"
        return f"{', '.join(names)} {verb if len(names) == 1 else verb_plural}"

    if base["val_loss"] > 1.05 * base["val_loss_min"]:
        base_loss = (
            f"its validation loss bottoms out at {base['val_loss_min']:.3f} around step "
            f"{base['val_loss_min_step']:.0f} "
            f"and climbs back to {base['val_loss']:.3f} by the end, while its decay-group weight norm keeps growing "
            f"(to {base['weight_norm']:.1f})"
        )
    else:
        base_loss = (
            f"its validation loss ends at {base['val_loss']:.3f} and its weight norm at {base['weight_norm']:.1f}"
        )
    sentences = [
        f"Without decay the network fits its {int(base['train_images'])} training digits (train accuracy "
        f"{base['train_acc']:.3f}, train loss {base['train_loss']:.3f}) and reaches {base['val_acc']:.3f} validation "
        f"accuracy; {base_loss}.",
        f"Final validation accuracy spans {min(accs):.3f} to {max(accs):.3f} across the five modes "
        f"({round(spread * n_val)} of {n_val} images; highest: {best_acc.mode}), while within a run it fluctuates "
        f"by up to ±{wobble:.3f} from one evaluation to the next (standard deviation over the last half of the "
        "evaluations).",
        f"Compared with no decay, {modes(lower_loss, 'ends', 'end')} with a lower validation loss (lowest: "
        f"{best_loss.mode}, {best_loss.final['val_loss']:.3f} against {base['val_loss']:.3f}); "
        f"{modes(smaller_loss_gap, 'narrows', 'narrow')} the loss gap (val − train); "
        f"{modes(smaller_acc_gap, 'narrows', 'narrow')} the accuracy gap (train − val).",
        "Final decay-group weight norms: "
        + ", ".join(f"{r.mode} {r.final['weight_norm']:.1f}" for r in results)
        + ". Exact zeros in the decay group: "
        + ", ".join(f"{r.mode} {r.final['sparsity']:.1%}" for r in results if r.mode in L1_MODES)
        + (
            " (the other modes have none)."
            if all(r.final["sparsity"] == 0 for r in results if r.mode not in L1_MODES)
            else "."
        ),
    ]
    # The reading of those figures: each sentence is only written when the figures above support it.
    reading = []
    loss_gain = 1 - best_loss.final["val_loss"] / base["val_loss"]
    highest = "no decay" if best_acc.mode == "none" else best_acc.mode
    if spread <= 2 * wobble:
        reading.append(
            "On this task decay hardly moves accuracy: the differences between modes are of the size of one run's "
            "own fluctuation."
        )
    elif spread <= 0.02:
        reading.append(
            f"On this task decay does not buy accuracy: the modes end within {100 * spread:.1f} points of each other "
            f"({round(spread * n_val)} images), and {highest} ends highest."
        )
    else:
        reading.append(f"The modes end {spread:.1%} apart in accuracy, and {highest} ends highest.")
    if spread <= 0.02 and loss_gain >= 0.05:
        reading.append(
            "What decay changes is the size of the weights and the validation loss, the cross-entropy that grows "
            f"with over-confident mistakes: {best_loss.mode} ends {loss_gain:.0%} lower than no decay."
        )
    if base["val_loss_min"] <= 1.03 * best_loss.final["val_loss"]:
        reading.append(
            f"Stopping the undecayed run at its best step (validation loss {base['val_loss_min']:.3f}) would have done "
            "about as well on that measure as decay does at the end."
        )
    l1, prox = by_mode["l1"], by_mode["decoupled_l1"]
    if prox["sparsity"] > 0.1 and l1["sparsity"] < 0.01 and l1["near_zero"] > 0.1:
        reading.append(
            f"Only the proximal update (decoupled_l1) produces exact zeros. The l1 gradient term goes through Adam's "
            f"normalisation, so small weights hover around zero instead of landing on it: {l1['near_zero']:.0%} of "
            f"l1's decayed weights end within ±lr of zero (no decay: {base['near_zero']:.0%}), none at zero."
        )
    if prox["sparsity"] > 0.5:
        reading.append(
            f"decoupled_l1 zeroes {prox['sparsity']:.0%} of the decayed weights and still reaches "
            f"{prox['val_acc']:.3f} validation accuracy (no decay: {base['val_acc']:.3f})."
        )
    reading.append(
        "This is one seed and one coefficient per mode (the script's docstring says how they were chosen); other "
        "seeds and coefficients move these figures."
    )
    return " ".join(sentences) + "\n\n" + " ".join(reading)


def write_report(results: list[Result], args: argparse.Namespace, seconds: float, out_dir: Path) -> Path:
    image = out_dir / "img" / "modes_comparison.png"
    plot(results, image)
    first = results[0].final
    lines = [
        "# Decay modes compared",
        "",
        "Generated by `examples/compare_modes.py`; rerun it to reproduce. Command:",
        "",
        "```bash",
        args.command,
        "```",
        "",
        f"Machine: {machine()}. Wall time for the five runs: {seconds:.0f} s.",
        "",
        f"Setup: {int(first['train_images'])} training and {int(first['val_images'])} validation images of "
        f"scikit-learn's 8×8 digits; MLP 64 → {args.hidden} → 10 (ReLU); Adam (fused), lr {args.lr:g}, batch "
        f"{args.batch_size}, {args.steps} steps, seed {args.seed}, the same initial weights and batches for every "
        f"mode. The decay group is the two Linear weights ({int(first['decay_elements']):,} elements); biases are "
        "not decayed. Accuracy and loss are measured in eval mode on the whole training and validation sets.",
        "",
        f"![Validation accuracy, validation loss, weight norm and sparsity per mode]({image.relative_to(out_dir)})",
        "",
        "| mode | wd | val acc | train acc | acc gap (train − val) | val loss | train loss | loss gap (val − train) "
        "| weight norm (decay group) | exact zeros (decay group) | mean effective decay per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f = r.final
        lines.append(
            f"| {r.mode} | {r.weight_decay:g} | {f['val_acc']:.3f} | {f['train_acc']:.3f} | "
            f"{f['train_acc'] - f['val_acc']:.3f} | {f['val_loss']:.3f} | {f['train_loss']:.3f} | "
            f"{f['val_loss'] - f['train_loss']:.3f} | {f['weight_norm']:.2f} | {f['sparsity']:.1%} | "
            f"{f['effective_decay']:.2e} |"
        )
    lines += [
        "",
        "Effective decay is the fraction of the decay group's weight norm the penalty removes per step (see "
        "[Decay modes](modes.md#5-effective-decay-and-its-timescale)), averaged over the logged steps: it is how "
        "strong each coefficient actually was.",
        "",
        "## What the runs show",
        "",
        findings(results),
        "",
    ]
    report = out_dir / "modes_comparison.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# ---- command line --------------------------------------------------------------------------------------------------


def parse_weight_decay(items: list[str]) -> dict[str, float]:
    chosen = dict(DEFAULT_WEIGHT_DECAY)
    for item in items:
        mode, sep, value = item.partition("=")
        if not sep or mode not in MODES or mode == "none":
            raise SystemExit(f"--weight-decay takes MODE=VALUE with MODE in {', '.join(MODES[1:])}; got {item!r}")
        chosen[mode] = float(value)
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=100, help="training images (the rest validate)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", nargs="*", default=[], metavar="MODE=VALUE", help="override a default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--log-every", type=int, default=10, help="steps between logged figures")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root folder (default: %(default)s)")
    parser.add_argument(
        "--out-dir",
        help="where the .md report and img/ plot go (default: LOGDIR/compare_modes; the docs' copy: --out-dir docs)",
    )
    parser.add_argument("--fast", action="store_true", help="a few-second smoke run (30 steps per mode)")
    args = parser.parse_args(argv)
    # The report shows the command that reproduces it, also when main() is called with its own argv.
    given = sys.argv[1:] if argv is None else argv
    args.command = shlex.join([".venv/bin/python", "examples/compare_modes.py", *given])
    args.weight_decay = parse_weight_decay(args.weight_decay)
    if args.out_dir is None:
        args.out_dir = str(Path(args.logdir) / "compare_modes")
    if args.fast:
        args.steps, args.eval_every, args.log_every = 30, 10, 5
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    quiet_lightning()
    # A model this small runs fastest on one CPU thread: more only add synchronisation, a lot on a busy machine.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    for mode in MODES:
        result = train_one(mode, args.weight_decay[mode], args)
        f = result.final
        print(
            f"{mode:>13}  wd={result.weight_decay:<7g} val acc {f['val_acc']:.3f}  val loss {f['val_loss']:.3f}  "
            f"train loss {f['train_loss']:.3f}  weight norm {f['weight_norm']:.2f}  zeros {f['sparsity']:.1%}"
        )
        results.append(result)
    report = write_report(results, args, time.perf_counter() - start, Path(args.out_dir))
    print(f"\nWrote {report} and {Path(args.out_dir) / 'img' / 'modes_comparison.png'}")
    print_tensorboard_hint(args.logdir)
    return results


if __name__ == "__main__":
    main()
