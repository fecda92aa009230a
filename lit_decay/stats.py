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

Every figure of a tensor comes from one pass that reads its weights, gradient and Adam moments once (a compiled
kernel for large tensors), the update is read from Adam's state rather than from a copy of the weights, and all
groups of all optimizers leave the device in a single transfer. Only where the update cannot be read from the state
(``decoupled_l1``, low-precision weights, optimizers other than Adam) is a snapshot taken before the step, on
logging steps alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lit_decay._compile import compiled_or_eager, wants_compiled
from lit_decay._tensors import is_dtensor, local
from lit_decay.diagnostics import equilibrium_factor
from lit_decay.modes import L1_MODES, Penalty, Rule, group_names, group_rule
from lit_decay.penalties import is_attached, observe_proximal_step

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

# Columns of the per-tensor sums: Σw², Σg², Σ(Δw)², Σ(penalty term), number of exact zeros.
_W2, _G2, _D2, _REG, _ZEROS = range(5)


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


def update_from_state(
    optimizer: Optimizer, group: Mapping[str, Any], rule: Rule, *, sees_proximal_step: bool = False
) -> bool:
    """Whether the step's update of ``group`` can be read from Adam's state (else a snapshot is needed).

    True for torch's Adam/AdamW with float32/float64 weights (lower precision rounds the applied update away from
    Adam's) in every mode; for ``decoupled_l1`` only when the figures are taken just before lit_decay's proximal step
    (``sees_proximal_step``), since the weights after it no longer tell what they were.
    """
    if not isinstance(optimizer, torch.optim.Adam) or rule.penalty is Penalty.UNKNOWN:
        return False
    if rule.penalty == Penalty.PROXIMAL_L1 and not sees_proximal_step:
        return False
    if rule.penalty == Penalty.DECOUPLED:
        # Rebuilding AdamW's w_old divides by 1 − lr·wd; a tensor lr would have to be read on the host to check it.
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) or lr * rule.coefficient >= 0.5:
            return False
    return all(p.dtype in (torch.float32, torch.float64) for p in group["params"])


def _tensor_sums(
    w: torch.Tensor,
    g: torch.Tensor | None,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    w_old: torch.Tensor | None,
    step_size: torch.Tensor | None,
    inv_sqrt_bias2: torch.Tensor | None,
    keep: torch.Tensor | None,
    grad_factor: torch.Tensor | None,
    eps: float,
    decay: float | torch.Tensor,
    penalty: Penalty,
    threshold: float | torch.Tensor | None = None,
    count_zeros: bool = True,
) -> torch.Tensor:
    """Σw², Σg², Σ(Δw)², Σ(penalty term), number of zeros, for one (local, flat) tensor, in one pass.

    ``Δw`` is ``w − w_old`` with a snapshot, else rebuilt from Adam's moments: ``Δw = −step_size·m/D`` with
    ``D = √v·inv_sqrt_bias2 + eps`` (plus AdamW's decay), zeroed by ``keep`` on a step the grad scaler skipped;
    ``decay`` is lr·wd. Scalars that depend on the step count come in precomputed, so the pass does no scalar work.
    With ``threshold``, ``w`` is the weight after Adam's step but before the proximal L1 step, which this pass applies
    to its own copy: the figures are those of the weights after the whole step, and w_old = w + Adam's update.
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.to(acc)
    adam_stepped = wf
    if threshold is not None:
        wf = wf - torch.clamp(wf, -threshold, threshold)  # type: ignore[arg-type]
    w2 = (wf * wf).sum()
    # Only sparsity needs the count, and only L1 groups log it: a reduction less (about a tenth of the pass).
    zeros = (wf == 0).to(acc).sum() if count_zeros else torch.zeros((), dtype=acc, device=w.device)
    g2 = torch.zeros((), dtype=acc, device=w.device)
    if g is not None:
        gf = g.to(acc) if grad_factor is None else g.to(acc) * grad_factor
        g2 = (gf * gf).sum()
    denom = None
    if v is not None and inv_sqrt_bias2 is not None:
        denom = torch.sqrt(v.to(acc)) * inv_sqrt_bias2 + eps
    d2 = torch.zeros((), dtype=acc, device=w.device)
    if w_old is not None:
        delta = wf - w_old.to(acc)
        d2 = (delta * delta).sum()
    elif m is not None and denom is not None and step_size is not None:
        update = step_size * m.to(acc) / denom
        if keep is not None:
            update = update * keep
        if penalty == Penalty.DECOUPLED:
            # AdamW: w = w_old·(1 − lr·wd) − update, so w_old = (w + update)/(1 − lr·wd).
            delta = -update - (decay / (1.0 - decay)) * (wf + update)
            if keep is not None:
                delta = delta * keep
        elif threshold is not None:
            delta = wf - (adam_stepped + update)
        else:
            delta = -update
        d2 = (delta * delta).sum()
    reg = torch.zeros((), dtype=acc, device=w.device)
    if penalty == Penalty.ADAM_L2 and denom is not None:
        reg = (wf * wf / denom).sum()
    elif penalty == Penalty.ADAM_L1 and denom is not None:
        reg = (wf.abs() / denom).sum()
    elif penalty == Penalty.PROXIMAL_L1:
        reg = (wf.abs() * torch.clamp(wf.abs(), max=decay)).sum()
    return torch.stack([w2, g2, d2, reg, zeros])


def _bias_corrections(
    steps: Sequence[torch.Tensor], lr: float | torch.Tensor, beta1: float, beta2: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adam's ``lr/(1 − β₁ᵗ)`` and ``1/√(1 − β₂ᵗ)`` for each step count, in a few device ops for the whole group."""
    if not steps:
        return [], []
    t = torch.stack([s.detach().to(torch.float64 if s.device.type != "mps" else torch.float32) for s in steps])
    if isinstance(lr, torch.Tensor):
        lr = lr.detach().to(t.device, t.dtype, non_blocking=True)
    step_size = lr / (1 - beta1**t)
    inv_sqrt_bias2 = (1 - beta2**t).rsqrt()
    return list(step_size.unbind()), list(inv_sqrt_bias2.unbind())


_tensor_sums_fast = compiled_or_eager(_tensor_sums)


@dataclass
class _Pending:
    """Per-tensor sums of one step, on device, with what is needed to turn them into figures."""

    sums: list[torch.Tensor] = field(default_factory=list)
    # (group tag, rule, lr (a float, or the row of `sums` holding a tensor lr), numel, has_update, rows, param names)
    groups: list[tuple[str, Rule, float | int, int, bool, list[int], list[str]]] = field(default_factory=list)
    # rows of `sums` that come from DTensor shards, by the process groups their partial sums must be reduced over
    sharded: dict[tuple[Any, ...], list[int]] = field(default_factory=lambda: defaultdict(list))


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
        found_inf = getattr(optimizer, "found_inf", None)
        grad_scale = getattr(optimizer, "grad_scale", None)
        keep = None if found_inf is None else 1.0 - found_inf.float()
        grad_factor = None
        if grad_scale is not None and found_inf is not None:
            # The fused kernel unscales gradients in place, except on a step it skips.
            grad_factor = torch.where(found_inf > 0, 1.0 / grad_scale, torch.ones_like(grad_scale))
        pending = self._pending
        rule = group_rule(optimizer, group)
        lr: float | torch.Tensor = group["lr"]
        lr_ref: float | int = float(lr) if not isinstance(lr, torch.Tensor) else len(pending.sums)
        if isinstance(lr, torch.Tensor):
            # A tensor lr (capturable or scheduled on device) leaves the device with the sums: one row of its own.
            lr = lr.detach()
            pending.sums.append(torch.cat([lr.reshape(1), torch.zeros(4, dtype=lr.dtype, device=lr.device)]))
        beta1, beta2 = (float(b) for b in group.get("betas", (0.0, 0.0)))
        eps = float(group.get("eps", 0.0))
        snapshots = self._snapshots.pop(id(group), None)
        from_state = (
            snapshots is None
            and self._wants_update()
            and update_from_state(optimizer, group, rule, sees_proximal_step=threshold is not None)
        )
        wants_denominator = from_state or rule.penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1)
        params = group["params"]
        states = [optimizer.state.get(p, {}) for p in params]
        # A tensor without a gradient was not stepped: no update and no penalty this step, whatever its state.
        with_state = [
            i for i, st in enumerate(states) if wants_denominator and "exp_avg_sq" in st and params[i].grad is not None
        ]
        step_sizes, inv_sqrt_bias2s = _bias_corrections(
            [local(states[i]["step"]) for i in with_state], lr, beta1, beta2
        )
        scalars = dict(zip(with_state, zip(step_sizes, inv_sqrt_bias2s)))
        rows: list[int] = []
        for p_index, (param, state) in enumerate(zip(params, states)):
            grad = None if param.grad is None else local(param.grad)
            stepped = grad is not None
            w_old = snapshots[p_index] if (snapshots is not None and stepped) else None
            step_size, inv_sqrt_bias2 = scalars.get(p_index, (None, None))
            use_state = from_state and stepped and step_size is not None
            v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
            w = local(param.detach())
            m = local(state["exp_avg"]) if use_state else None
            v = local(v) if (v is not None and inv_sqrt_bias2 is not None) else None
            kernel = _tensor_sums
            if wants_compiled(w) and all(t is None or t.is_contiguous() for t in (w, grad, m, v, w_old)):
                kernel = _tensor_sums_fast
                w = w.view(-1)
                grad, m, v, w_old = (None if t is None else t.view(-1) for t in (grad, m, v, w_old))
            sums = kernel(
                w,
                grad,
                m,
                v,
                w_old,
                step_size=step_size if use_state else None,
                inv_sqrt_bias2=inv_sqrt_bias2,
                keep=keep if use_state else None,
                grad_factor=grad_factor if stepped else None,
                eps=eps,
                decay=lr * rule.coefficient,
                penalty=rule.penalty,
                threshold=threshold if stepped else None,
                count_zeros=rule.mode in L1_MODES,
            )
            rows.append(len(pending.sums))
            if is_dtensor(param):
                pending.sharded[_shard_groups(param)].append(len(pending.sums))
            pending.sums.append(sums)
        has_update = snapshots is not None or from_state
        numel = sum(p.numel() for p in params)
        pending.groups.append((name, rule, lr_ref, numel, has_update, rows, self._param_names(group)))

    def collect(self) -> dict[str, float]:
        """The figures since the last call, keyed ``{metric}/{group}`` (and ``{metric}/{group}/{param}`` per
        parameter), after one device-to-host transfer; disarms. Empty if no step was measured."""
        self._armed = False
        pending, self._pending = self._pending, _Pending()
        self._snapshots.clear()
        self._measured.clear()
        if not pending.sums:
            return {}
        device = pending.sums[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        table = torch.stack([s.to(device, dtype, non_blocking=True) for s in pending.sums])
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
        for name, rule, lr_ref, numel, has_update, rows, param_names in pending.groups:
            lr = table[lr_ref][0] if isinstance(lr_ref, int) else lr_ref
            total = [sum(table[r][c] for r in rows) for c in range(5)]
            factor = factors.get(name)
            group_figures = _figures_of(total, rule, lr, numel, has_update, factor)
            figures.update({f"{metric}/{name}": value for metric, value in group_figures.items() if metric in wanted})
            if self.per_parameter:
                for row, param_name in zip(rows, param_names):
                    single = _figures_of(table[row], rule, lr, 0, has_update, factor)
                    for metric in PER_PARAMETER_METRICS:
                        if metric in wanted and metric in single:
                            figures[f"{metric}/{name}/{param_name}"] = single[metric]
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


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def _figures_of(
    sums: Sequence[float],
    rule: Rule,
    lr: float,
    numel: int,
    has_update: bool,
    equilibrium_constant: float | None = None,
) -> dict[str, float]:
    w2, g2, d2, reg, zeros = sums
    figures = {"weight_norm": math.sqrt(w2), "grad_norm": math.sqrt(g2)}
    if has_update:
        figures["update_ratio"] = _ratio(math.sqrt(d2), math.sqrt(w2))
        # Rotational equilibrium: the update ratio over √(c·η·λ), its value at equilibrium (Kosson et al., 2024).
        if equilibrium_constant is not None and lr * rule.coefficient > 0:
            predicted = math.sqrt(equilibrium_constant * lr * rule.coefficient)
            figures["equilibrium"] = figures["update_ratio"] / predicted
    decay = lr * rule.coefficient
    effective: float | None
    if rule.penalty == Penalty.NONE:
        effective = 0.0
    elif rule.penalty is Penalty.DECOUPLED:
        effective = decay
    elif rule.penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1):
        effective = decay * _ratio(reg, w2)
    elif rule.penalty == Penalty.PROXIMAL_L1:
        effective = _ratio(reg, w2)
    else:
        effective = None
    if effective is not None:
        figures["effective_decay"] = effective
        if effective != 0.0:
            figures["decay_timescale"] = 1.0 / effective
    if rule.mode in L1_MODES and numel:
        figures["sparsity"] = zeros / numel
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
