"""Per-group figures of what weight decay is doing, as plain tensor functions usable without Lightning.

For each param group, right after ``optimizer.step()``:

- ``weight_norm`` ‖w‖₂, ``grad_norm`` ‖g‖₂ (the gradient the optimizer used, unscaled, after clipping; for ``l1``
  groups it includes the penalty's ``wd·sign(w)``, since that is what Adam was given),
- ``update_ratio`` ‖Δw‖₂/‖w‖₂,
- ``effective_decay`` d = −⟨Δw_reg, w⟩/‖w‖², the fraction of the weight norm the penalty removes per step,
- ``decay_timescale`` 1/d in steps (absent when d = 0), and ``sparsity`` (L1 groups),
- ``equilibrium``: ``update_ratio`` over its value at rotational equilibrium (``lit_decay.diagnostics``), for
  ``decoupled`` groups of Adam/AdamW and SGD groups with plain momentum.

``decay_progress`` (Σ η·λ over all steps so far) is a count across steps, kept by ``WeightDecayMonitor``.

Every figure of a tensor comes from one pass that reads its weights, gradient and Adam moments once (for large
tensors a compiled kernel, one call per run of same-shaped tensors), the update is read from Adam's state rather
than from a copy of the weights, and all groups of all optimizers leave the device in a single transfer. Only where
the update cannot be read from the state (``decoupled_l1``, low-precision weights, optimizers other than Adam) is a
snapshot taken before the step, on logging steps alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lit_decay._tensors import is_dtensor, local
from lit_decay.diagnostics import equilibrium_factor
from lit_decay.modes import Penalty, Rule, group_names, group_rule
from lit_decay.penalties import is_attached, observe_proximal_step
from lit_decay.step_sums import COLUMNS, Block, StepContext, gather, group_sums, update_from_state
from lit_decay.tags import tag

METRICS: tuple[str, ...] = (
    "weight_norm",
    "grad_norm",
    "update_ratio",
    "effective_decay",
    "decay_timescale",
    "sparsity",
    "equilibrium",
    "decay_progress",
)
PER_PARAMETER_METRICS: tuple[str, ...] = ("weight_norm", "grad_norm", "update_ratio", "equilibrium")
# Counted by the monitor at every optimizer step (lit_decay.diagnostics.DecayProgress), not measured on logging steps.
COUNTED_METRICS = frozenset({"decay_progress"})


def check_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """``metrics`` as a tuple in canonical order (all of them for None), or raise naming the unknown ones.

    Examples:
        >>> check_metrics(["sparsity", "weight_norm"])
        ('weight_norm', 'sparsity')
    """
    if metrics is None:
        return METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = list(metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; valid metrics are {', '.join(METRICS)}")
    if not chosen:
        raise ValueError(f"metrics is empty; choose some of {', '.join(METRICS)} (or None for all)")
    return tuple(m for m in METRICS if m in chosen)


@dataclass
class _MeasuredGroup:
    """One group's place in the table of a logging step, and what turns its sums into figures."""

    name: str
    rule: Rule
    lr: float | None  # None: a tensor lr, read from the group's header row
    header: int | None  # row holding [lr, found_inf] when either is a tensor (they leave the device with the sums)
    rows: list[int]  # the rows whose sum is the group's
    parameter_rows: list[int] | None  # each tensor's row, in the group's order (None where only totals were taken)
    numels: list[int]
    has_update: bool
    param_names: list[str]


@dataclass
class _Pending:
    """Rows of sums of one logging step, on device, and the groups they belong to."""

    blocks: list[torch.Tensor] = field(default_factory=list)  # [k, len(COLUMNS)] each, stacked into one table
    count: int = 0  # rows so far
    groups: list[_MeasuredGroup] = field(default_factory=list)
    # rows that come from DTensor shards, by the process groups their partial sums must be reduced over
    sharded: dict[tuple[Any, ...], list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, block: torch.Tensor) -> int:
        """Append ``block``'s rows to the table; the index of its first row."""
        self.blocks.append(block)
        self.count += block.shape[0]
        return self.count - block.shape[0]

    def add_header(self, lr: float | torch.Tensor, found_inf: torch.Tensor | None) -> int | None:
        """A row ``[lr, found_inf, 0...]`` where either is a tensor (capturable or device-scheduled lr, the grad
        scaler's verdict): they leave the device with the sums. None where both are known on the host."""
        if not isinstance(lr, torch.Tensor) and found_inf is None:
            return None
        values = [torch.as_tensor(lr).detach().reshape(()), torch.zeros(()) if found_inf is None else found_inf]
        device = values[0].device if isinstance(lr, torch.Tensor) else values[1].device
        row = torch.stack([v.to(device, torch.float64, non_blocking=True).reshape(()) for v in values])
        return self.add(torch.cat([row, torch.zeros(len(COLUMNS) - 2, dtype=row.dtype, device=device)])[None])

    def add_blocks(self, params: Sequence[torch.Tensor], blocks: Sequence[Block]) -> tuple[list[int], list[int] | None]:
        """Append a group's blocks: the rows whose sum is the group's, and each tensor's row (None where a block holds
        only totals). Rows of DTensor shards are noted for the reduction across their process groups."""
        rows: list[int] = []
        parameter_rows: list[int] | None = [0] * len(params)
        for block in blocks:
            first = self.add(block.rows)
            rows += range(first, first + block.rows.shape[0])
            if not block.per_tensor:
                parameter_rows = None
            elif parameter_rows is not None:
                for offset, index in enumerate(block.indices):
                    parameter_rows[index] = first + offset
        if parameter_rows is not None:
            for index, param in enumerate(params):
                if is_dtensor(param):
                    self.sharded[_shard_groups(param)].append(parameter_rows[index])
        return rows, parameter_rows


def _step_context(
    optimizer: Optimizer,
    group: Mapping[str, Any],
    rule: Rule,
    *,
    threshold: float | torch.Tensor | None,
    per_tensor: bool,
) -> StepContext:
    """The step's scalars for ``group``: lr·wd, eps, and what a grad scaler on a fused optimizer left behind."""
    found_inf = getattr(optimizer, "found_inf", None)
    grad_scale = getattr(optimizer, "grad_scale", None)
    grad_factor = None
    if grad_scale is not None and found_inf is not None:
        # The fused kernel unscales gradients in place, except on a step it skips.
        grad_factor = torch.where(found_inf > 0, 1.0 / grad_scale, torch.ones_like(grad_scale))
    return StepContext(
        rule=rule,
        decay=group["lr"] * rule.coefficient,
        eps=float(group.get("eps", 0.0)),
        keep=None if found_inf is None else 1.0 - found_inf.float(),
        grad_factor=grad_factor,
        threshold=threshold,
        count_zeros=rule.l1,
        per_tensor=per_tensor,
    )


def _shard_groups(tensor: torch.Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's per-shard sums add up to the whole tensor's."""
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return tuple(mesh.get_group(dim) for dim, p in enumerate(tensor.placements) if p.is_shard())  # type: ignore[attr-defined]


class StepStatistics:
    """Takes the figures of one or more optimizers right after their steps; ``collect`` turns them into floats
    with a single device-to-host transfer.

    Hooked (``attach``, then ``arm`` before each step to measure and ``collect`` after it), it measures from the
    optimizers' own step hooks, and for ``decoupled_l1`` groups just before lit_decay's proximal step, so that every
    update is read from Adam's state. ``lit_decay.WeightDecayMonitor`` works this way. By hand, call ``before_step``
    before ``optimizer.step()`` (it snapshots the weights of groups whose update cannot be read from Adam's state),
    ``after_step`` right after it, and ``collect``.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
        >>> statistics = StepStatistics([optimizer])
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> statistics.before_step(optimizer); optimizer.step(); statistics.after_step(optimizer)
        >>> figures = statistics.collect()
        >>> round(figures["effective_decay/pg1"], 6)
        0.001
        >>> statistics.attach(); statistics.arm()  # or let the optimizer's hooks do it
        >>> optimizer.step()
        >>> sorted(statistics.collect())[:2]
        ['decay_timescale/pg1', 'effective_decay/pg1']
        >>> statistics.detach()
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        *,
        metrics: Iterable[str] | None = None,
        per_parameter: bool = False,
        parameter_names: Mapping[int, str] | None = None,
    ) -> None:
        self.optimizers = list(optimizers)
        self.metrics = check_metrics(metrics)
        self.per_parameter = per_parameter
        self.names = group_names(self.optimizers)
        self._parameter_names = dict(parameter_names or {})
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self._measured: set[int] = set()  # groups measured before their proximal step, during the current step
        self._pending = _Pending()
        #: Names of the groups whose step a grad scaler skipped, as of the last ``collect``.
        self.skipped: frozenset[str] = frozenset()
        self._handles: list[Any] = []
        self._armed = False

    # ---- hooked use --------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register step hooks (and proximal-step observers) on every optimizer; they measure while armed."""
        self.detach()
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))
            handle = observe_proximal_step(optimizer, self._before_proximal_step)
            if handle is not None:
                self._handles.append(handle)

    def detach(self) -> None:
        """Remove the hooks ``attach`` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def arm(self) -> None:
        """Measure the optimizer steps from now until ``collect``. An unarmed hook does no tensor work at all."""
        self._armed = True

    @property
    def attached(self) -> bool:
        """Whether ``attach`` registered hooks (and they were not removed since)."""
        return bool(self._handles)

    @property
    def armed(self) -> bool:
        """Whether the hooks measure the coming steps (between ``arm`` and ``collect``)."""
        return self._armed

    def _pre_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._armed:
            self.before_step(optimizer)

    def _post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._armed:
            self.after_step(optimizer)

    def _before_proximal_step(
        self, optimizer: Optimizer, group: dict[str, Any], threshold: float | torch.Tensor
    ) -> None:
        if not self._armed or not self._wants_update():
            return
        index = self._index(optimizer)
        for name, candidate in zip(self.names[index], optimizer.param_groups):
            if candidate is group:
                self._measure(optimizer, name, group, threshold=threshold)
                self._measured.add(id(group))

    # ---- measuring -----------------------------------------------------------------------------------------------

    def _index(self, optimizer: Optimizer) -> int:
        for index, known in enumerate(self.optimizers):
            if known is optimizer:
                return index
        raise ValueError("this optimizer was not given to StepStatistics")

    def _param_names(self, group: Mapping[str, Any]) -> list[str]:
        names = group.get("param_names")
        if names and len(names) == len(group["params"]):
            return [str(n) for n in names]
        return [self._parameter_names.get(id(p), f"p{i}") for i, p in enumerate(group["params"])]

    def _wants_update(self) -> bool:
        return "update_ratio" in self.metrics

    def _reads_state(self, optimizer: Optimizer, group: Mapping[str, Any]) -> bool:
        sees_proximal_step = self.attached and is_attached(optimizer)
        return update_from_state(optimizer, group, group_rule(optimizer, group), sees_proximal_step=sees_proximal_step)

    @torch.no_grad()
    def before_step(self, optimizer: Optimizer) -> None:
        """Snapshot the weights of the groups whose update cannot be read from Adam's state after the step."""
        self._index(optimizer)
        if not self._wants_update():
            return
        for group in optimizer.param_groups:
            if not self._reads_state(optimizer, group):
                self._snapshots[id(group)] = [local(p).detach().clone() for p in group["params"]]

    @torch.no_grad()
    def after_step(self, optimizer: Optimizer) -> None:
        """Reduce this optimizer's weights, gradients and state to per-tensor sums, on device (no host sync)."""
        index = self._index(optimizer)
        for name, group in zip(self.names[index], optimizer.param_groups):
            if id(group) in self._measured:
                self._measured.discard(id(group))
                continue
            self._measure(optimizer, name, group)

    def _measure(
        self,
        optimizer: Optimizer,
        name: str,
        group: Mapping[str, Any],
        *,
        threshold: float | torch.Tensor | None = None,
    ) -> None:
        """Gather ``group``'s tensors, reduce them to sums on device, and note where they go in the table."""
        rule = group_rule(optimizer, group)
        snapshots = self._snapshots.pop(id(group), None)
        from_state = (
            snapshots is None
            and self._wants_update()
            and update_from_state(optimizer, group, rule, sees_proximal_step=threshold is not None)
        )
        tensors = gather(
            optimizer,
            group,
            from_state=from_state,
            wants_denominator=rule.penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1),
            snapshots=snapshots,
        )
        # Per-tensor rows for per-parameter figures, and for shards whose partial sums are reduced tensor by tensor.
        per_tensor = self.per_parameter or not tensors.plain
        context = _step_context(optimizer, group, rule, threshold=threshold, per_tensor=per_tensor)
        lr = group["lr"]
        header = self._pending.add_header(lr, getattr(optimizer, "found_inf", None))
        rows, parameter_rows = self._pending.add_blocks(group["params"], group_sums(tensors, context))
        self._pending.groups.append(
            _MeasuredGroup(
                name=name,
                rule=rule,
                lr=None if isinstance(lr, torch.Tensor) else float(lr),
                header=header,
                rows=rows,
                parameter_rows=parameter_rows,
                numels=[p.numel() * (2 if p.is_complex() else 1) for p in group["params"]],
                has_update=snapshots is not None or tensors.exp_avgs is not None,
                param_names=self._param_names(group),
            )
        )

    def collect(self) -> dict[str, float]:
        """The figures since the last call, keyed ``{metric}/{group}`` (and ``{metric}/{group}/{param}`` per
        parameter), after one device-to-host transfer; disarms. Empty if no step was measured.

        ``skipped`` then names the groups whose step a grad scaler skipped: they made no update.
        """
        self._armed = False
        pending, self._pending = self._pending, _Pending()
        self._snapshots.clear()
        self._measured.clear()
        self.skipped = frozenset()
        if not pending.blocks:
            return {}
        device = pending.blocks[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        table = torch.cat([block.to(device, dtype, non_blocking=True) for block in pending.blocks])
        if pending.sharded:
            import torch.distributed as dist

            for process_groups, rows in pending.sharded.items():
                index = torch.tensor(rows, device=device)
                part = table.index_select(0, index)
                for process_group in process_groups:
                    dist.all_reduce(part, group=process_group)
                table = table.index_copy(0, index, part)
        return self._figures(pending, to_host(table))

    def _figures(self, pending: _Pending, table: list[list[float]]) -> dict[str, float]:
        figures: dict[str, float] = {}
        wanted = set(self.metrics)
        factors = self._equilibrium_factors()
        skipped = set()
        for group in pending.groups:
            header = table[group.header] if group.header is not None else None
            lr = group.lr if group.lr is not None else header[0]  # type: ignore[index]
            step = _Step(group.rule, lr, group.has_update, skipped=header is not None and header[1] > 0)
            if step.skipped:
                skipped.add(group.name)
            total = [sum(table[r][c] for r in group.rows) for c in range(len(COLUMNS))]
            factor = factors.get(group.name)
            group_figures = _figures_of(total, step, sum(group.numels), factor)
            figures.update({tag(None, m, group.name): v for m, v in group_figures.items() if m in wanted})
            if self.per_parameter and group.parameter_rows is not None:
                for row, numel, param_name in zip(group.parameter_rows, group.numels, group.param_names):
                    single = _figures_of(table[row], step, numel, factor)
                    for metric in PER_PARAMETER_METRICS:
                        if metric in wanted and metric in single:
                            figures[tag(None, metric, group.name, param_name)] = single[metric]
        self.skipped = frozenset(skipped)
        return figures

    def _equilibrium_factors(self) -> dict[str, float | None]:
        """Each group's equilibrium factor (``lit_decay.diagnostics.equilibrium_factor``), from its host-side keys."""
        if "equilibrium" not in self.metrics:
            return {}
        return {
            name: equilibrium_factor(optimizer, group, group_rule(optimizer, group).mode)
            for optimizer, names in zip(self.optimizers, self.names)
            for name, group in zip(names, optimizer.param_groups)
        }


def to_host(table: torch.Tensor) -> list[list[float]]:
    """The one device-to-host transfer of a logging step."""
    return table.tolist()


@dataclass(frozen=True)
class _Step:
    """What a group's step was, for turning its sums into figures."""

    rule: Rule
    lr: float
    has_update: bool
    skipped: bool  # a grad scaler skipped it: nothing changed


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator/denominator``, 0 for a zero denominator: the figures of an all-zero tensor stay finite."""
    return 0.0 if denominator == 0.0 else numerator / denominator


def _figures_of(
    sums: Sequence[float], step: _Step, numel: int, equilibrium_constant: float | None = None
) -> dict[str, float]:
    w2, g2, d2, penalty, nonzeros, penalised_w2 = sums[: len(COLUMNS)]
    rule = step.rule
    figures = {"weight_norm": math.sqrt(w2), "grad_norm": math.sqrt(g2)}
    decay = step.lr * rule.coefficient
    if step.has_update:
        # Relative to the weights after the step; a tensor the step left all zero (a proximal step zeroing a gate)
        # is measured against the weights it was applied to.
        figures["update_ratio"] = 0.0 if step.skipped else _ratio(math.sqrt(d2), math.sqrt(w2 or penalised_w2))
        # Rotational equilibrium: the update ratio over √(c·η·λ), its value at equilibrium (Kosson et al., 2024).
        if equilibrium_constant is not None and decay > 0:
            figures["equilibrium"] = figures["update_ratio"] / math.sqrt(equilibrium_constant * decay)
    effective: float | None
    if rule.penalty is Penalty.NONE or step.skipped:
        effective = 0.0  # a skipped step applied no penalty either
    elif rule.penalty is Penalty.DECOUPLED:
        effective = decay
    elif rule.penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1):
        effective = decay * _ratio(penalty, w2)
    elif rule.penalty is Penalty.PROXIMAL_L1:
        effective = _ratio(penalty, penalised_w2)
    else:
        effective = None
    if effective is not None:
        figures["effective_decay"] = effective
        if effective != 0.0:
            figures["decay_timescale"] = 1.0 / effective
    if rule.l1 and numel:
        figures["sparsity"] = (numel - nonzeros) / numel
    return figures


def group_stats(optimizer: Optimizer, *, metrics: Iterable[str] | None = None) -> dict[str, float]:
    """The monitor's figures for ``optimizer``, without Lightning: call it right after ``optimizer.step()``.

    Keys are ``{metric}/{group}``. ``update_ratio`` is read from Adam's state, so it is there for torch's Adam and
    AdamW in every mode but ``decoupled_l1``; for those, and for other optimizers, use ``StepStatistics``
    (which snapshots the weights before the step).

    Examples:
        >>> import lit_decay
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.1, mode="decoupled")
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()
        >>> figures = lit_decay.group_stats(optimizer)
        >>> sorted(figures)[:3]
        ['decay_timescale/decay', 'effective_decay/decay', 'effective_decay/no_decay']
        >>> round(figures["effective_decay/decay"], 6)
        0.001
    """
    statistics = StepStatistics([optimizer], metrics=metrics)
    statistics.after_step(optimizer)
    return statistics.collect()
