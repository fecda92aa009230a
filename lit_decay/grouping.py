"""Parameter groups for Adam, and the report that explains them.

``plan`` validates the options and places every parameter once (``lit_decay.rules``); from that ``Plan``,
``param_groups`` makes plain dicts that ``torch.optim.Adam`` accepts as they are, and ``explain`` the same decisions
as a ``GroupingReport`` a human can read. ``lit_decay.configure_adam`` and ``lit_decay.add_param_groups`` start from
``plan`` too, so every entry point groups alike and checks its options in one place.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lit_decay._checks import check_bool, check_mode, check_non_negative, is_real_number
from lit_decay.modes import DECAY_MODES
from lit_decay.rules import (
    DECAY,
    NO_DECAY,
    GroupSettings,
    Layers,
    Placement,
    find_layers,
    numel,
    parse_overrides,
    place_parameters,
    unmatched_no_weight_decay,
    unwrap,
)


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


@dataclass(frozen=True, kw_only=True)
class GroupSummary(GroupSettings):
    """One group of a ``GroupingReport``: its ``GroupSettings``, how many tensors and elements it holds, and with
    layer-wise learning-rate decay its layer (else None)."""

    tensors: int
    numel: int
    layer: int | None = None


@dataclass(frozen=True)
class Table:
    """The cells of one table, drawn as aligned plain text (``text_lines``) or as markdown (``markdown_lines``).

    Each table of a ``GroupingReport`` is built once, as a ``Table``, so ``str(report)``, ``summary()`` and
    ``to_markdown()`` show the same cells. The ``numeric`` columns are right-aligned in text.

    Examples:
        >>> table = Table(("group", "tensors"), (("decay", "2"), ("no_decay", "10")), numeric=(1,))
        >>> for line in table.text_lines():
        ...     print(line)
        group     tensors
        decay           2
        no_decay       10
        >>> for line in table.markdown_lines():
        ...     print(line)
        | group | tensors |
        |---|---|
        | decay | 2 |
        | no_decay | 10 |
    """

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[int, ...] = ()

    def text_lines(self) -> list[str]:
        """The header and the rows, in columns two spaces apart."""
        lines = (self.header, *self.rows)
        widths = [max(len(line[column]) for line in lines) for column in range(len(self.header))]
        return [
            "  ".join(
                cell.rjust(width) if column in self.numeric else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(line, widths))
            ).rstrip()
            for line in lines
        ]

    def markdown_lines(self) -> list[str]:
        """The header, the separator and the rows, as a markdown table."""
        return [
            _markdown_line(self.header),
            "|" + "---|" * len(self.header),
            *(_markdown_line(row) for row in self.rows),
        ]


def _markdown_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@dataclass(frozen=True)
class GroupingReport:
    """Every grouping decision for a model: ``str(report)`` is a table, ``report.to_dict()`` is JSON-safe.

    With ``lr`` (the base learning rate given to ``explain`` or ``configure_adam``) the report also shows each
    group's learning rate and, for decoupled groups, the decay timescale τ = 1/(lr·wd). With ``layer_decay`` it says
    how the layers were found (``layering``), and its parameter table shows each tensor's layer and lr.
    ``unmatched_no_weight_decay`` lists the names a ``no_weight_decay()`` returned that match no parameter.

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
    lr: float | None = field(default=None)
    layering: str | None = field(default=None)
    unmatched_no_weight_decay: tuple[str, ...] = field(default=())

    def group_of(self, name: str) -> str:
        """The group of the parameter called ``name`` (its first name or any alias)."""
        for row in self.rows:
            if name == row.name or name in row.aliases:
                return row.group
        raise KeyError(f"{name!r} is not a trainable parameter of {self.model}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: ``model``, ``groups`` (each with its ``layer`` and ``lr``, None without them),
        ``parameters`` (rows), ``frozen``, ``implementation``, ``layering`` and ``unmatched_no_weight_decay``."""
        return {
            "model": self.model,
            "groups": [{**asdict(g), "lr": None if self.lr is None else g.scaled_lr(self.lr)} for g in self.groups],
            "parameters": [{**asdict(r), "shape": list(r.shape), "aliases": list(r.aliases)} for r in self.rows],
            "frozen": [{**asdict(r), "shape": list(r.shape)} for r in self.frozen],
            "implementation": self.implementation,
            "layering": self.layering,
            "unmatched_no_weight_decay": list(self.unmatched_no_weight_decay),
        }

    def group_table(self) -> Table:
        """One row per group: its name, mode, coefficient, lr_scale (blank if none), tensors and elements."""
        rows = tuple(
            (
                g.name,
                g.mode,
                f"{g.coefficient:g}",
                "" if g.lr_scale is None else f"{g.lr_scale:g}",
                str(g.tensors),
                f"{g.numel:,}",
            )
            for g in self.groups
        )
        return Table(("group", "mode", "coefficient", "lr_scale", "tensors", "elements"), rows, numeric=(4, 5))

    def lr_table(self) -> Table | None:
        """One row per group: its lr (the base lr times its lr_scale) and τ = 1/(lr·wd) in steps ("–" unless the
        group's decay is decoupled); None when the report has no base lr.

        Examples:
            >>> report = explain(nn.Sequential(nn.Linear(4, 4)), weight_decay=0.1, lr=1e-3)
            >>> report.lr_table().rows
            (('decay', '0.001', '10,000'), ('no_decay', '0.001', '–'))
        """
        if self.lr is None:
            return None
        rows = []
        for g in self.groups:
            tau = g.timescale(self.lr)
            rows.append((g.name, f"{g.scaled_lr(self.lr):g}", "–" if tau is None else f"{tau:,.0f}"))
        return Table(("group", "lr", "τ = 1/(lr·wd) (steps)"), tuple(rows), numeric=(2,))

    def parameter_table(self, *, with_frozen: bool = False) -> Table:
        """One row per trainable tensor: name, shape, numel, group and reason (with the names it is tied to), and
        with layer-wise lr decay its layer and lr; ``with_frozen`` adds the frozen ones, in group ``frozen``.

        Examples:
            >>> blocks = nn.Sequential(*(nn.Sequential(nn.Linear(2, 2, bias=False)) for _ in range(2)))
            >>> report = explain(nn.Sequential(blocks, nn.Linear(2, 1)), lr=1.0, layer_decay=0.5)
            >>> for line in report.parameter_table().text_lines():
            ...     print(line)
            name          shape   numel  group             layer    lr  reason
            0.0.0.weight  (2, 2)      4  layer_1.decay         1  0.25  ndim=2 weight
            0.1.0.weight  (2, 2)      4  layer_2.decay         2   0.5  ndim=2 weight
            1.weight      (1, 2)      2  layer_3.decay         3     1  ndim=2 weight
            1.bias        (1,)        1  layer_3.no_decay      3     1  bias
        """
        by_group = {g.name: g for g in self.groups}
        layered = any(g.layer is not None for g in self.groups)

        def layer_and_lr(group: str) -> tuple[str, ...]:
            if not layered:
                return ()
            summary = by_group[group]
            lr = "" if self.lr is None else f"{summary.scaled_lr(self.lr):g}"
            return ("" if summary.layer is None else str(summary.layer), lr)

        rows = [
            (r.name, _shape(r.shape), f"{r.numel:,}", r.group, *layer_and_lr(r.group), r.reason + _tied(r.aliases))
            for r in self.rows
        ]
        blank = ("", "") if layered else ()
        if with_frozen:
            rows += [
                (f.name, _shape(f.shape), f"{f.numel:,}", "frozen", *blank, "requires_grad=False") for f in self.frozen
            ]
        if layered:
            header = ("name", "shape", "numel", "group", "layer", "lr", "reason")
            return Table(header, tuple(rows), numeric=(2, 4, 5))
        return Table(("name", "shape", "numel", "group", "reason"), tuple(rows), numeric=(2,))

    def frozen_table(self) -> Table:
        """One row per frozen tensor: name, shape and numel."""
        rows = tuple((f.name, _shape(f.shape), f"{f.numel:,}") for f in self.frozen)
        return Table(("frozen (not in the optimizer)", "shape", "numel"), rows, numeric=(2,))

    def summary(self) -> str:
        """The header of ``__str__``: totals and one line per group, as nanoGPT prints them."""
        trainable = sum(r.numel for r in self.rows)
        lines = [
            f"{self.model}: {len(self.rows)} trainable tensors ({trainable:,} elements), "
            f"{len(self.frozen)} frozen ({sum(r.numel for r in self.frozen):,} elements)",
            *_indented(self.group_table().text_lines()),
        ]
        if self.layering:
            lines.append(self.layering)
        lr_table = self.lr_table()
        if lr_table is not None:
            lines += [self._lr_title(), *_indented(lr_table.text_lines())]
        return "\n".join(lines + self.notes())

    def __str__(self) -> str:
        parts = [self.summary(), "", *self.parameter_table().text_lines()]
        if self.frozen:
            parts += ["", *self.frozen_table().text_lines()]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        """The grouping as markdown tables (what the monitor writes to TensorBoard's text tab)."""
        lines = [f"**{self.model}**", "", *self.group_table().markdown_lines()]
        if self.layering:
            lines += ["", self.layering]
        lr_table = self.lr_table()
        if lr_table is not None:
            lines += ["", self._lr_title(), "", *lr_table.markdown_lines()]
        for note in self.notes():
            lines += ["", note]
        lines += ["", *self.parameter_table(with_frozen=True).markdown_lines()]
        return "\n".join(lines)

    def with_implementation(self, implementation: str) -> GroupingReport:
        """A copy that also names the Adam implementation (what ``lit_decay.configure_adam`` chose)."""
        return replace(self, implementation=implementation)

    def _lr_title(self) -> str:
        return f"Learning rates at base lr={self.lr:g}:"

    def notes(self) -> list[str]:
        """The lines under the group tables: the Adam implementation, and the tensors worth a second look."""
        notes = []
        if self.implementation:
            notes.append(f"Adam implementation: {self.implementation}")
        if self.norm_by_name:
            listed = ", ".join(self.norm_by_name[:5]) + (", ..." if len(self.norm_by_name) > 5 else "")
            notes.append(
                f"Check: {len(self.norm_by_name)} tensor(s) with ndim >= 2 kept out of decay only because their "
                f"module's class name contains 'Norm' ({listed}); add an override for any that is a weight matrix"
            )
        if self.unmatched_no_weight_decay:
            notes.append(
                "no_weight_decay() names matching no parameter (nothing is kept out of decay for them): "
                + ", ".join(self.unmatched_no_weight_decay)
            )
        return notes


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _tied(aliases: tuple[str, ...]) -> str:
    return f"; tied to {', '.join(aliases)}" if aliases else ""


def _indented(lines: Iterable[str]) -> list[str]:
    return ["  " + line for line in lines]


@dataclass(frozen=True)
class Plan:
    """What ``plan`` decided for one module, from which both the groups and the report are made.

    ``placements`` has one entry per trainable tensor (``lit_decay.rules.Placement``), ``frozen`` the
    ``(name, tensor)`` pairs left out, ``settings`` every group's settings in order (``"decay"``, ``"no_decay"``,
    then each override's group where first named; a group no tensor lands in is dropped from the output), ``lr``
    the validated base learning rate, or None, ``layers`` each parameter's layer with ``layer_decay`` (else None), and
    ``unmatched_no_weight_decay`` the ``no_weight_decay()`` names that match no parameter.

    With ``layers``, each of those groups is split by layer: group ``name`` of layer ``n`` becomes ``layer_n.name``,
    layer by layer, with ``lr_scale`` the layer's factor times the group's own.
    """

    model: str
    placements: tuple[Placement, ...]
    frozen: tuple[tuple[str, torch.Tensor], ...]
    settings: tuple[GroupSettings, ...]
    lr: float | None = None
    layers: Layers | None = None
    unmatched_no_weight_decay: tuple[str, ...] = ()

    def groups(self) -> list[dict[str, Any]]:
        """The param-group dicts (see ``param_groups``)."""
        groups: list[dict[str, Any]] = []
        for settings, layer, members in self._members():
            group: dict[str, Any] = {
                "name": settings.name,
                "params": [(p.name, p.tensor) for p in members],
                "decay_mode": settings.mode,
                # A "none" group decays nothing: 0, so that any optimizer reading torch's key agrees.
                "weight_decay": settings.coefficient if DECAY_MODES[settings.mode].decays else 0.0,
                "decoupled_weight_decay": DECAY_MODES[settings.mode].torch_term == "decoupled",
            }
            if layer is not None:
                group["layer"] = layer
            if settings.lr_scale is not None:
                group["lr_scale"] = settings.lr_scale
                if self.lr is not None:
                    group["lr"] = settings.scaled_lr(self.lr)
                elif settings.lr_scale != 1.0:
                    warnings.warn(
                        f"override group {settings.name!r} has lr_scale={settings.lr_scale:g} but param_groups() got "
                        "no lr, so the optimizer's default lr applies unscaled; pass lr= (configure_adam does)",
                        UserWarning,
                        stacklevel=3,
                    )
            groups.append(group)
        check_partition(groups, ((p.name, p.tensor) for p in self.placements))
        return groups

    def report(self) -> GroupingReport:
        """The ``GroupingReport`` (see ``explain``)."""
        members = self._members()
        group_of = {id(p.tensor): settings.name for settings, _, placed in members for p in placed}
        rows = tuple(
            ParameterRow(p.name, tuple(p.tensor.shape), numel(p.tensor), group_of[id(p.tensor)], p.reason, p.aliases)
            for p in self.placements
        )
        summaries = tuple(
            GroupSummary(
                **asdict(settings), tensors=len(placed), numel=sum(numel(p.tensor) for p in placed), layer=layer
            )
            for settings, layer, placed in members
        )
        frozen = tuple(FrozenRow(name, tuple(t.shape), numel(t)) for name, t in self.frozen)
        norm_by_name = tuple(p.name for p in self.placements if p.norm_by_name)
        return GroupingReport(
            self.model,
            rows,
            frozen,
            summaries,
            norm_by_name=norm_by_name,
            lr=self.lr,
            layering=None if self.layers is None else self.layers.describe(),
            unmatched_no_weight_decay=self.unmatched_no_weight_decay,
        )

    def _members(self) -> list[tuple[GroupSettings, int | None, list[Placement]]]:
        """Each group that holds at least one tensor, with its layer (None without layer decay) and placements: in
        the order of ``settings``, or layer by layer and within a layer in that order."""
        if self.layers is None:
            members: dict[str, list[Placement]] = {settings.name: [] for settings in self.settings}
            for placement in self.placements:
                members[placement.group].append(placement)
            return [(settings, None, members[settings.name]) for settings in self.settings if members[settings.name]]
        layers = self.layers
        by_layer: dict[tuple[int, str], list[Placement]] = {}
        for placement in self.placements:
            # A tied tensor takes the layer of its first name.
            by_layer.setdefault((layers.of_name[placement.name], placement.group), []).append(placement)
        found: list[tuple[GroupSettings, int | None, list[Placement]]] = []
        for layer in sorted({layer for layer, _ in by_layer}):
            for settings in self.settings:
                placed = by_layer.get((layer, settings.name))
                if placed:
                    scale = layers.factor(layer) * (1.0 if settings.lr_scale is None else settings.lr_scale)
                    layered = replace(settings, name=f"layer_{layer}.{settings.name}", lr_scale=scale)
                    found.append((layered, layer, placed))
        return found


@dataclass(frozen=True)
class GroupingOptions:
    """The grouping options of ``param_groups`` (and ``explain``, ``lit_decay.configure_adam``,
    ``lit_decay.add_param_groups``), as the user gave them: ``plan`` checks them.

    The fields keep their order (``layer_decay`` came last), so positional construction stays valid.
    """

    weight_decay: float
    mode: str = "decoupled"
    exclude_embeddings: bool = False
    exclude_1d: bool = True
    overrides: Iterable[Mapping[str, Any]] | None = ()
    lr: float | None = None
    layer_decay: float | None = None


def check_layer_decay(layer_decay: Any, lr: float | None) -> float | None:
    """Return ``layer_decay`` as a float in (0, 1], or None; raise naming it if it is not one, or if there is no
    ``lr`` to scale.

    Examples:
        >>> check_layer_decay(0.75, lr=1e-3), check_layer_decay(None, lr=None)
        (0.75, None)
        >>> check_layer_decay(1.5, lr=1e-3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: layer_decay must be a number in (0, 1] (each layer's lr is layer_decay times the next ...; got 1.5
    """
    if layer_decay is None:
        return None
    valid = "a number in (0, 1] (each layer's lr is layer_decay times the next one's, e.g. 0.75)"
    if not is_real_number(layer_decay):
        raise TypeError(f"layer_decay must be {valid}; got {layer_decay!r} of type {type(layer_decay).__name__}")
    if not 0.0 < layer_decay <= 1.0:  # NaN fails this too
        raise ValueError(f"layer_decay must be {valid}; got {layer_decay!r}")
    if lr is None:
        raise ValueError(
            f"layer_decay={layer_decay!r} needs lr=, the base learning rate each layer's lr is scaled from "
            "(configure_adam passes its own)"
        )
    return float(layer_decay)


def plan(module: nn.Module, options: GroupingOptions) -> Plan:
    """Validate the grouping options and place every parameter of ``module``: the one walk behind ``param_groups``,
    ``explain``, ``lit_decay.configure_adam`` and ``lit_decay.add_param_groups``.

    Every option is checked here, once, and a bad one raises naming it before any group is made (``TypeError`` for a
    wrong type, ``ValueError`` for a wrong value).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> head = {"pattern": "2.*", "name": "head"}
        >>> grouping = plan(model, GroupingOptions(weight_decay=0.1, overrides=[head], lr=1e-3))
        >>> [(s.name, s.mode, s.coefficient) for s in grouping.settings]
        [('decay', 'decoupled', 0.1), ('no_decay', 'none', 0.0), ('head', 'decoupled', 0.1)]
        >>> [g["name"] for g in grouping.groups()] == [g.name for g in grouping.report().groups]
        True
    """
    lr = None if options.lr is None else check_non_negative("lr", options.lr)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a LightningModule is one); got {type(module).__name__}")
    decay = GroupSettings(DECAY, check_mode(options.mode), check_non_negative("weight_decay", options.weight_decay))
    parsed = parse_overrides(options.overrides, mode=decay.mode, weight_decay=decay.coefficient)
    layer_decay = check_layer_decay(options.layer_decay, lr)
    placements, frozen = place_parameters(
        module,
        overrides=parsed,
        exclude_embeddings=check_bool("exclude_embeddings", options.exclude_embeddings),
        exclude_1d=check_bool("exclude_1d", options.exclude_1d),
    )
    model = type(unwrap(module)).__name__
    if not placements:
        listed = ", ".join(name for name, _ in frozen[:5]) + (", ..." if len(frozen) > 5 else "")
        detail = f"all {len(frozen)} are frozen (requires_grad=False): {listed}" if frozen else "it has none at all"
        raise ValueError(f"{model} has no trainable parameters to optimize: {detail}")
    # Two overrides may name one group (parse_overrides made sure they agree): it is listed once, where first named.
    settings = {DECAY: decay, NO_DECAY: GroupSettings(NO_DECAY, "none", 0.0)}
    for override in parsed:
        settings.setdefault(override.name, override.settings)
    layers = None if layer_decay is None else find_layers(module, decay=layer_decay)
    unmatched = unmatched_no_weight_decay(module)
    return Plan(model, tuple(placements), tuple(frozen), tuple(settings.values()), lr, layers, unmatched)


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
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Adam parameter groups for ``module``: weights decayed, biases, norms and other no-decay parameters not.

    Returns plain dicts that ``torch.optim.Adam`` accepts as they are: ``"name"``, ``"params"`` as ``(name, tensor)``
    pairs, ``"decay_mode"``, ``"weight_decay"`` (the group's strength in every mode) and torch's
    ``"decoupled_weight_decay"``. ``l2`` and ``decoupled`` groups mean the same in any torch Adam; the L1 modes need
    ``lit_decay.Adam`` (torch alone would read their strength as L2).

    Args:
        module: any ``nn.Module`` (a LightningModule, or a model wrapped by DDP/FSDP/``torch.compile``).
        weight_decay: the decay coefficient of the ``"decay"`` group.
        mode: ``"l2"``, ``"decoupled"``, ``"l1"``, ``"decoupled_l1"`` or ``"none"``.
        exclude_embeddings: keep ``nn.Embedding``/``nn.EmbeddingBag`` tables out of decay.
        exclude_1d: keep other parameters with ``ndim <= 1`` out of decay.
        overrides: ordered dicts with ``"pattern"`` (fnmatch on dotted names) and optional ``"name"``,
            ``"weight_decay"``, ``"lr_scale"`` and ``"mode"``; the first matching override takes the parameter.
        lr: the base learning rate; groups of overrides with ``lr_scale`` get ``"lr": lr * lr_scale``.
        layer_decay: layer-wise learning-rate decay, a float in (0, 1] (needs ``lr``), as timm's ``layer_decay``
            (the BEiT and ELECTRA fine-tuning recipes). The repeated blocks are found from the module tree; the
            embeddings before them are layer 0, block ``i`` is layer ``i + 1``, the final norm and head after them
            layer ``L + 1``, and each group's lr is ``lr * layer_decay ** (L + 1 - layer)`` (times an override's
            ``lr_scale``). Groups are split by layer, named ``layer_{n}.decay``, ``layer_{n}.no_decay``, ...; each
            has its ``"layer"``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> head = {"pattern": "2.*", "name": "head", "lr_scale": 10}
        >>> groups = param_groups(model, weight_decay=0.1, overrides=[head], lr=1e-3)
        >>> [(g["name"], [n for n, _ in g["params"]]) for g in groups]
        [('decay', ['0.weight']), ('no_decay', ['0.bias', '1.weight', '1.bias']), ('head', ['2.weight', '2.bias'])]
        >>> groups[2]["lr"]
        0.01
        >>> optimizer = torch.optim.Adam(groups, lr=1e-3)

        With layer-wise learning-rate decay, over a model whose blocks are ``blocks.0`` and ``blocks.1``:

        >>> model = nn.ModuleDict(
        ...     {"blocks": nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2)), "head": nn.Linear(8, 2)}
        ... )
        >>> groups = param_groups(model, weight_decay=0.1, lr=1e-3, layer_decay=0.5)
        >>> [(g["name"], g["layer"], g["lr"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
        [('layer_1.decay', 1, 0.00025), ('layer_1.no_decay', 1, 0.00025), ('layer_2.decay', 2, 0.0005),
         ('layer_2.no_decay', 2, 0.0005), ('layer_3.decay', 3, 0.001), ('layer_3.no_decay', 3, 0.001)]
    """
    options = GroupingOptions(weight_decay, mode, exclude_embeddings, exclude_1d, overrides, lr, layer_decay)
    return plan(module, options).groups()


def explain(
    module: nn.Module,
    *,
    weight_decay: float = 0.01,
    mode: str = "decoupled",
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
    lr: float | None = None,
    layer_decay: float | None = None,
) -> GroupingReport:
    """Explain how ``param_groups`` would group ``module``'s parameters (same options), one row per tensor.

    ``weight_decay`` defaults to ``configure_adam``'s (AdamW's 0.01), so ``explain(model)`` shows what
    ``configure_adam(model)`` does. With ``layer_decay`` the table also shows each tensor's layer and lr.

    With ``lr``, the base learning rate, the report also shows each group's learning rate (``lr * lr_scale``) and,
    for a decoupled group, its decay timescale τ = 1/(lr·wd) in optimizer steps: the weights forget their past over
    about τ steps, so a τ longer than the run means the decay barely acts (``GroupingReport.lr_table``).

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
        >>> print(explain(model, weight_decay=0.1, lr=1e-3).summary())  # doctest: +NORMALIZE_WHITESPACE
        Sequential: 1 trainable tensors (40 elements), 0 frozen (0 elements)
          group  mode       coefficient  lr_scale  tensors  elements
          decay  decoupled  0.1                          1        40
        Learning rates at base lr=0.001:
          group  lr     τ = 1/(lr·wd) (steps)
          decay  0.001                 10,000
    """
    options = GroupingOptions(weight_decay, mode, exclude_embeddings, exclude_1d, overrides, lr, layer_decay)
    return plan(module, options).report()


def show(summary: str) -> None:
    """Show a grouping summary on rank zero: through Lightning's logger where Lightning is in use (its channel for
    the model summary), else printed, so that a plain PyTorch loop does not import Lightning at its first step.

    Examples:
        >>> show("lit_decay: Sequential: 2 trainable tensors (6 elements), 0 frozen (0 elements)")  # doctest: +SKIP
    """
    if "lightning.pytorch" in sys.modules:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(summary)
        return
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        print(summary)
