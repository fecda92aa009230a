"""What the monitor adds when a logger is TensorBoard's: a custom-scalars layout, the grouping table, histograms."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lit_decay._tensors import is_dtensor, local
from lit_decay.optim import describe_implementation, report_of
from lit_decay.stats import group_rule


def custom_scalars_layout(prefix: str, metrics: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout: one chart per metric with every group overlaid (tags matched by regex).

    Examples:
        >>> custom_scalars_layout("decay", ["weight_norm"])
        {'decay': {'weight_norm': ['Multiline', ['^decay/weight_norm/[^/]+$']]}}
    """
    return {prefix: {metric: ["Multiline", [f"^{re.escape(prefix)}/{re.escape(metric)}/[^/]+$"]] for metric in metrics}}


def grouping_markdown(optimizers: Sequence[Optimizer], names: Sequence[Sequence[str]]) -> str:
    """The grouping of every optimizer as markdown: lit_decay's full report where ``configure_adam`` built the
    optimizer, else a table of its groups.

    Examples:
        >>> opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], weight_decay=0.01)
        >>> print(grouping_markdown([opt], [["pg1"]]))
        **optimizer 0: AdamW** (for-loop)
        <BLANKLINE>
        | group | mode | coefficient | lr | tensors | elements |
        |---|---|---|---|---|---|
        | pg1 | decoupled | 0.01 | 0.001 | 1 | 3 |
    """
    parts = []
    for index, (optimizer, group_names) in enumerate(zip(optimizers, names)):
        report = report_of(optimizer)
        if report is not None:
            parts.append(f"**optimizer {index}: {type(optimizer).__name__}**\n\n{report.to_markdown()}")
            continue
        lines = [
            f"**optimizer {index}: {type(optimizer).__name__}** ({describe_implementation(optimizer)})",
            "",
            "| group | mode | coefficient | lr | tensors | elements |",
            "|---|---|---|---|---|---|",
        ]
        for name, group in zip(group_names, optimizer.param_groups):
            rule = group_rule(optimizer, group)
            elements = sum(p.numel() for p in group["params"])
            cells = (
                name,
                rule.mode,
                f"{rule.coefficient:g}",
                f"{float(group['lr']):g}",
                len(group["params"]),
                f"{elements:,}",
            )
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def group_values(group: Mapping[str, Any]) -> torch.Tensor:
    """All of a group's weights as one flat float tensor on the host (whole tensors, also under FSDP2)."""
    pieces = []
    for param in group["params"]:
        whole = param.detach().full_tensor() if is_dtensor(param) else local(param.detach())
        pieces.append(whole.reshape(-1).float().cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0)
