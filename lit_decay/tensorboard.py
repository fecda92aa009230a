"""What the monitor adds when a logger is TensorBoard's: a custom-scalars layout, the grouping table, histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lit_decay._tensors import is_dtensor, local
from lit_decay.configure import report_of
from lit_decay.diagnostics import peak_lr, timescale_cells, timescale_findings
from lit_decay.grouping import Table
from lit_decay.modes import rule_of
from lit_decay.optim import describe_implementation
from lit_decay.tags import group_tag_pattern


def custom_scalars_layout(
    prefix: str, metrics: Sequence[str], groups: Sequence[str] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout: one chart per metric with every group overlaid.

    Each chart's tags are matched by ``lit_decay.tags.group_tag_pattern``.

    With ``groups``, each chart matches exactly those group tags, so a group whose name holds "/" is charted too
    (and a per-parameter tag never is); without, any one-segment group name.

    Examples:
        >>> custom_scalars_layout("decay", ["weight_norm"])
        {'decay': {'weight_norm': ['Multiline', ['^decay/weight_norm/[^/]+$']]}}
        >>> custom_scalars_layout("decay", ["weight_norm"], ["decay", "enc/dec"])
        {'decay': {'weight_norm': ['Multiline', ['^decay/weight_norm/(decay|enc/dec)$']]}}
    """
    return {prefix: {metric: ["Multiline", [group_tag_pattern(prefix, metric, groups)]] for metric in metrics}}


def grouping_markdown(
    optimizers: Sequence[Optimizer], names: Sequence[Sequence[str]], *, run_steps: float | None = None
) -> str:
    """The grouping of every optimizer as markdown: lit_decay's full report where ``configure_adam`` built the
    optimizer, else a table of its groups; then each decoupled group's decay timescale τ = 1/(lr·wd) at the peak lr,
    and τ over the run's length (``run_steps``, where known).

    Examples:
        >>> opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], weight_decay=0.01)
        >>> print(grouping_markdown([opt], [["pg1"]], run_steps=200_000))
        **optimizer 0: AdamW** (for-loop)
        <BLANKLINE>
        | group | mode | coefficient | lr | tensors | elements | τ (steps) | τ / run |
        |---|---|---|---|---|---|---|---|
        | pg1 | decoupled | 0.01 | 0.001 | 1 | 3 | 100,000 | 0.5 |
    """
    parts = []
    for index, (optimizer, group_names) in enumerate(zip(optimizers, names)):
        report = report_of(optimizer)
        header = f"**optimizer {index}: {type(optimizer).__name__}**"
        if report is not None:
            findings = "".join(f"\n\n{line}" for line in timescale_findings(optimizer, group_names, run_steps))
            timescales = _timescale_table(optimizer, group_names, run_steps)
            parts.append(f"{header}\n\n{report.to_markdown()}\n\n{timescales}{findings}")
            continue
        rows = []
        for name, group in zip(group_names, optimizer.param_groups):
            rule = rule_of(optimizer, group)
            lazy = any(is_lazy(p) for p in group["params"])
            rows.append(
                (
                    name,
                    rule.mode.name,
                    f"{rule.strength:g}",
                    f"{float(group['lr']):g}",
                    str(len(group["params"])),
                    "?" if lazy else f"{sum(p.numel() for p in group['params']):,}",
                    *_timescale_of(optimizer, group, run_steps),
                )
            )
        columns = ("group", "mode", "coefficient", "lr", "tensors", "elements", "τ (steps)", "τ / run")
        table = Table(columns, tuple(rows))
        notes = [line for finding in timescale_findings(optimizer, group_names, run_steps) for line in ("", finding)]
        lines = [f"{header} ({describe_implementation(optimizer)})", "", *table.markdown_lines(), *notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _timescale_of(optimizer: Optimizer, group: Mapping[str, Any], run_steps: float | None) -> tuple[str, str]:
    rule = rule_of(optimizer, group)
    if not (rule.mode.timescale and rule.active):
        return "–", "–"
    return timescale_cells(peak_lr(group), rule.strength, run_steps)


def _timescale_table(optimizer: Optimizer, group_names: Sequence[str], run_steps: float | None) -> str:
    """τ at the schedule's peak lr (the report's own table is at the base lr), and τ against the run."""
    rows = tuple(
        (name, *_timescale_of(optimizer, group, run_steps)) for name, group in zip(group_names, optimizer.param_groups)
    )
    table = Table(("group", "τ = 1/(lr·wd) at peak lr (steps)", "τ / run"), rows)
    return "\n".join(table.markdown_lines())


def group_values(group: Mapping[str, Any]) -> torch.Tensor:
    """All of a group's weights as one flat float tensor on the host (whole tensors, also under FSDP2)."""
    pieces = []
    for param in group["params"]:
        whole = param.detach().full_tensor() if is_dtensor(param) else local(param.detach())
        pieces.append(whole.reshape(-1).float().cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0)
