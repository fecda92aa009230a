"""What WeightDecayMonitor costs: one logging step against one fused Adam step, the overhead amortised over a real
``Trainer.fit``, and the usual per-parameter ``p.norm().item()`` loop as the peer.

Run from the repository root::

    python benchmarks/bench_monitor.py                  # full run: a 50M-parameter model (minutes)
    python benchmarks/bench_monitor.py --params 50M --output docs/bench_monitor.md
    python benchmarks/bench_monitor.py --shapes gpt2-small,1b --device cuda   # many tensors only (logging step)
    python benchmarks/bench_monitor.py --smoke          # seconds; what the tests run

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import _timing as tm
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay.stats import StepStatistics

MODES = ("decoupled", "l2", "l1", "decoupled_l1")
REFERENCE = "fused AdamW step (reference)"
CONTROL = "fused AdamW step (A vs A)"
PEER = "per-parameter p.norm().item() loop (peer)"
# The targets for a logging step's statistics, as a multiple of one fused Adam step: the synthetic model of
# 50M parameters on a CPU, and per shape set (sets not listed have no target, "—"). None was set for a GPU yet.
TARGET = {"cpu": 3.0}
SHAPE_TARGETS = {"100x131072": 3.0}
DEFAULT_SHAPES = "200x4096,100x131072"
SMOKE_SHAPES = "20x64"
TARGET_AMORTISED_PERCENT = 1.0


# --forms: the statistics' pass as the device runs it by default (auto), or forced eager or compiled
# (LIT_DECAY_COMPILE=0 / 1): the GPU check times both, first call (compile included) and steady state.
FORMS = {"auto": None, "eager": "0", "compiled": "1"}


def monitor_label(mode: str, form: str = "auto") -> str:
    return f"logging step (armed optimizer step), {mode}" + ("" if form == "auto" else f", {form}")


def step_label(mode: str) -> str:
    return f"optimizer step, {mode}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    tm.add_timing_arguments(parser)
    parser.add_argument("--params", type=tm.parse_count, default=None, help="model size (default 50M)")
    parser.add_argument(
        "--shapes",
        type=tm.parse_shape_sets,
        default=None,
        help=f"many-tensor shape sets for the logging-step table: NxM (N matrices of M elements), gpt2-small, 1b,\n"
        f"or none; default {DEFAULT_SHAPES}. Given without --params, only their logging-step tables are measured",
    )
    parser.add_argument("--parts", default="step,run", help="which tables: step (one logging step), run (Trainer.fit)")
    parser.add_argument(
        "--forms",
        default="auto",
        help="statistics forms of the logging-step rows: auto (the device's default), eager, compiled (comma list)",
    )
    parser.add_argument("--interval", type=int, default=50, help="log every this many steps in the fit (default 50)")
    parser.add_argument("--run-steps", type=int, default=None, help="timed training steps per fit (default 100)")
    parser.add_argument("--run-warmup", type=int, default=None, help="untimed steps at the start of a fit (default 5)")
    parser.add_argument("--run-repeats", type=int, default=None, help="fits with and without the monitor (default 3)")
    parser.add_argument("--run-mode", default="decoupled", choices=MODES, help="configure_adam mode of the fits")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the fits (a cheap forward)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    args = parser.parse_args(argv)
    if args.smoke and args.interval == 50:
        args.interval = 3
    shapes_only = args.shapes is not None and args.params is None
    tm.fill_defaults(
        args,
        {
            "params": 50_000_000,
            "run_steps": 100,
            "run_warmup": 5,
            "run_repeats": 3,
            "shapes": tm.parse_shape_sets(DEFAULT_SHAPES),
        },
        {
            "params": 20_000,
            "run_steps": 6,
            "run_warmup": 2,
            "run_repeats": 1,
            "shapes": tm.parse_shape_sets(SMOKE_SHAPES),
        },
    )
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not args.forms or set(args.forms) - set(FORMS):
        parser.error(f"--forms takes {', '.join(FORMS)}; got {args.forms}")
    if not args.parts or set(args.parts) - {"step", "run"}:
        parser.error(f"--parts takes step and/or run; got {args.parts}")
    if shapes_only:
        # The Trainer.fit part needs a forward pass, which only the synthetic model has: many tensors are measured
        # by their logging-step table alone.
        args.params = None
        args.parts = [part for part in args.parts if part != "run"]
        if not args.parts:
            parser.error("--parts run needs --params (the fits train the synthetic model)")
    for key in ("rebuilds", "repetitions", "warmup", "interval", "run_steps", "run_repeats", "batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.run_warmup < 1:
        parser.error("--run-warmup must be at least 1 (the first step allocates Adam's state)")
    return args


# ---- (a) and (c): one logging step against one optimizer step --------------------------------------------------------


@contextlib.contextmanager
def compile_setting(value: str | None) -> Iterator[None]:
    """LIT_DECAY_COMPILE set to ``value`` (None: as it is) while the statistics run: read at every call."""
    if value is None:
        yield
        return
    previous = os.environ.get("LIT_DECAY_COMPILE")
    os.environ["LIT_DECAY_COMPILE"] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LIT_DECAY_COMPILE"]
        else:
            os.environ["LIT_DECAY_COMPILE"] = previous


def per_parameter_loop(model: torch.nn.Module) -> list[float]:
    """The usual hand-written norm logger: one host sync per weight and per gradient."""
    values = []
    for param in model.parameters():
        values.append(param.detach().norm().item())
        if param.grad is not None:
            values.append(param.grad.norm().item())
    return values


def step_candidates(
    args: argparse.Namespace, device: torch.device, workload: tm.Workload, shared: bool, rebuild: int
) -> list[tm.Candidate]:
    seed = args.seed * 1000 + rebuild
    common = None
    if shared:
        common = workload.build(device, seed)
        tm.fill_gradients(common, seed=seed)

    def model() -> torch.nn.Module:
        if common is not None:
            return common
        fresh = workload.build(device, seed)
        tm.fill_gradients(fresh, seed=seed)
        return fresh

    wd, lr = args.weight_decay, args.lr

    def fused_adamw(name: str) -> tm.Candidate:
        groups = lit_decay.param_groups(model(), weight_decay=wd, mode="decoupled")
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        return tm.Candidate(name, optimizer.step, "optimizer.step()")

    def monitor(mode: str, form: str) -> tm.Candidate:
        optimizer = lit_decay.configure_adam(model(), lr=lr, weight_decay=wd, mode=mode, verbose=False)
        # The monitor reads Adam's state, so the optimizer has stepped once (as on any logging step but the first).
        optimizer.step()
        # Hooked as WeightDecayMonitor hooks it: the figures are taken inside the step (decoupled_l1 groups just
        # before their proximal step), so the sample is the whole armed step; the plain step is timed alongside.
        statistics_ = StepStatistics([optimizer])
        statistics_.attach()

        def logging_step() -> None:
            with compile_setting(FORMS[form]):
                statistics_.arm()
                optimizer.step()
                statistics_.collect()

        return tm.Candidate(monitor_label(mode, form), logging_step, "arm + optimizer.step() + collect")

    def plain(mode: str) -> tm.Candidate:
        optimizer = lit_decay.configure_adam(model(), lr=lr, weight_decay=wd, mode=mode, verbose=False)
        return tm.Candidate(step_label(mode), optimizer.step, "optimizer.step()")

    def peer() -> tm.Candidate:
        net = model()
        return tm.Candidate(PEER, lambda: per_parameter_loop(net), "2 .item() per parameter")

    builders = [
        lambda: fused_adamw(REFERENCE),
        lambda: fused_adamw(CONTROL),
        *(lambda mode=mode, form=form: monitor(mode, form) for mode in MODES for form in args.forms),
        *(lambda mode=mode: plain(mode) for mode in MODES),
        peer,
    ]
    return tm.build_rotated(builders, rebuild)


def monitor_target(workload: tm.Workload, device: torch.device) -> float | None:
    """The limit on a logging step's extra cost, in fused Adam steps: per device for the synthetic model, per shape
    set for many tensors (None where the issue sets none)."""
    if workload.shape_set is not None:
        return SHAPE_TARGETS.get(workload.shape_set)
    return TARGET.get(device.type) if 0.9 * 50_000_000 <= workload.count <= 1.1 * 50_000_000 else None


def step_table(
    args: argparse.Namespace, device: torch.device, report: tm.Report, workload: tm.Workload
) -> dict[str, float]:
    """Print the logging-step table of one workload; return each candidate's fastest sample in ms."""
    count = workload.count
    n_candidates = 3 + (1 + len(args.forms)) * len(MODES)
    shared = args.share_params == "yes"
    if args.share_params == "auto":
        available = tm.available_memory(device)
        shared = bool(available) and n_candidates * 16 * count > 0.6 * available
    tm.progress(f"logging step, {workload.describe}")
    samples = tm.time_candidates(
        args, lambda rebuild: step_candidates(args, device, workload, shared, rebuild), device, REFERENCE
    )
    summaries = tm.summarise(samples)
    by_name = {s.name: s for s in summaries}
    peer_ms = by_name[PEER].median_ms
    limit = monitor_target(workload, device)
    rows = []
    for s in summaries:
        cells = tm.summary_cells(s)
        rows.append([*cells[:-1], tm.ratio(s.median_ms / peer_ms) if peer_ms > 0 else "—", cells[-1]])
    # What the monitor adds to a step: the armed step minus the same optimizer's plain step, in fused AdamW steps.
    cost_rows = []
    for mode, form in ((mode, form) for mode in MODES for form in args.forms):
        armed, plain_step = by_name[monitor_label(mode, form)], by_name[step_label(mode)]
        extra = armed.ratio - plain_step.ratio
        extra_low = armed.ratio_low - plain_step.ratio_high
        extra_high = armed.ratio_high - plain_step.ratio_low
        cost_rows.append(
            [
                mode if form == "auto" else f"{mode}, {form}",
                tm.ms(armed.median_ms - plain_step.median_ms),
                f"{extra:.2f}×",
                f"{extra_low:.2f}×–{extra_high:.2f}×",
                f"{(armed.median_ms - plain_step.median_ms) / peer_ms:.2f}×" if peer_ms > 0 else "—",
                "—" if limit is None else f"≤ {limit:.1f}×: {'yes' if extra <= limit else 'NO'}",
            ]
        )
    cost_table = tm.markdown_table(
        ["mode", "extra ms (medians)", "extra × fused step", "per rebuild (bounds)", "× peer", "target"], cost_rows
    )
    table = tm.markdown_table(
        [
            "candidate",
            "work",
            "median ms",
            "min ms",
            "× fused step",
            "× fused step per rebuild",
            "× peer",
            "first call ms",
        ],
        rows,
    )
    if workload.shape_set is None:
        title = f"{tm.format_count(count)} parameters"
    else:
        title = f"{workload.label}: {workload.tensors} tensors, {tm.format_count(count)} parameters"
    report.add(
        "\n".join(
            [
                f"### One logging step against one fused Adam step ({title})",
                "",
                "WeightDecayMonitor measures during the optimizer's step (a lit_decay.Adam right after torch's "
                "arithmetic, before the mode's after-step transform), so a logging step is timed as "
                "`StepStatistics.arm()` + `optimizer.step()` + `collect()` (all metrics, one device-to-host "
                "transfer) on an optimizer built by "
                "`configure_adam(mode=...)` with the statistics attached, next to the plain `optimizer.step()` of an "
                "identical optimizer; the monitor's cost is the difference. Reference: one `optimizer.step()` of a "
                "hand-built `torch.optim.AdamW(param_groups(...), fused=True)` over the same groups. Peer: the usual "
                "hand-written logger, `p.norm().item()` and `p.grad.norm().item()` for every parameter (norms only; "
                "the monitor also gives update ratio, effective decay, timescale and sparsity). "
                + (
                    (f"Target: a logging step's extra cost ≤ {limit}× a fused step." if limit else "No target here.")
                    if workload.shape_set is None
                    else "Many tensors: a model of exactly these tensors, grouped by the same rules (matrices decayed, "
                    "biases and norms not); "
                    + (f"target: a logging step's extra cost ≤ {limit}× a fused step." if limit else "no target.")
                ),
                "",
                table,
                "",
                "What a logging step adds (armed step − plain step of the same mode):",
                "",
                cost_table,
                *(["", "The candidates shared one set of weights and gradients (memory)."] if shared else []),
            ]
        )
    )
    # The fastest samples: the table and the fits run at different times, and on a loaded machine the fastest
    # sample of each is what is comparable between them.
    return {s.name: s.min_ms for s in summaries}


# ---- (b): the overhead amortised over a Trainer.fit ------------------------------------------------------------------


class BenchModule(L.LightningModule):
    """The synthetic model trained on regression targets; the optimizer is configure_adam's."""

    def __init__(self, args: argparse.Namespace, device: torch.device, seed: int) -> None:
        super().__init__()
        self.net = tm.build_model(args.params, device, seed=seed)
        self.lr, self.weight_decay, self.mode = args.lr, args.weight_decay, args.run_mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, lr=self.lr, weight_decay=self.weight_decay, mode=self.mode)


class StepTimer(L.Callback):
    """The duration of every step from batch ``first`` to ``last``, end of batch to end of batch (loading included).

    Placed after the monitor in the callback list, so a logging step's collect and log calls fall in its step. On
    CUDA it records events and reads them once at the end: no per-step synchronisation changes what is measured.
    """

    def __init__(self, first: int, last: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, last, device
        self.marks: list[Any] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.first - 1 <= batch_idx <= self.last:
            if self.device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append(event)
            else:
                self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds of each step of the window, in batch order."""
        if len(self.marks) != self.last - self.first + 2:
            raise RuntimeError(f"the fit ended before batch {self.last}; the timing window is incomplete")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def logged_steps(log_dir: str, prefix: str = "decay/") -> list[int]:
    """The steps at which the CSV logger received the monitor's figures."""
    steps = set()
    for path in Path(log_dir).rglob("metrics.csv"):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if any(key.startswith(prefix) and value != "" for key, value in row.items()):
                    steps.add(int(row["step"]))
    return sorted(steps)


def fit_once(
    args: argparse.Namespace, device: torch.device, *, with_monitor: bool, seed: int, steps: int, timed: tuple[int, int]
) -> tuple[list[float], list[int]]:
    """One ``Trainer.fit`` of ``steps`` steps: the seconds of each step of the ``timed`` batch window, and the steps
    at which the monitor's figures reached the logger."""
    width = tm.model_shape(args.params)[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * args.batch, width, generator=generator)
    y = torch.randn(steps * args.batch, width, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False, num_workers=0)
    timer = StepTimer(timed[0], timed[1], device)
    callbacks: list[L.Callback] = [lit_decay.WeightDecayMonitor()] if with_monitor else []
    callbacks.append(timer)
    with tempfile.TemporaryDirectory(prefix="lit_decay_bench_") as log_dir:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=steps,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=args.interval,
            logger=CSVLogger(log_dir, name="bench"),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(BenchModule(args, device, seed), train_dataloaders=loader)
        logged = logged_steps(log_dir)
    return timer.durations(), logged


def percent(value: float) -> str:
    return "—" if value != value else f"{value * 100:+.2f}%"


def target_met(value: float) -> str:
    if value != value:
        return ""
    return f"≤ {TARGET_AMORTISED_PERCENT:.0f}%: {'yes' if value * 100 <= TARGET_AMORTISED_PERCENT else 'NO'}"


def run_table(
    args: argparse.Namespace, device: torch.device, report: tm.Report, logging_ms: dict[str, float] | None
) -> None:
    count = tm.model_numel(args.params)
    total = args.run_warmup + args.run_steps
    first, last = args.run_warmup, total - 1
    # Batches whose step logs: Lightning's count of stepped batches + 1 is a multiple of the interval.
    logging = {i - first for i in range(first, last + 1) if (i + 1) % args.interval == 0}
    tm.progress("fit warm-up: compiling the monitor's kernels and the mode's (once per process)")
    started = time.perf_counter()
    warm = argparse.Namespace(**{**vars(args), "interval": 1})
    fit_once(warm, device, with_monitor=True, seed=args.seed, steps=2, timed=(1, 1))
    warmup_s = time.perf_counter() - started
    without: list[list[float]] = []
    with_: list[list[float]] = []
    logged: list[int] = []
    for repeat in range(args.run_repeats):
        order = [False, True] if repeat % 2 == 0 else [True, False]
        for with_monitor in order:
            tm.progress(f"fit {repeat + 1}/{args.run_repeats} {'with' if with_monitor else 'without'} the monitor")
            durations, steps_logged = fit_once(
                args, device, with_monitor=with_monitor, seed=args.seed + repeat, steps=total, timed=(first, last)
            )
            (with_ if with_monitor else without).append(durations)
            if with_monitor:
                logged = steps_logged
    median = statistics.median
    mean = statistics.fmean
    # Per pair of fits: the whole-run difference, and the extra time of the logging steps inside the monitored run
    # over that run's typical (median non-logging) step, which a load spike elsewhere in the run does not move.
    whole, inside, quiet_ratio, logging_steps = [], [], [], []
    for plain, monitored in zip(without, with_):
        quiet = [d for i, d in enumerate(monitored) if i not in logging] or monitored
        typical = median(quiet)
        whole.append(mean(monitored) / mean(plain) - 1)
        extra = sum(monitored[i] - typical for i in logging)
        inside.append(extra / (len(monitored) * typical))
        quiet_ratio.append(typical / median(plain))
        logging_steps.extend(monitored[i] for i in logging)
    runs = tm.markdown_table(
        ["run", "mean ms per step", "median ms per step", "ms per logging step"],
        [
            [
                "without the monitor (reference)",
                tm.ms(median([mean(d) for d in without]) * 1e3),
                tm.ms(median([median(d) for d in without]) * 1e3),
                "—",
            ],
            [
                f"with WeightDecayMonitor (every {args.interval} steps)",
                tm.ms(median([mean(d) for d in with_]) * 1e3),
                tm.ms(median([median(d) for d in with_]) * 1e3),
                tm.ms(median(logging_steps) * 1e3) if logging_steps else "—",
            ],
        ],
    )
    rows = [
        [
            "whole fits: mean step with / without − 1",
            f"{percent(median(whole))} (per pair: {', '.join(percent(w) for w in whole)})",
            target_met(median(whole)),
        ],
        [
            "logging steps in the monitored fits: their extra time over a typical step / run time",
            f"{percent(median(inside)) if logging else '—'} (per fit: {', '.join(percent(v) for v in inside)})",
            target_met(median(inside)) if logging else "",
        ],
    ]
    armed, plain_step = monitor_label(args.run_mode), step_label(args.run_mode)
    fastest_step = min(median(d) for d in without)
    if logging_ms and armed in logging_ms and plain_step in logging_ms:
        extra_ms = max(0.0, logging_ms[armed] - logging_ms[plain_step])
        implied = extra_ms / 1e3 / (args.interval * fastest_step)
        rows.append(
            [
                f"logging-step table: fastest armed step − fastest plain step, {tm.ms(extra_ms)} ms / "
                f"({args.interval} × fastest fit's median step without, {tm.ms(fastest_step * 1e3)} ms)",
                percent(implied),
                target_met(implied),
            ]
        )
        if PEER in logging_ms:
            rows.append(
                [
                    f"the per-parameter peer, same interval: {tm.ms(logging_ms[PEER])} ms / ({args.interval} × "
                    f"{tm.ms(fastest_step * 1e3)} ms)",
                    percent(logging_ms[PEER] / 1e3 / (args.interval * fastest_step)),
                    "",
                ]
            )
    report.add(
        "\n".join(
            [
                f"### Overhead amortised over a run ({tm.format_count(count)} parameters, mode {args.run_mode})",
                "",
                f"Each sample is one `Trainer.fit` (CSVLogger, batch {args.batch}, {total} steps, "
                f"log_every_n_steps={args.interval}); every step from step {first + 1} to {total} is timed, end of "
                f"batch to end of batch: {len(logging)} of them are logging steps. Fits with and without the monitor "
                f"alternate ({args.run_repeats} of each, each on a freshly built model). The monitor logged at steps "
                f"{', '.join(map(str, logged)) or 'none'} of the last fit. Non-logging steps of the monitored fits "
                f"took {tm.ratio(median(quiet_ratio))} the steps of the plain fits (median; the monitor does no work "
                f"on them). The warm-up fit before them (compiling lit_decay's kernels) took {warmup_s:.1f} s.",
                "",
                runs,
                "",
                tm.markdown_table(["overhead estimate", "overhead", "target"], rows),
                "",
                "The first estimate is the direct one but moves with any load on the machine; the second and third "
                "isolate the logging steps and are steadier.",
            ]
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = tm.resolve_device(args.device)
    tm.set_threads(args.threads)
    tm.quiet_libraries()
    torch.manual_seed(args.seed)
    report = tm.Report()
    settings = {
        "params": "none" if args.params is None else tm.format_count(tm.model_numel(args.params)),
        "shapes": ",".join(s.name for s in args.shapes) or "none",
        "rebuilds": args.rebuilds,
        "repetitions": args.repetitions,
        "warmup": args.warmup,
        "min sample ms": args.min_sample_ms,
        "interval": args.interval,
        "run steps": args.run_steps,
        "run repeats": args.run_repeats,
    }
    report.add(tm.header("lit_decay: what WeightDecayMonitor costs", device, settings))
    started = time.perf_counter()
    logging_ms = None
    if "step" in args.parts:
        if args.params is not None:
            logging_ms = step_table(args, device, report, tm.Workload.of_size(args.params))
        for shape_set in args.shapes:
            step_table(args, device, report, tm.Workload.of_shapes(shape_set))
    if "run" in args.parts:
        run_table(args, device, report, logging_ms)
    report.add(
        "\n".join(
            [
                "### Notes",
                "",
                "- Ratios are medians of paired ratios (candidate / reference in the same round-robin repetition); "
                "the A vs A row is a second, identical optimizer on different allocations: its distance from 1.00× "
                "is the noise floor of this run.",
                "- 'first call ms' includes one-off work: on a CPU (with LIT_DECAY_COMPILE unset) the statistics' one "
                "pass per tensor is compiled at the first logging step of the process (seconds; inductor's disk "
                "cache makes later processes faster); on other devices it runs eagerly unless LIT_DECAY_COMPILE=1. "
                "It is never in the timed samples.",
                f"- Total run time: {time.perf_counter() - started:.0f} s.",
            ]
        )
    )
    report.write(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
