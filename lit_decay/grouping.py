"""Parameter groups for Adam, and the report that explains them.

``param_groups`` turns the placements of ``lit_decay.rules`` into plain dicts that ``torch.optim.Adam``
accepts as they are; ``explain`` returns the same decisions as a ``GroupingReport`` a human can read.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lit_decay._checks import check_bool, check_mode, check_non_negative
from lit_decay.modes import torch_decay_keys
from lit_decay.rules import DECAY, NO_DECAY, Override, Placement, numel, parse_overrides, place_parameters, unwrap


@dataclass(frozen=True)
class ParameterRow:
    """One trainable tensor in a ``GroupingReport``."""

    name: str
    shape: tuple[int, ...]
    numel: int
    group: str
    reason: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FrozenRow:
    """One frozen (``requires_grad=False``) tensor, listed apart: it is in no group."""

    name: str
    shape: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class GroupSummary:
    """One group's settings and size."""

    name: str
    mode: str
    coefficient: float
    tensors: int
    numel: int
    lr_scale: float | None = None


@dataclass(frozen=True)
class GroupingReport:
    """Every grouping decision for a model: ``str(report)`` is a table, ``report.to_dict()`` is JSON-safe.

    Examples:
        >>> report = explain(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), weight_decay=0.1)
        >>> [(row.name, row.group, row.reason) for row in report.rows][:2]
        [('0.weight', 'decay', 'ndim=2 weight'), ('0.bias', 'no_decay', 'bias')]
        >>> sorted(report.to_dict()["parameters"][0])
        ['aliases', 'group', 'name', 'numel', 'reason', 'shape']
    """

    model: str
    rows: tuple[ParameterRow, ...]
    frozen: tuple[FrozenRow, ...]
    groups: tuple[GroupSummary, ...]
    implementation: str | None = field(default=None)
    # Tensors with ndim >= 2 kept out of decay only because their module's class name contains "Norm".
    norm_by_name: tuple[str, ...] = field(default=())

    def group_of(self, name: str) -> str:
        """The group of the parameter called ``name`` (its first name or any alias)."""
        for row in self.rows:
            if name == row.name or name in row.aliases:
                return row.group
        raise KeyError(f"{name!r} is not a trainable parameter of {self.model}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: ``model``, ``groups``, ``parameters`` (rows), ``frozen`` and ``implementation``."""
        return {
            "model": self.model,
            "groups": [asdict(g) for g in self.groups],
            "parameters": [{**asdict(r), "shape": list(r.shape), "aliases": list(r.aliases)} for r in self.rows],
            "frozen": [{**asdict(r), "shape": list(r.shape)} for r in self.frozen],
            "implementation": self.implementation,
        }

    def summary(self) -> str:
        """The header of ``__str__``: totals and one line per group, as nanoGPT prints them."""
        trainable = sum(r.numel for r in self.rows)
        lines = [
            f"{self.model}: {len(self.rows)} trainable tensors ({trainable:,} elements), "
            f"{len(self.frozen)} frozen ({sum(r.numel for r in self.frozen):,} elements)"
        ]
        table = [("group", "mode", "coefficient", "lr_scale", "tensors", "elements")]
        for g in self.groups:
            scale = "" if g.lr_scale is None else f"{g.lr_scale:g}"
            table.append((g.name, g.mode, f"{g.coefficient:g}", scale, str(g.tensors), f"{g.numel:,}"))
        lines += ["  " + line for line in _format_table(table, right=(4, 5))]
        if self.implementation:
            lines.append(f"Adam implementation: {self.implementation}")
        if self.norm_by_name:
            lines.append(self._norm_by_name_note())
        return "\n".join(lines)

    def _norm_by_name_note(self) -> str:
        listed = ", ".join(self.norm_by_name[:5]) + (", ..." if len(self.norm_by_name) > 5 else "")
        return (
            f"Check: {len(self.norm_by_name)} tensor(s) with ndim >= 2 kept out of decay only because their module's "
            f"class name contains 'Norm' ({listed}); add an override for any that is a weight matrix"
        )

    def __str__(self) -> str:
        table = [("name", "shape", "numel", "group", "reason")]
        for r in self.rows:
            reason = r.reason + (f"; tied to {', '.join(r.aliases)}" if r.aliases else "")
            table.append((r.name, _shape(r.shape), f"{r.numel:,}", r.group, reason))
        parts = [self.summary(), "", *_format_table(table, right=(2,))]
        if self.frozen:
            frozen = [("frozen (not in the optimizer)", "shape", "numel")]
            frozen += [(r.name, _shape(r.shape), f"{r.numel:,}") for r in self.frozen]
            parts += ["", *_format_table(frozen, right=(2,))]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        """The grouping as a markdown table (what the monitor writes to TensorBoard's text tab)."""
        lines = [
            f"**{self.model}**",
            "",
            "| group | mode | coefficient | lr_scale | tensors | elements |",
            "|---|---|---|---|---|---|",
        ]
        for g in self.groups:
            scale = "" if g.lr_scale is None else f"{g.lr_scale:g}"
            lines.append(f"| {g.name} | {g.mode} | {g.coefficient:g} | {scale} | {g.tensors} | {g.numel:,} |")
        if self.implementation:
            lines += ["", f"Adam implementation: {self.implementation}"]
        if self.norm_by_name:
            lines += ["", self._norm_by_name_note()]
        lines += ["", "| name | shape | numel | group | reason |", "|---|---|---|---|---|"]
        for r in self.rows:
            reason = r.reason + (f"; tied to {', '.join(r.aliases)}" if r.aliases else "")
            lines.append(f"| {r.name} | {_shape(r.shape)} | {r.numel:,} | {r.group} | {reason} |")
        for f in self.frozen:
            lines.append(f"| {f.name} | {_shape(f.shape)} | {f.numel:,} | frozen | requires_grad=False |")
        return "\n".join(lines)

    def with_implementation(self, implementation: str) -> GroupingReport:
        """A copy that also names the Adam implementation (what ``lit_decay.configure_adam`` chose)."""
        return replace(self, implementation=implementation)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _format_table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


@dataclass(frozen=True)
class Plan:
    """Validated options and placements, from which both the groups and the report are made (one walk of the model)."""

    model: str
    placements: list[Placement]
    frozen: list[tuple[str, torch.Tensor]]
    order: list[str]
    settings: dict[str, dict[str, Any]]

    def groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """The param-group dicts (see ``param_groups``)."""
        members: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in self.order}
        for placement in self.placements:
            members[placement.group].append((placement.name, placement.tensor))
        groups: list[dict[str, Any]] = []
        for name in self.order:
            if not members[name]:
                continue
            s = self.settings[name]
            group: dict[str, Any] = {
                "name": name,
                "params": members[name],
                "decay_mode": s["mode"],
                "decay_coefficient": s["coefficient"],
                **torch_decay_keys(s["mode"], s["coefficient"]),
            }
            if s["lr_scale"] is not None:
                group["lr_scale"] = s["lr_scale"]
                if lr is not None:
                    group["lr"] = lr * s["lr_scale"]
                elif s["lr_scale"] != 1.0:
                    warnings.warn(
                        f"override group {name!r} has lr_scale={s['lr_scale']:g} but param_groups() got no lr, so the "
                        "optimizer's default lr applies unscaled; pass lr= (configure_adam does)",
                        UserWarning,
                        stacklevel=3,
                    )
            groups.append(group)
        check_partition(groups, ((p.name, p.tensor) for p in self.placements))
        return groups

    def report(self) -> GroupingReport:
        """The ``GroupingReport`` (see ``explain``)."""
        rows = tuple(
            ParameterRow(p.name, tuple(p.tensor.shape), numel(p.tensor), p.group, p.reason, p.aliases)
            for p in self.placements
        )
        summaries = []
        for name in self.order:
            members = [r for r in rows if r.group == name]
            if members:
                s = self.settings[name]
                summaries.append(
                    GroupSummary(
                        name, s["mode"], s["coefficient"], len(members), sum(r.numel for r in members), s["lr_scale"]
                    )
                )
        frozen = tuple(FrozenRow(name, tuple(t.shape), numel(t)) for name, t in self.frozen)
        norm_by_name = tuple(p.name for p in self.placements if p.norm_by_name)
        return GroupingReport(self.model, rows, frozen, tuple(summaries), norm_by_name=norm_by_name)


def plan(
    module: nn.Module,
    *,
    weight_decay: float,
    mode: str,
    exclude_embeddings: bool,
    exclude_1d: bool,
    overrides: Iterable[Mapping[str, Any]] | None,
) -> Plan:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a LightningModule is one); got {type(module).__name__}")
    weight_decay = check_non_negative("weight_decay", weight_decay)
    mode = check_mode(mode)
    parsed: tuple[Override, ...] = parse_overrides(overrides)
    placements, frozen = place_parameters(
        module,
        overrides=parsed,
        exclude_embeddings=check_bool("exclude_embeddings", exclude_embeddings),
        exclude_1d=check_bool("exclude_1d", exclude_1d),
    )
    model = type(unwrap(module)).__name__
    if not placements:
        listed = ", ".join(name for name, _ in frozen[:5]) + (", ..." if len(frozen) > 5 else "")
        detail = f"all {len(frozen)} are frozen (requires_grad=False): {listed}" if frozen else "it has none at all"
        raise ValueError(f"{model} has no trainable parameters to optimize: {detail}")

    settings: dict[str, dict[str, Any]] = {
        DECAY: {"mode": mode, "coefficient": weight_decay, "lr_scale": None},
        NO_DECAY: {"mode": "none", "coefficient": 0.0, "lr_scale": None},
    }
    order = [DECAY, NO_DECAY]
    for override in parsed:
        if override.name not in settings:
            order.append(override.name)
            settings[override.name] = {
                "mode": override.mode or mode,
                "coefficient": weight_decay if override.weight_decay is None else override.weight_decay,
                "lr_scale": override.lr_scale,
            }
    return Plan(model, placements, frozen, order, settings)


def check_partition(groups: Sequence[Mapping[str, Any]], trainable: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ``RuntimeError`` naming the offenders unless every trainable tensor is in exactly one group.

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> check_partition([{"name": "all", "params": list(layer.named_parameters())}], layer.named_parameters())
    """
    seen: dict[int, str] = {}
    duplicated: list[str] = []
    for group in groups:
        for name, tensor in group["params"]:
            if id(tensor) in seen:
                duplicated.append(f"{name} (in {seen[id(tensor)]!r} and {group['name']!r})")
            seen[id(tensor)] = group["name"]
    missing = [name for name, tensor in trainable if id(tensor) not in seen]
    if duplicated or missing:
        raise RuntimeError(
            "parameter grouping is not a partition of the trainable parameters: "
            + "; ".join(
                part
                for part in (
                    f"in several groups: {', '.join(duplicated)}" if duplicated else "",
                    f"in no group: {', '.join(missing)}" if missing else "",
                )
                if part
            )
        )


def param_groups(
    module: nn.Module,
    *,
    weight_decay: float,
    mode: str = "decoupled",
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Adam parameter groups for ``module``: weights decayed, biases, norms and other no-decay parameters not.

    Returns plain dicts that ``torch.optim.Adam`` accepts as they are: ``"name"``, ``"params"`` as ``(name, tensor)``
    pairs, ``"decay_mode"``, ``"decay_coefficient"`` and torch's ``"weight_decay"`` / ``"decoupled_weight_decay"``.
    Torch applies no L1 term by itself; ``lit_decay.configure_adam`` is what attaches it to the L1 modes.

    Args:
        module: any ``nn.Module`` (a LightningModule, or a model wrapped by DDP/FSDP/``torch.compile``).
        weight_decay: the decay coefficient of the ``"decay"`` group.
        mode: ``"l2"``, ``"decoupled"``, ``"l1"``, ``"decoupled_l1"`` or ``"none"``.
        exclude_embeddings: keep ``nn.Embedding``/``nn.EmbeddingBag`` tables out of decay.
        exclude_1d: keep other parameters with ``ndim <= 1`` out of decay.
        overrides: ordered dicts with ``"pattern"`` (fnmatch on dotted names) and optional ``"name"``,
            ``"weight_decay"``, ``"lr_scale"`` and ``"mode"``; the first matching override takes the parameter.
        lr: the base learning rate; groups of overrides with ``lr_scale`` get ``"lr": lr * lr_scale``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> head = {"pattern": "2.*", "name": "head", "lr_scale": 10}
        >>> groups = param_groups(model, weight_decay=0.1, overrides=[head], lr=1e-3)
        >>> [(g["name"], [n for n, _ in g["params"]]) for g in groups]
        [('decay', ['0.weight']), ('no_decay', ['0.bias', '1.weight', '1.bias']), ('head', ['2.weight', '2.bias'])]
        >>> groups[2]["lr"]
        0.01
        >>> optimizer = torch.optim.Adam(groups, lr=1e-3)
    """
    if lr is not None:
        lr = check_non_negative("lr", lr)
    return plan(
        module,
        weight_decay=weight_decay,
        mode=mode,
        exclude_embeddings=exclude_embeddings,
        exclude_1d=exclude_1d,
        overrides=overrides,
    ).groups(lr)


def explain(
    module: nn.Module,
    *,
    weight_decay: float = 0.0,
    mode: str = "decoupled",
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
    lr: float | None = None,
) -> GroupingReport:
    """Explain how ``param_groups`` would group ``module``'s parameters (same options), one row per tensor.

    Examples:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> model[1].weight = model[0].weight  # tied output head
        >>> row = explain(model, weight_decay=0.1, exclude_embeddings=True).rows[0]
        >>> row.name, row.group, row.reason, row.aliases
        ('0.weight', 'no_decay', 'embedding (exclude_embeddings=True)', ('1.weight',))
        >>> print(explain(model, weight_decay=0.1))  # doctest: +NORMALIZE_WHITESPACE
        Sequential: 1 trainable tensors (40 elements), 0 frozen (0 elements)
          group  mode       coefficient  lr_scale  tensors  elements
          decay  decoupled  0.1                          1        40
        <BLANKLINE>
        name      shape    numel  group  reason
        0.weight  (10, 4)     40  decay  embedding; tied to 1.weight
    """
    if lr is not None:
        check_non_negative("lr", lr)
    return plan(
        module,
        weight_decay=weight_decay,
        mode=mode,
        exclude_embeddings=exclude_embeddings,
        exclude_1d=exclude_1d,
        overrides=overrides,
    ).report()
