"""What the monitor adds when a logger is TensorBoard's: a custom-scalars layout, the grouping as text, histograms.

TensorBoard's TEXT tab shows each text tag in a card at most 500 pixels high, with its own scroll bar beyond: a table
longer than about a dozen rows is cut off in a small inner box. So the monitor writes short texts, each under its own
tag: the grouping summary (one row per param group), the per-tensor table in pages of ``PAGE_ROWS`` rows, and the
decay report at the end of fit.
"""

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

#: Table rows per text entry: with TensorBoard's cell padding a row is about 30 pixels, and a text card shows 500.
PAGE_ROWS = 12

#: What each chart shows, in the chart's title: the figure's meaning is read where the figure is.
CHART_TITLES: Mapping[str, str] = {
    "weight_norm": "weight_norm: ‖w‖ of the group",
    "grad_norm": "grad_norm: ‖g‖ of the gradient the step used",
    "update_ratio": "update_ratio: ‖Δw‖/‖w‖ per step",
    "effective_decay": "effective_decay: fraction of ‖w‖ the penalty removes per step",
    "decay_timescale": "decay_timescale: steps for the decay to shrink w by e",
    "sparsity": "sparsity: fraction of weights exactly 0 (L1 groups)",
    "equilibrium": (
        "equilibrium: update_ratio over its value at rotational equilibrium; 1 for weights followed by a "
        "normalization, a group that also holds others (a head, embeddings) sits away from 1"
    ),
    "weight_decay": "weight_decay: the group's strength (follows schedules)",
    "decay_progress": "decay_progress: Σ lr·wd, e-folds applied (≥ 1: decay has acted)",
}


def chart_title(metric: str) -> str:
    """The title of ``metric``'s chart: its name, then what it means.

    Examples:
        >>> chart_title("weight_norm")
        'weight_norm: ‖w‖ of the group'
        >>> chart_title("custom")
        'custom'
    """
    return CHART_TITLES.get(metric, metric)


def custom_scalars_layout(
    prefix: str, metrics: Sequence[str], groups: Sequence[str] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout: one chart per metric (titled by ``chart_title``), every group in it.

    Give only the metrics a run logs: a chart of a metric nobody logs is an empty box ("Matches (0)"). Each chart's
    tags are matched by ``lit_decay.tags.group_tag_pattern``: with ``groups``, exactly those group tags (needed when a
    group's name holds "/"); without, any one-segment group name, so that the charts of several runs with other
    groups are the same charts, which TensorBoard merges into one per metric rather than showing one per run.

    Examples:
        >>> custom_scalars_layout("decay", ["weight_norm"])
        {'decay': {'weight_norm: ‖w‖ of the group': ['Multiline', ['^decay/weight_norm/[^/]+$']]}}
        >>> custom_scalars_layout("decay", ["weight_norm"], ["decay", "enc/dec"])["decay"]
        {'weight_norm: ‖w‖ of the group': ['Multiline', ['^decay/weight_norm/(decay|enc/dec)$']]}
    """
    charts = {chart_title(metric): ["Multiline", [group_tag_pattern(prefix, metric, groups)]] for metric in metrics}
    return {prefix: charts}


def grouping_markdown(
    optimizers: Sequence[Optimizer],
    names: Sequence[Sequence[str]],
    *,
    run_steps: float | None = None,
    scheduled: bool = False,
) -> str:
    """The grouping of every optimizer as markdown, one row per group: mode, strength (``"weight_decay"``), lr,
    tensors, elements, and for decoupled groups the decay timescale τ = 1/(lr·wd) at the peak lr and τ over the run's
    length (``run_steps``, where known), then the notes of ``configure_adam``'s report and the timescale advice.

    ``scheduled`` says that a ``WeightDecayScheduler`` rewrites the strengths during training (the ones shown are
    those at fit start). The per-tensor table is apart, in ``parameter_pages``.

    Examples:
        >>> opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], weight_decay=0.01)
        >>> print(grouping_markdown([opt], [["pg1"]], run_steps=200_000))
        **optimizer 0: AdamW** (for-loop)
        <BLANKLINE>
        | group | mode | weight_decay | lr | tensors | elements | τ = 1/(lr·wd) at peak lr (steps) | τ / run |
        |---|---|---|---|---|---|---|---|
        | pg1 | decoupled | 0.01 | 0.001 | 1 | 3 | 100,000 | 0.5 |
    """
    parts = []
    for index, (optimizer, group_names) in enumerate(zip(optimizers, names)):
        report = report_of(optimizer)
        header = f"**optimizer {index}: {type(optimizer).__name__}**"
        if report is None:
            header += f" ({describe_implementation(optimizer)})"
        else:
            header += f" — {report.summary().splitlines()[0]}"
        notes: list[str] = [] if report is None else list(report.notes())
        if report is not None and report.layering:
            notes.insert(0, report.layering)
        if scheduled:
            notes.append(
                "A WeightDecayScheduler sets weight_decay during training: the column shows the values at fit start; "
                "`weight_decay` is logged at every logging step."
            )
        lines = [header, "", *_group_table(optimizer, group_names, run_steps).markdown_lines()]
        for line in (*notes, *timescale_findings(optimizer, group_names, run_steps)):
            lines += ["", line]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _group_table(optimizer: Optimizer, group_names: Sequence[str], run_steps: float | None) -> Table:
    rows = []
    for name, group in zip(group_names, optimizer.param_groups):
        rule = rule_of(optimizer, group)
        lazy = any(is_lazy(p) for p in group["params"])
        tau = timescale_cells(peak_lr(group), rule.strength, run_steps) if rule.mode.timescale else ("–", "–")
        rows.append(
            (
                name,
                rule.mode.name,
                f"{rule.strength:g}",
                f"{float(group['lr']):g}",
                str(len(group["params"])),
                "?" if lazy else f"{sum(p.numel() for p in group['params']):,}",
                *tau,
            )
        )
    columns = ("group", "mode", "weight_decay", "lr", "tensors", "elements", "τ = 1/(lr·wd) at peak lr (steps)")
    return Table((*columns, "τ / run"), tuple(rows))


def parameter_pages(
    optimizers: Sequence[Optimizer],
    names: Sequence[Sequence[str]],
    parameter_names: Mapping[int, str] | None = None,
    *,
    rows: int = PAGE_ROWS,
) -> list[str]:
    """The per-tensor table of every optimizer as markdown pages of at most ``rows`` rows, each one text entry that
    TensorBoard shows in full: ``configure_adam``'s report (name, shape, numel, group, reason; frozen tensors too),
    else name, shape, numel and group (names from ``parameter_names``, by ``id`` of the tensor).

    Examples:
        >>> layer = torch.nn.Linear(2, 3)
        >>> opt = torch.optim.AdamW(layer.parameters())
        >>> pages = parameter_pages([opt], [["pg1"]], {id(layer.weight): "weight"}, rows=1)
        >>> print(pages[1])
        **optimizer 0: AdamW**, tensors 2–2 of 2
        <BLANKLINE>
        | name | shape | numel | group |
        |---|---|---|---|
        | p1 | (3,) | 3 | pg1 |
    """
    pages = []
    for index, (optimizer, group_names) in enumerate(zip(optimizers, names)):
        table = _parameter_table(optimizer, group_names, parameter_names or {})
        for start in range(0, len(table.rows), rows):
            chunk = table.rows[start : start + rows]
            title = (
                f"**optimizer {index}: {type(optimizer).__name__}**, tensors {start + 1}–{start + len(chunk)} "
                f"of {len(table.rows)}"
            )
            lines = Table(table.header, chunk, table.numeric).markdown_lines()
            pages.append("\n".join([title, "", *lines]))
    return pages


def _parameter_table(optimizer: Optimizer, group_names: Sequence[str], parameter_names: Mapping[int, str]) -> Table:
    report = report_of(optimizer)
    if report is not None:
        return report.parameter_table(with_frozen=True)
    rows = []
    for name, group in zip(group_names, optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            lazy = is_lazy(param)
            rows.append(
                (
                    parameter_names.get(id(param), f"p{position}"),
                    "?" if lazy else str(tuple(param.shape)),
                    "?" if lazy else f"{param.numel():,}",
                    name,
                )
            )
    return Table(("name", "shape", "numel", "group"), tuple(rows), numeric=(2,))


def group_values(group: Mapping[str, Any]) -> torch.Tensor:
    """All of a group's weights as one flat float tensor on the host (whole tensors, also under FSDP2)."""
    pieces = []
    for param in group["params"]:
        whole = param.detach().full_tensor() if is_dtensor(param) else local(param.detach())
        pieces.append(whole.reshape(-1).float().cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0)
