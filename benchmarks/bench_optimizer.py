"""Optimizer-step time of each lit_decay decay mode against torch's fused AdamW, and a whole training step of the L1
modes against the usual "add λ·Σ|w| to the loss".

Run from the repository root::

    python benchmarks/bench_optimizer.py                       # full run: 1M,10M,50M,100M parameters (minutes)
    python benchmarks/bench_optimizer.py --sizes 50M --rebuilds 3 --output docs/bench_optimizer.md
    python benchmarks/bench_optimizer.py --smoke               # seconds; what the tests run

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import _timing as tm
import torch
import torch.nn.functional as F

import lit_decay
from lit_decay._compile import MIN_COMPILED_NUMEL
from lit_decay.optim import describe_implementation

MODES = ("none", "l2", "decoupled", "l1", "decoupled_l1")
REFERENCE = "AdamW fused (reference)"
CONTROL = "AdamW fused (A vs A)"
TRAIN_REFERENCE = "L1 in loss + Adam fused (reference)"
TRAIN_CONTROL = "L1 in loss + Adam fused (A vs A)"
# (limit, size it applies to or None for every size); from the issue "Decay modes on torch's fused Adam".
TARGETS: dict[str, tuple[float, int | None]] = {
    "none": (1.02, None),
    "l2": (1.02, None),
    "decoupled": (1.02, None),
    "l1": (1.5, 50_000_000),
    "decoupled_l1": (1.5, 50_000_000),
}
# Bytes per parameter held by one candidate: weights, gradient, Adam's two moments (fp32).
_BYTES_OWN_MODEL = 16
_BYTES_SHARED_MODEL = 8


def mode_label(mode: str) -> str:
    return f'configure_adam(mode="{mode}")'


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    tm.add_timing_arguments(parser)
    parser.add_argument("--sizes", type=tm.parse_counts, default=None, help="model sizes, default 1M,10M,50M,100M")
    parser.add_argument(
        "--train-sizes", type=tm.parse_counts, default=None, help="sizes of the training-step comparison; default 50M"
    )
    parser.add_argument(
        "--parts", default="step,train", help="which tables: step (optimizer step alone), train (whole training step)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="the coefficient of every mode")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the training-step comparison")
    args = parser.parse_args(argv)
    tm.fill_defaults(
        args,
        {"sizes": [1_000_000, 10_000_000, 50_000_000, 100_000_000], "train_sizes": [50_000_000]},
        {"sizes": [20_000], "train_sizes": [20_000]},
    )
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - {"step", "train"})
    if unknown or not args.parts:
        parser.error(f"--parts takes step and/or train; got {args.parts}")
    for key in ("rebuilds", "repetitions"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first steps allocate state and compile)")
    return args


def share_models(setting: str, n_params: int, candidates: int, device: torch.device, extra: int = 0) -> bool:
    """Whether the candidates must share one model to fit: separate models need 16 B/param each."""
    if setting != "auto":
        return setting == "yes"
    needed = candidates * _BYTES_OWN_MODEL * n_params + extra
    available = tm.available_memory(device)
    return bool(available) and needed > 0.6 * available


# ---- the optimizer step alone ----------------------------------------------------------------------------------------


def step_candidates(
    n_params: int, device: torch.device, args: argparse.Namespace, shared: bool, rebuild: int
) -> list[tm.Candidate]:
    """The optimizer candidates at one size, each on its own freshly built model unless ``shared``."""
    seed = args.seed * 1000 + rebuild
    common = None
    if shared:
        common = tm.build_model(n_params, device, seed=seed)
        tm.fill_gradients(common, seed=seed)

    def model() -> torch.nn.Module:
        if common is not None:
            return common
        fresh = tm.build_model(n_params, device, seed=seed)
        tm.fill_gradients(fresh, seed=seed)
        return fresh

    wd, lr = args.weight_decay, args.lr

    def adamw(**implementation: bool) -> torch.optim.Optimizer:
        groups = lit_decay.param_groups(model(), weight_decay=wd, mode="decoupled")
        return torch.optim.AdamW(groups, lr=lr, **implementation)

    def candidate(name: str, make: Callable[[], torch.optim.Optimizer]) -> Callable[[], tm.Candidate]:
        def built() -> tm.Candidate:
            optimizer = make()
            return tm.Candidate(name, optimizer.step, describe_implementation(optimizer))

        return built

    def ours(mode: str) -> Callable[[], torch.optim.Optimizer]:
        return lambda: lit_decay.configure_adam(model(), lr=lr, weight_decay=wd, mode=mode)

    builders = [
        candidate(REFERENCE, lambda: adamw(fused=True)),
        candidate(CONTROL, lambda: adamw(fused=True)),
        *(candidate(mode_label(mode), ours(mode)) for mode in MODES),
        candidate("AdamW foreach", lambda: adamw(foreach=True)),
        candidate("AdamW for-loop", lambda: adamw(foreach=False)),
    ]
    return tm.build_rotated(builders, rebuild)


def target_cell(name: str, n_params: int, value: float) -> str:
    for mode, (limit, at_size) in TARGETS.items():
        if name == mode_label(mode):
            if at_size is not None and not (0.9 * at_size <= n_params <= 1.1 * at_size):
                return "—"
            met = "yes" if value <= limit else "NO"
            return f"≤ {limit:.2f}×: {met}"
    return ""


def step_table(args: argparse.Namespace, device: torch.device, report: tm.Report) -> list[float]:
    rows = []
    l1_first_calls = []
    notes = []
    for n_params in args.sizes:
        width, depth = tm.model_shape(n_params)
        count = tm.model_numel(n_params)
        n_candidates = 4 + len(MODES)
        shared = share_models(args.share_params, count, n_candidates, device)
        if shared:
            notes.append(f"{tm.format_count(count)}: candidates shared one set of weights and gradients (memory).")
        tm.progress(f"optimizer step, {tm.format_count(count)} parameters, width {width}, depth {depth}")
        samples = tm.time_candidates(
            args, lambda rebuild, n=n_params, s=shared: step_candidates(n, device, args, s, rebuild), device, REFERENCE
        )
        for summary in tm.summarise(samples):
            rows.append(
                [tm.format_count(count), *tm.summary_cells(summary), target_cell(summary.name, count, summary.ratio)]
            )
            if summary.name in (mode_label("l1"), mode_label("decoupled_l1")):
                l1_first_calls.append(summary.first_ms)
    table = tm.markdown_table(
        [
            "params",
            "candidate",
            "kernel",
            "median ms",
            "min ms",
            "× reference",
            "× reference per rebuild",
            "first step ms",
            "target",
        ],
        rows,
    )
    text = [
        "### Optimizer step alone",
        "",
        "Gradients are filled once with random values; each sample is `optimizer.step()` only (no forward, no "
        "backward, no `zero_grad`). Every candidate steps the same groups from `lit_decay.param_groups` (decay: "
        f"matrices; no_decay: biases and LayerNorms), lr={args.lr}, weight_decay={args.weight_decay}.",
        "",
        table,
    ]
    if notes:
        text += ["", *notes]
    report.add("\n".join(text))
    return l1_first_calls


# ---- the whole training step -----------------------------------------------------------------------------------------


def train_candidates(
    n_params: int, device: torch.device, args: argparse.Namespace, shared: bool, rebuild: int
) -> list[tm.Candidate]:
    """Forward + backward + step: lit_decay's L1 modes against the penalty written into the loss."""
    seed = args.seed * 1000 + rebuild
    common = tm.build_model(n_params, device, seed=seed) if shared else None
    width = tm.model_shape(n_params)[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(args.batch, width, device=device, generator=generator)
    y = torch.randn(args.batch, width, device=device, generator=generator)
    wd, lr = args.weight_decay, args.lr

    def model() -> torch.nn.Module:
        return common if common is not None else tm.build_model(n_params, device, seed=seed)

    def step_of(
        net: torch.nn.Module, optimizer: torch.optim.Optimizer, penalised: list[torch.Tensor]
    ) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(net(x), y)
            if penalised:
                # The common peer: the L1 penalty in the loss, differentiated by autograd.
                loss = loss + wd * sum(p.abs().sum() for p in penalised)
            loss.backward()
            optimizer.step()

        return step

    def peer(name: str) -> tm.Candidate:
        net = model()
        decayed = lit_decay.param_groups(net, weight_decay=wd, mode="l1")
        penalised = [p for g in decayed if g["decay_mode"] == "l1" for _, p in g["params"]]
        # The same groups, with no decay applied by the optimizer: the loss carries the penalty.
        optimizer = torch.optim.Adam(lit_decay.param_groups(net, weight_decay=0.0), lr=lr, fused=True)
        return tm.Candidate(name, step_of(net, optimizer, penalised), describe_implementation(optimizer))

    def ours(name: str, mode: str) -> tm.Candidate:
        net = model()
        optimizer = lit_decay.configure_adam(net, lr=lr, weight_decay=wd, mode=mode)
        return tm.Candidate(name, step_of(net, optimizer, []), describe_implementation(optimizer))

    builders: list[Callable[[], tm.Candidate]] = [
        lambda: peer(TRAIN_REFERENCE),
        lambda: peer(TRAIN_CONTROL),
        lambda: ours(mode_label("l1"), "l1"),
        lambda: ours(mode_label("decoupled_l1"), "decoupled_l1"),
        lambda: ours(mode_label("none") + " (no penalty)", "none"),
    ]
    return tm.build_rotated(builders, rebuild)


def train_table(args: argparse.Namespace, device: torch.device, report: tm.Report) -> list[float]:
    rows = []
    notes = []
    first_calls = []
    for n_params in args.train_sizes:
        count = tm.model_numel(n_params)
        shared = share_models(args.share_params, count, 5, device)
        if shared:
            notes.append(f"{tm.format_count(count)}: candidates shared one set of weights (memory).")
        tm.progress(f"training step, {tm.format_count(count)} parameters, batch {args.batch}")
        samples = tm.time_candidates(
            args,
            lambda rebuild, n=n_params, s=shared: train_candidates(n, device, args, s, rebuild),
            device,
            TRAIN_REFERENCE,
        )
        for summary in tm.summarise(samples):
            rows.append([tm.format_count(count), *tm.summary_cells(summary)])
            if summary.name in (mode_label("l1"), mode_label("decoupled_l1")):
                first_calls.append(summary.first_ms)
    table = tm.markdown_table(
        [
            "params",
            "candidate",
            "kernel",
            "median ms",
            "min ms",
            "× reference",
            "× reference per rebuild",
            "first step ms",
        ],
        rows,
    )
    text = [
        "### Whole training step: L1 modes against the penalty in the loss",
        "",
        f"Each sample is `zero_grad` + forward + MSE loss + backward + step on a batch of {args.batch} (the same "
        "synthetic model). Reference: the usual peer, `loss + λ·Σ|w|` over the decay group computed with autograd, "
        "then torch's fused Adam without weight decay, over the same groups. `l1` adds λ·sign(w) to the gradient in "
        "a step hook instead (the same penalty, without the autograd graph); `decoupled_l1` soft-thresholds after "
        f"the step (the proximal form, exact zeros). λ={args.weight_decay}, lr={args.lr}.",
        "",
        table,
    ]
    if notes:
        text += ["", *notes]
    report.add("\n".join(text))
    return first_calls


def compiles(numel: int) -> bool:
    """Whether lit_decay sends a contiguous tensor of ``numel`` elements through its compiled kernels (the rule of
    ``lit_decay._compile.wants_compiled``, without allocating such a tensor)."""
    setting = os.environ.get("LIT_DECAY_COMPILE", "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False
    return setting == "always" or numel >= MIN_COMPILED_NUMEL


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = tm.resolve_device(args.device)
    tm.set_threads(args.threads)
    tm.quiet_libraries()
    torch.manual_seed(args.seed)
    report = tm.Report()
    settings = {
        "sizes": ",".join(tm.format_count(n) for n in args.sizes),
        "train sizes": ",".join(tm.format_count(n) for n in args.train_sizes),
        "rebuilds": args.rebuilds,
        "repetitions": args.repetitions,
        "warmup": args.warmup,
        "min sample ms": args.min_sample_ms,
    }
    report.add(tm.header("lit_decay: Adam step time per decay mode", device, settings))
    started = time.perf_counter()
    first_calls = []
    if "step" in args.parts:
        first_calls += step_table(args, device, report)
    if "train" in args.parts:
        first_calls += train_table(args, device, report)
    sizes = [*(args.sizes if "step" in args.parts else []), *(args.train_sizes if "train" in args.parts else [])]
    largest = max(4 * tm.model_shape(n)[0] ** 2 for n in sizes)
    compiled = compiles(largest)
    slowest_first = max((f for f in first_calls if not math.isnan(f)), default=math.nan)
    report.add(
        "\n".join(
            [
                "### Notes",
                "",
                f"- Largest tensor: {largest:,} elements, so lit_decay's compiled single-pass L1 kernel "
                f"{'was' if compiled else 'was not'} used (LIT_DECAY_COMPILE="
                f"{os.environ.get('LIT_DECAY_COMPILE', 'auto')}; by default tensors of ≥ {MIN_COMPILED_NUMEL:,} "
                "elements). "
                f"The slowest first L1 step took {tm.ms(slowest_first)} ms"
                + (
                    ": the first such step of a process pays torch.compile's time (typically 10–30 s on a CPU), once"
                    if compiled
                    else ""
                )
                + ". First steps are in the 'first step ms' column, never in the timed samples (every candidate is "
                "warmed up first).",
                "- Ratios are medians of paired ratios (candidate / reference in the same round-robin repetition); "
                "the A vs A row is a second, identical optimizer on different allocations: its distance from 1.00× "
                "is the noise floor of this run.",
                f"- Total run time: {time.perf_counter() - started:.0f} s.",
            ]
        )
    )
    report.write(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
