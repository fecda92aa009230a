"""Per-group figures of what weight decay is doing, as plain tensor functions usable without Lightning.

For each param group, right after its optimizer step (the contract's table, docs/monitoring.md):
``weight_norm``, ``grad_norm`` (the gradient the optimizer used, unscaled, after clipping), ``update_ratio``
‖Δw‖/‖w‖ with w the weights before the step, ``effective_decay`` d = −⟨Δw_reg, w⟩/‖w‖² (each mode's formula,
``lit_decay.modes``), ``decay_timescale`` 1/d, ``sparsity``, ``equilibrium`` (Kosson et al., 2024) and the group's
``weight_decay``. ``decay_progress`` is a count across steps, kept by ``WeightDecayMonitor``.

One function, ``tensor_sums``, reduces a tensor to the sums every figure is made of, in one pass over its weights,
gradient and Adam moments. The weights before the step are rebuilt from Adam's state (no copy of the model), or
taken from a snapshot where they cannot be (other optimizers, weights below float32). A ``lit_decay.Adam`` is measured
right after torch's arithmetic and before its mode's ``after`` transform, which the sums apply to a copy: the one
moment where every figure is known. Sums leave the device once per logging step.

On a CPU it runs compiled (one pass, no temporaries; docs/performance.md), elsewhere eagerly until measured there:
``LIT_DECAY_COMPILE=0`` turns compiling off, ``=1`` on wherever torch.compile runs.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.optim import Optimizer

from lit_decay._tensors import is_dtensor, local
from lit_decay.modes import After, Penalty, Rule, rule_of
from lit_decay.tags import group_names, tag

METRICS: tuple[str, ...] = (
    "weight_norm",
    "grad_norm",
    "update_ratio",
    "effective_decay",
    "decay_timescale",
    "sparsity",
    "equilibrium",
    "weight_decay",
    "decay_progress",
)
PER_PARAMETER_METRICS: tuple[str, ...] = ("weight_norm", "grad_norm", "update_ratio")
#: Each row of sums, by name: Σw² after the whole step, Σg² (unscaled), Σ(Δw)², Σw² before the step, the mode's
#: Σpenalty, Σw² of the weights the penalty acted on, and the count of weights not exactly zero.
SUMS: tuple[str, ...] = ("w2", "g2", "d2", "w2_before", "penalty", "w2_acted", "nonzeros")
# A tensor's step scalars: Adam's lr/(1−β₁ᵗ) and 1/√(1−β₂ᵗ), eps, AdamW's lr·wd, keep (0 on a step a grad scaler
# skipped), the gradient's unscale factor, lr·wd, and the mode's after-step threshold. Computed per group beforehand:
# inside the elementwise pass, inductor would recompute a power per element.
SCALARS: tuple[str, ...] = (
    "step_size", "inv_sqrt_bias2", "eps", "adamw", "keep", "grad_factor", "decay", "threshold"
)  # fmt: skip


def check_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """``metrics`` as a tuple in canonical order (all of them for None), or raise naming the unknown ones.

    Examples:
        >>> check_metrics(["sparsity", "weight_norm"])
        ('weight_norm', 'sparsity')
    """
    chosen = list(METRICS if metrics is None else [metrics] if isinstance(metrics, str) else metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; valid metrics are {', '.join(METRICS)}")
    if not chosen:
        raise ValueError(f"metrics is empty; choose some of {', '.join(METRICS)} (or None for all)")
    return tuple(m for m in METRICS if m in chosen)


def tensor_sums(
    w: torch.Tensor,
    g: torch.Tensor | None,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    before: torch.Tensor | None,
    scalars: torch.Tensor,
    penalty: Penalty | None = None,
    after: After | None = None,
) -> torch.Tensor:
    """The row of ``SUMS`` of one tensor, right after torch's Adam arithmetic and before its mode's ``after``.

    ``w`` holds those weights, ``g`` the gradient as the optimizer holds it, ``m``/``v`` Adam's moments (``v`` the
    maximum with amsgrad), ``before`` the weights before the step (None: rebuilt from Adam's state as
    w_before = (w + u)/(1 − lr·wd), with AdamW's lr·wd and Adam's update u = lr/(1−β₁ᵗ)·m/(√v̂ + eps)), ``scalars``
    the ``SCALARS``; ``penalty`` and ``after`` are the mode's, passed apart so that modes with neither (``decoupled``,
    ``none``) share one graph. Many flat arguments on purpose: what torch.compile specialises on (a container would
    add guards on its fields). Float64 tensors are summed in float64, the rest in float32.

    Examples:
        >>> w, g = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
        >>> scalars = torch.tensor([0.1, 1.0, 1e-8, 0.0, 1.0, 1.0, 0.0, 0.0])
        >>> tensor_sums(w, g, None, None, torch.tensor([3.0, 5.0]), scalars).tolist()
        [25.0, 1.0, 1.0, 34.0, 0.0, 25.0, 2.0]
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    step_size, inv_sqrt_bias2, eps, adamw, keep, grad_factor, decay, threshold = scalars.to(acc).unbind()
    w = w.to(acc)
    final = w
    if after is not None:
        final = w.clone()
        after([final], threshold, False)
    sums = {"w2": (final * final).sum(), "w2_acted": (w * w).sum(), "nonzeros": (final != 0).sum().to(acc)}
    if g is not None:
        gf = g.to(acc) * grad_factor
        sums["g2"] = (gf * gf).sum()
    denominator = None
    if v is not None:
        denominator = torch.sqrt(v.to(acc)) * inv_sqrt_bias2 + eps
        if before is None and m is not None:
            update = step_size * m.to(acc) / denominator * keep
            torch_change = (update + adamw * w) / (1 - adamw)  # w_before − w, without subtracting close numbers
            sums["w2_before"] = ((w + torch_change) ** 2).sum()
            sums["d2"] = ((final - w - torch_change) ** 2).sum()
    if before is not None:
        old = before.to(acc)
        sums["w2_before"] = (old * old).sum()
        sums["d2"] = ((final - old) ** 2).sum()
    if penalty is not None and denominator is not None:
        sums["penalty"] = penalty(w, denominator, decay).sum()
    zero = torch.zeros((), dtype=acc, device=w.device)
    return torch.stack([sums.get(name, zero) for name in SUMS])


@dataclass
class _Kernel:
    """``tensor_sums`` as this device runs it: compiled on a CPU for tensors of 2**16 elements or more (smaller ones
    cost less eagerly than a compile of seconds at the first logging step), eager elsewhere unless
    ``LIT_DECAY_COMPILE=1`` (every tensor, wherever torch.compile runs); a compile that fails warns once and runs
    eager from then on."""

    compiled: Callable[..., torch.Tensor] | None = None
    failed: bool = False

    def __call__(self, *args: Any) -> torch.Tensor:
        setting, weights = os.environ.get("LIT_DECAY_COMPILE", "auto").strip().lower(), args[0]
        wanted = setting in ("1", "on", "true", "yes") and weights.device.type in ("cpu", "cuda", "xpu")
        wanted = wanted or (setting == "auto" and weights.device.type == "cpu" and weights.numel() >= 1 << 16)
        if not wanted or self.failed or torch.compiler.is_compiling():
            return tensor_sums(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(tensor_sums, dynamic=True)
            return self.compiled(*args)
        except Exception as error:  # compiling fails before any kernel runs: nothing was applied twice
            self.failed = True
            warnings.warn(
                f"lit_decay could not compile its statistics ({type(error).__name__}: {error}); computing them "
                "eagerly, which gives the same figures more slowly. Set LIT_DECAY_COMPILE=0 to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return tensor_sums(*args)


def _flat(tensor: torch.Tensor | None) -> Any:  # a tensor, or None for None
    """The tensor flat over the same memory (complex as the real pairs Adam steps), and no view: dynamo guards a
    view's base sizes, which would compile a graph per base shape, where flat tensors share one."""
    if tensor is None:
        return None
    tensor = local(tensor)
    tensor = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    if not tensor.is_contiguous():
        return tensor.reshape(-1)  # a copy, no view
    flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return flat.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


@dataclass
class _Group:
    """One group's place in the table of a logging step, and what turns its sums into figures."""

    name: str
    rule: Rule
    lr: float | None  # None: a tensor lr, read from the group's header row
    header: int | None  # row holding [lr, found_inf] when either is a tensor
    rows: list[int]  # each tensor's row, in the group's order
    numels: list[int]
    param_names: list[str]
    equilibrium: float | None
    has_update: bool
    has_penalty: bool
    skipped: bool = False  # a grad scaler skipped the step: nothing changed


def _shard_groups(tensor: torch.Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's per-shard sums add up to the whole tensor's."""
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return tuple(mesh.get_group(dim) for dim, p in enumerate(tensor.placements) if p.is_shard())  # type: ignore[attr-defined]


class StepStatistics:
    """Takes the figures of one or more optimizers right after their steps; ``collect`` turns them into floats
    with a single device-to-host transfer.

    Hooked (``attach``, then ``arm`` before each step to measure and ``collect`` after it), it measures from the
    optimizers' step hooks, and for a ``lit_decay.Adam`` right after torch's arithmetic of each group.
    ``lit_decay.WeightDecayMonitor`` works this way. By hand, call ``before_step`` before ``optimizer.step()``,
    ``after_step`` right after it, and ``collect``: the same figures.

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
        self._expecting: dict[int, Any] = {}  # optimizers stepped between before_step and after_step, by id
        self._measured: set[int] = set()  # groups measured during the current step
        # The logging step's rows of sums, on device, the groups they belong to, and the rows of DTensor shards by
        # the process groups their partial sums add up over.
        self._rows: list[torch.Tensor] = []
        self._groups: list[_Group] = []
        self._sharded: dict[tuple[Any, ...], list[int]] = {}
        self._kernel = _Kernel()
        self._handles: list[Any] = []
        self._armed = False
        #: Names of the groups whose step a grad scaler skipped, as of the last ``collect``.
        self.skipped: frozenset[str] = frozenset()

    # ---- hooked use --------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register step hooks (and a ``lit_decay.Adam``'s update observer) on every optimizer; they measure while
        armed."""
        self.detach()
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))
            if hasattr(optimizer, "register_update_observer"):
                self._handles.append(optimizer.register_update_observer(self._observe))

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

    def _observe(self, optimizer: Optimizer, group: dict[str, Any]) -> None:
        if self._armed or id(optimizer) in self._expecting:
            self._measure(optimizer, group, observed=True)

    # ---- measuring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self, optimizer: Optimizer) -> None:
        """Get ready for ``optimizer``'s step: snapshot the weights of groups whose update cannot be read from Adam's
        state afterwards, and, on a ``lit_decay.Adam``, measure each group during its step."""
        self._index(optimizer)
        if not self.attached and hasattr(optimizer, "register_update_observer"):
            self._expecting[id(optimizer)] = optimizer.register_update_observer(self._observe)
        else:
            self._expecting[id(optimizer)] = None
        if "update_ratio" not in self.metrics and "equilibrium" not in self.metrics:
            return
        for group in optimizer.param_groups:
            if not _rebuilds_update(optimizer, group):
                self._snapshots[id(group)] = [local(p).detach().clone() for p in group["params"]]

    @torch.no_grad()
    def after_step(self, optimizer: Optimizer) -> None:
        """Measure ``optimizer``'s groups not measured during its step: sums on device, no host sync."""
        self._index(optimizer)
        handle = self._expecting.pop(id(optimizer), None)
        if handle is not None:
            handle.remove()
        for group in optimizer.param_groups:
            if id(group) not in self._measured:
                self._measure(optimizer, group, observed=False)
            self._measured.discard(id(group))

    def _index(self, optimizer: Optimizer) -> int:
        for index, known in enumerate(self.optimizers):
            if known is optimizer:
                return index
        raise ValueError("this optimizer was not given to StepStatistics")

    def _measure(self, optimizer: Optimizer, group: Mapping[str, Any], *, observed: bool) -> None:
        """Reduce ``group``'s tensors to rows of sums on device, and note where they go in the table."""
        self._measured.add(id(group))
        index = self._index(optimizer)
        if len(self.names[index]) != len(optimizer.param_groups):  # groups were added (a backbone unfrozen)
            self.names = group_names(self.optimizers)
        name = self.names[index][next(i for i, g in enumerate(optimizer.param_groups) if g is group)]
        rule = rule_of(optimizer, group)
        params = group["params"]
        snapshots = self._snapshots.pop(id(group), None)
        # After a lit_decay.Adam step, its mode's after transform has already acted and left no trace.
        unseen = rule.lit_decay and not observed and rule.mode.after is not None and rule.strength > 0
        stepped = [i for i, p in enumerate(params) if p.grad is not None]
        states = [optimizer.state.get(params[i], {}) for i in stepped]
        from_state = _rebuilds_update(optimizer, group) and bool(stepped) and not unseen
        scalars, header = self._scalars(optimizer, group, rule, observed, states)
        rows = {}
        for k, (i, state) in enumerate(zip(stepped, states)):
            v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            m = state.get("exp_avg") if from_state else None
            before = None if snapshots is None else snapshots[i]
            inputs = (_flat(params[i].detach()), _flat(params[i].grad), _flat(m), _flat(v), _flat(before))
            row = self._kernel(*inputs, scalars[k], rule.mode.penalty, rule.mode.after)
            rows[i] = self._add(row)
        for i, param in enumerate(params):
            if i not in rows:  # not stepped: no gradient, no update and no penalty this step
                weights = _flat(param.detach())
                row = tensor_sums(weights, None, None, None, weights, scalars.new_zeros(len(SCALARS)))
                rows[i] = self._add(row)
            if is_dtensor(param):
                self._sharded.setdefault(_shard_groups(param), []).append(rows[i])
        lr = group["lr"]
        self._groups.append(
            _Group(
                name=name,
                rule=rule,
                lr=None if isinstance(lr, torch.Tensor) else float(lr),
                header=header,
                rows=[rows[i] for i in range(len(params))],
                numels=[p.numel() * (2 if p.is_complex() else 1) for p in params],
                param_names=self._param_names(group),
                equilibrium=None if rule.mode.equilibrium is None else rule.mode.equilibrium(group),
                has_update=from_state or snapshots is not None,
                has_penalty=not unseen,
            )
        )

    def _scalars(
        self, optimizer: Optimizer, group: Mapping[str, Any], rule: Rule, observed: bool, states: list[Any]
    ) -> tuple[torch.Tensor, int | None]:
        """Each stepped tensor's ``SCALARS`` on the group's device (a few device ops for the whole group), and the
        header row that brings a tensor lr or a grad scaler's verdict to the host with the sums (None where both
        are host values)."""
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        found_inf = getattr(optimizer, "found_inf", None)
        grad_scale = getattr(optimizer, "grad_scale", None)
        lr = group["lr"]
        keep: float | torch.Tensor = 1.0 if found_inf is None else 1.0 - found_inf.to(device, wide)
        grad_factor: float | torch.Tensor = 1.0
        if grad_scale is not None and found_inf is not None:
            # The fused kernel unscales gradients in place, except on a step it skips.
            grad_factor = torch.where(found_inf > 0, 1.0 / grad_scale.to(wide), 1.0).to(device)
        decay = lr * rule.strength
        adamw = decay * keep if rule.mode.torch_term == "decoupled" and isinstance(optimizer, torch.optim.Adam) else 0.0
        threshold = decay * keep if rule.lit_decay and observed and rule.mode.after is not None else 0.0
        shared = (group.get("eps", 0.0), adamw, keep, grad_factor, decay, threshold)
        row = torch.stack([_scalar(x, device, wide) for x in shared])
        n = len(states)
        step_size = inv_sqrt_bias2 = torch.zeros(n, dtype=wide, device=device)
        if n and all("step" in state for state in states):
            beta1, beta2 = (float(b) for b in group["betas"])
            # A count a scaler rolled back to 0 made no update: taken as 1, so that the figures stay finite.
            t = torch.stack([local(state["step"]).to(device, wide) for state in states]).clamp(min=1.0)
            step_size, inv_sqrt_bias2 = _scalar(lr, device, wide) / (1 - beta1**t), (1 - beta2**t).rsqrt()
        scalars = torch.cat([step_size[:, None], inv_sqrt_bias2[:, None], row.expand(n, len(shared))], dim=1)
        header = None
        if isinstance(lr, torch.Tensor) or found_inf is not None:
            head = torch.zeros(len(SUMS), dtype=wide, device=device)
            head[0], head[1] = _scalar(lr, device, wide), 0.0 if found_inf is None else found_inf.to(wide)
            header = self._add(head)
        return scalars, header

    def _add(self, row: torch.Tensor) -> int:
        self._rows.append(row)
        return len(self._rows) - 1

    def _param_names(self, group: Mapping[str, Any]) -> list[str]:
        names = group.get("param_names")
        if names and len(names) == len(group["params"]):
            return [str(n) for n in names]
        return [self._parameter_names.get(id(p), f"p{i}") for i, p in enumerate(group["params"])]

    def collect(self) -> dict[str, float]:
        """The figures since the last call, keyed ``{metric}/{group}`` (and ``{metric}/{group}/{param}`` per
        parameter), after one device-to-host transfer; disarms. Empty if no step was measured.

        ``skipped`` then names the groups whose step a grad scaler skipped: they made no update.
        """
        self._armed = False
        rows, groups, sharded = self._rows, self._groups, self._sharded
        self._rows, self._groups, self._sharded = [], [], {}
        self._snapshots.clear()
        self._measured.clear()
        self.skipped = frozenset()
        if not groups:
            return {}
        device = rows[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        table = torch.stack([row.to(device, dtype, non_blocking=True) for row in rows])
        for process_groups, shard_rows in sharded.items():
            import torch.distributed as dist

            index = torch.tensor(shard_rows, device=device)
            part = table.index_select(0, index)
            for process_group in process_groups:
                dist.all_reduce(part, group=process_group)
            table = table.index_copy(0, index, part)
        return self._figures(groups, to_host(table))

    def _figures(self, groups: list[_Group], table: list[list[float]]) -> dict[str, float]:
        figures: dict[str, float] = {}
        skipped = set()
        for group in groups:
            header = table[group.header] if group.header is not None else None
            if header is not None:  # a tensor lr or a grad scaler's verdict, read on the host with the sums
                group = replace(group, lr=header[0] if group.lr is None else group.lr, skipped=header[1] > 0)
            if group.skipped:
                skipped.add(group.name)
            rows = [dict(zip(SUMS, table[r])) for r in group.rows]
            total = {name: sum(row[name] for row in rows) for name in SUMS}
            measured = figures_of(total, group, sum(group.numels))
            figures.update({tag(None, m, group.name): v for m, v in measured.items() if m in self.metrics})
            if self.per_parameter:
                for row, numel, param_name in zip(rows, group.numels, group.param_names):
                    single = figures_of(row, group, numel)
                    for metric in PER_PARAMETER_METRICS:
                        if metric in self.metrics and metric in single:
                            figures[tag(None, metric, group.name, param_name)] = single[metric]
        self.skipped = frozenset(skipped)
        return figures


def _scalar(value: float | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A Python float straight to float64: through torch's default float32 it would be rounded first.
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def to_host(table: torch.Tensor) -> list[list[float]]:
    """The one device-to-host transfer of a logging step."""
    return table.tolist()


def _rebuilds_update(optimizer: Optimizer, group: Mapping[str, Any]) -> bool:
    """Whether the step's update of ``group`` can be rebuilt from Adam's state: torch's Adam/AdamW (lit_decay's
    included) with float32/float64 weights (lower precision rounds the applied update away from Adam's), a host lr,
    and AdamW's factor lr·wd ≤ 0.5 (rebuilding divides by 1 − lr·wd)."""
    if not isinstance(optimizer, torch.optim.Adam) or isinstance(group["lr"], torch.Tensor):
        return False
    rule = rule_of(optimizer, group)
    if rule.mode.torch_term == "decoupled" and group["lr"] * rule.strength > 0.5:
        return False
    exact = (torch.float32, torch.float64, torch.complex64, torch.complex128)
    return all(p.dtype in exact for p in group["params"])


def figures_of(sums: Mapping[str, float], group: _Group, numel: int) -> dict[str, float]:
    """The figures of one group (or one tensor) from its ``SUMS``; a figure the sums cannot tell is left out."""
    rule = group.rule
    decay = (group.lr or 0.0) * rule.strength
    figures = {"weight_norm": math.sqrt(sums["w2"]), "grad_norm": math.sqrt(sums["g2"]), "weight_decay": rule.strength}
    if group.has_update:
        change, before = math.sqrt(sums["d2"]), math.sqrt(sums["w2_before"])
        if group.skipped or change == 0.0:
            figures["update_ratio"] = 0.0
        elif before > 0.0:  # weights that start from zero have no relative update
            figures["update_ratio"] = change / before
        if "update_ratio" in figures and group.equilibrium is not None and decay > 0:
            # Rotational equilibrium: the update ratio over √(c·lr·wd), its value at equilibrium (Kosson et al., 2024).
            figures["equilibrium"] = figures["update_ratio"] / math.sqrt(group.equilibrium * decay)
    effective: float | None = 0.0  # a skipped step applied no penalty either
    if rule.active and not group.skipped:
        known = group.has_penalty or rule.mode.penalty is None
        effective = rule.mode.effective_decay(sums["penalty"], sums["w2_acted"], decay) if known else None
    if effective is not None:
        figures["effective_decay"] = effective
        if effective > 0:
            figures["decay_timescale"] = 1.0 / effective
    if rule.mode.sparsity and numel:
        figures["sparsity"] = (numel - sums["nonzeros"]) / numel
    return figures


def group_stats(optimizer: Optimizer, *, metrics: Iterable[str] | None = None) -> dict[str, float]:
    """The monitor's figures for ``optimizer``, without Lightning: call it right after ``optimizer.step()``.

    Keys are ``{metric}/{group}``. The weights before the step are rebuilt from Adam's state; where they cannot be
    (optimizers other than Adam, weights below float32) and for ``decoupled_l1`` groups, whose proximal step leaves
    no trace, ``update_ratio`` and the figures that need it are absent: ``StepStatistics.before_step`` gives them.

    Examples:
        >>> import lit_decay
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.1, verbose=False)
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
