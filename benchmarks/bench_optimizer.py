"""Optimizer-step time of each lit_decay decay mode against torch's fused AdamW, and a whole training step of the L1
modes against the usual "add λ·Σ|w| to the loss".

Run from the repository root::

    python benchmarks/bench_optimizer.py                       # full run: 1M,10M,50M,100M parameters (minutes)
    python benchmarks/bench_optimizer.py --sizes 50M --rebuilds 3 --output docs/bench_optimizer.md
    python benchmarks/bench_optimizer.py --shapes gpt2-small,1b --parts step --device cuda   # many tensors only
    python benchmarks/bench_optimizer.py --smoke               # seconds; what the tests run

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

import _timing as tm
import torch
import torch.nn.functional as F

import lit_decay
from lit_decay.optim import describe_implementation

MODES = ("none", "l2", "decoupled", "l1", "decoupled_l1")
REFERENCE = "AdamW fused (reference)"
CONTROL = "AdamW fused (A vs A)"
TRAIN_REFERENCE = "L1 in loss + Adam fused (reference)"
TRAIN_CONTROL = "L1 in loss + Adam fused (A vs A)"
# Limits on the step-time ratio to fused AdamW, from the issues "Decay modes on torch's fused Adam" and "Many
# tensors": the modes torch applies itself run its kernel unchanged, at every size and shape set; the L1 modes add a
# pass whose cost is stated at 50M parameters and for two many-tensor sets (elsewhere no target: "—").
EVERYWHERE: dict[str, float] = {"none": 1.02, "l2": 1.02, "decoupled": 1.02}
L1_TARGETS_BY_SIZE: dict[int, dict[str, float]] = {50_000_000: {"l1": 1.6, "decoupled_l1": 1.4}}
L1_TARGETS_BY_SHAPES: dict[str, dict[str, float]] = {"200x4096": {"l1": 1.8, "decoupled_l1": 1.6}}
DEFAULT_SHAPES = "200x4096,100x131072"
SMOKE_SHAPES = "20x64"
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
        "--shapes",
        type=tm.parse_shape_sets,
        default=None,
        help=f"many-tensor shape sets for the step table: NxM (N matrices of M elements), gpt2-small, 1b, or none;\n"
        f"default {DEFAULT_SHAPES}. Given without --sizes, only these are measured",
    )
    parser.add_argument(
        "--train-sizes", type=tm.parse_counts, default=None, help="sizes of the training-step comparison; default 50M"
    )
    parser.add_argument(
        "--parts",
        default="step,train",
        help="which tables: step (optimizer step alone), train (whole training step), terms (the L1 terms alone, in\n"
        "each form lit_decay chose between)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="the coefficient of every mode")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the training-step comparison")
    args = parser.parse_args(argv)
    if args.shapes is not None and args.sizes is None:
        args.sizes = []  # --shapes alone: the many-tensor sets only
    tm.fill_defaults(
        args,
        {
            "sizes": [1_000_000, 10_000_000, 50_000_000, 100_000_000],
            "train_sizes": [50_000_000],
            "shapes": tm.parse_shape_sets(DEFAULT_SHAPES),
        },
        {"sizes": [20_000], "train_sizes": [20_000], "shapes": tm.parse_shape_sets(SMOKE_SHAPES)},
    )
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - {"step", "train", "terms"})
    if unknown or not args.parts:
        parser.error(f"--parts takes step, train and/or terms; got {args.parts}")
    for key in ("rebuilds", "repetitions"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first steps allocate state and compile)")
    if {"step", "terms"} & set(args.parts) and not (args.sizes or args.shapes):
        parser.error("the step and terms tables need at least one of --sizes and --shapes")
    return args


def workloads(args: argparse.Namespace) -> list[tm.Workload]:
    """The step table's row blocks: the synthetic model at each size, then each many-tensor shape set."""
    return [*(tm.Workload.of_size(n) for n in args.sizes), *(tm.Workload.of_shapes(s) for s in args.shapes)]


def share_models(setting: str, n_params: int, candidates: int, device: torch.device, extra: int = 0) -> bool:
    """Whether the candidates must share one model to fit: separate models need 16 B/param each."""
    if setting != "auto":
        return setting == "yes"
    needed = candidates * _BYTES_OWN_MODEL * n_params + extra
    available = tm.available_memory(device)
    return bool(available) and needed > 0.6 * available


# ---- the optimizer step alone ----------------------------------------------------------------------------------------


def step_candidates(
    workload: tm.Workload, device: torch.device, args: argparse.Namespace, shared: bool, rebuild: int
) -> list[tm.Candidate]:
    """The optimizer candidates for one workload, each on its own freshly built model unless ``shared``."""
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

    def adamw(**implementation: bool) -> torch.optim.Optimizer:
        groups = lit_decay.param_groups(model(), weight_decay=wd, mode="decoupled")
        return torch.optim.AdamW(groups, lr=lr, **implementation)

    def candidate(name: str, make: Callable[[], torch.optim.Optimizer]) -> Callable[[], tm.Candidate]:
        def built() -> tm.Candidate:
            optimizer = make()
            return tm.Candidate(name, optimizer.step, describe_implementation(optimizer))

        return built

    def ours(mode: str) -> Callable[[], torch.optim.Optimizer]:
        return lambda: lit_decay.configure_adam(model(), lr=lr, weight_decay=wd, mode=mode, verbose=False)

    builders = [
        candidate(REFERENCE, lambda: adamw(fused=True)),
        candidate(CONTROL, lambda: adamw(fused=True)),
        *(candidate(mode_label(mode), ours(mode)) for mode in MODES),
        candidate("AdamW foreach", lambda: adamw(foreach=True)),
        candidate("AdamW for-loop", lambda: adamw(foreach=False)),
    ]
    return tm.build_rotated(builders, rebuild)


def target_of(mode: str, workload: tm.Workload) -> float | None:
    """The issue's limit for ``mode`` on this workload, or None where the issue sets none."""
    if mode in EVERYWHERE:
        return EVERYWHERE[mode]
    if workload.shape_set is not None:
        return L1_TARGETS_BY_SHAPES.get(workload.shape_set, {}).get(mode)
    for size, limits in L1_TARGETS_BY_SIZE.items():
        if 0.9 * size <= workload.count <= 1.1 * size:
            return limits.get(mode)
    return None


def target_cell(name: str, workload: tm.Workload, value: float) -> str:
    for mode in MODES:
        if name == mode_label(mode):
            limit = target_of(mode, workload)
            if limit is None:
                return "—"
            met = "yes" if value <= limit else "NO"
            return f"≤ {limit:.2f}×: {met}"
    return ""


def step_table(args: argparse.Namespace, device: torch.device, report: tm.Report) -> list[float]:
    rows = []
    l1_first_calls = []
    notes = []
    for workload in workloads(args):
        n_candidates = 4 + len(MODES)
        shared = share_models(args.share_params, workload.count, n_candidates, device)
        if shared:
            notes.append(f"{workload.label}: candidates shared one set of weights and gradients (memory).")
        tm.progress(f"optimizer step, {workload.describe}")
        samples = tm.time_candidates(
            args, lambda rebuild, w=workload, s=shared: step_candidates(w, device, args, s, rebuild), device, REFERENCE
        )
        for summary in tm.summarise(samples):
            target = target_cell(summary.name, workload, summary.ratio)
            rows.append([workload.label, *tm.summary_cells(summary), target])
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
        *(
            [
                "",
                "Many tensors: the rows named by a shape set step a model of exactly those tensors ("
                + "; ".join(f"{s.label}: {s.tensors} tensors, {tm.format_count(s.numel)} params" for s in args.shapes)
                + "), grouped by the same rules (matrices decayed, biases and norms not). A step's fixed cost per "
                "tensor shows here, not behind the four large matrices of the synthetic model.",
            ]
            if args.shapes
            else []
        ),
        "",
        table,
    ]
    if notes:
        text += ["", *notes]
    report.add("\n".join(text))
    return l1_first_calls


# ---- the L1 terms alone, in each form ------------------------------------------------------------------------------


def term_candidates(
    workload: tm.Workload, device: torch.device, args: argparse.Namespace, rebuild: int
) -> list[tm.Candidate]:
    """The L1 terms alone over the decay group's tensors, in the forms lit_decay chose between, next to a fused AdamW
    step over the whole model: the evidence for the forms ``lit_decay.modes`` runs on each device."""
    seed = args.seed * 1000 + rebuild
    net = workload.build(device, seed)
    tm.fill_gradients(net, seed=seed)
    groups = lit_decay.param_groups(net, weight_decay=args.weight_decay, mode="decoupled")
    params = [p for _, p in groups[0]["params"]]
    grads = [p.grad for p in params]
    reference = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    wd, threshold = args.weight_decay, args.lr * args.weight_decay

    # Each under torch.no_grad, as in lit_decay.Adam's step: the weights are leaves that require grad.
    def batched(size: int) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            for ps, gs in lit_decay.modes._batches(params, grads, size=size):
                torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=wd)

        return run

    @torch.no_grad()
    def one_at_a_time() -> None:
        for p, g in zip(params, grads):
            g.add_(torch.sign(p), alpha=wd)

    @torch.no_grad()
    def whole_group() -> None:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=wd)

    def shrink(foreach: bool) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            lit_decay.modes.soft_threshold(params, threshold, foreach)

        return run

    built = [
        tm.Candidate(REFERENCE, reference.step, "fused AdamW step"),
        tm.Candidate("l1 term: one multi-tensor call over the group (CUDA/XPU form)", whole_group, "2 ops"),
        tm.Candidate("l1 term: batches of 2**20 elements (CPU form)", batched(1 << 20), "2 ops per batch"),
        tm.Candidate("l1 term: batches of 2**18 elements", batched(1 << 18), "2 ops per batch"),
        tm.Candidate("l1 term: whole tensors one at a time", one_at_a_time, "2 ops per tensor"),
        tm.Candidate("decoupled_l1 shrink: three multi-tensor ops (CUDA/XPU form)", shrink(True), "3 ops"),
        tm.Candidate("decoupled_l1 shrink: in-place softshrink per tensor (CPU form)", shrink(False), "1 op/tensor"),
    ]
    return built


def terms_table(args: argparse.Namespace, device: torch.device, report: tm.Report) -> None:
    rows = []
    for workload in workloads(args):
        tm.progress(f"L1 terms, {workload.describe}")
        samples = tm.time_candidates(
            args, lambda rebuild, w=workload: term_candidates(w, device, args, rebuild), device, REFERENCE
        )
        rows += [[workload.label, *tm.summary_cells(summary)] for summary in tm.summarise(samples)]
    table = tm.markdown_table(
        ["params", "candidate", "work", "median ms", "min ms", "× reference", "× reference per rebuild",
         "first call ms"],
        rows,
    )  # fmt: skip
    report.add(
        "\n".join(
            [
                "### The L1 terms alone, in each form",
                "",
                "Each sample is one form of a term over the decay group (the matrices) with filled gradients, next to "
                "one fused AdamW step over the whole model (the reference): what `lit_decay.modes.add_sign` and "
                "`soft_threshold` run on a CPU, what they run on CUDA/XPU, and the simpler forms they were chosen "
                "against. The optimizer step adds the chosen term's ratio to about 1.00×.",
                "",
                table,
            ]
        )
    )


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
        optimizer = lit_decay.configure_adam(net, lr=lr, weight_decay=wd, mode=mode, verbose=False)
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
        "lit_decay.Adam's step instead (the same penalty, without the autograd graph); `decoupled_l1` "
        f"soft-thresholds after the step (the proximal form, exact zeros). λ={args.weight_decay}, lr={args.lr}.",
        "",
        table,
    ]
    if notes:
        text += ["", *notes]
    report.add("\n".join(text))
    return first_calls


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = tm.resolve_device(args.device)
    tm.set_threads(args.threads)
    tm.quiet_libraries()
    torch.manual_seed(args.seed)
    report = tm.Report()
    settings = {
        "sizes": ",".join(tm.format_count(n) for n in args.sizes) or "none",
        "shapes": ",".join(s.name for s in args.shapes) or "none",
        "train sizes": ",".join(tm.format_count(n) for n in args.train_sizes) if "train" in args.parts else "none",
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
    if "terms" in args.parts:
        terms_table(args, device, report)
    measured = [*(workloads(args) if {"step", "terms"} & set(args.parts) else [])]
    measured += [tm.Workload.of_size(n) for n in (args.train_sizes if "train" in args.parts else [])]
    largest = max(w.largest for w in measured)
    slowest_first = max((f for f in first_calls if not math.isnan(f)), default=math.nan)
    report.add(
        "\n".join(
            [
                "### Notes",
                "",
                f"- Largest tensor: {largest:,} elements. The step path compiles nothing: on a CPU `l1` takes torch's "
                "multi-tensor ops over batches of at most 2**20 elements (large tensors in pieces) and "
                "`decoupled_l1` one in-place softshrink per tensor; on a GPU, multi-tensor ops over the whole group. "
                f"The slowest first L1 step took {tm.ms(slowest_first)} ms (Adam's state allocation). First steps "
                "are in the 'first step ms' column, never in the timed samples (every candidate is warmed up first).",
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
