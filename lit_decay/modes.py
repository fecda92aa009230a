"""The decay modes, each one entry: where its penalty sits around torch's Adam step, and how its effect is measured.

A mode is *where* a decay transform sits (optax's view): the part torch's arithmetic applies from the group's
``"weight_decay"``, what it adds to the gradients before torch's step, what it does to the weights after it, and the
sums and formula of its effective decay d = −⟨Δw_reg, w⟩/‖w‖² (the fraction of the weight norm removed per step).
``lit_decay.Adam`` applies the entry of each group's ``"decay_mode"``; the statistics, the monitor, the schedules and
the audit ask the entry and never branch on a mode's name. ``rule_of`` reads the entry a group is decayed by in any
optimizer: for torch's own optimizers, what torch's keys mean (Adam's ``weight_decay`` is ``l2``, AdamW's
``decoupled``, SGD's coupled decay ``sgd``). Adding a mode is one more entry (see docs/modes.md, "Adding a mode").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer

Scalar = float | torch.Tensor  # a host number, or a 0-d tensor on the device (a GradScaler's scale, a tensor lr)
TensorList = list[torch.Tensor]
Before = Callable[[TensorList, TensorList, Scalar, bool], None]
After = Callable[[TensorList, Scalar, bool], None]
Penalty = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecayMode:
    """One decay mode. ``torch_term`` is the part torch's Adam arithmetic applies itself (``"l2"``: g ← g + wd·p
    inside the kernel, ``"decoupled"``: AdamW's p ← p·(1 − lr·wd), or ``"none"``).
    ``before(params, grads, strength, foreach)`` and ``after(params, threshold, foreach)`` act in
    place on a group's stepped tensors, the first with the group's strength (in the gradients' units: times a
    GradScaler's scale where the fused kernel unscales), the second with lr·strength (0 on a step the scaler
    skipped). ``foreach`` asks for torch's multi-tensor ops (where they are real kernels) rather than a per-tensor
    loop. ``penalty(w, denominator, decay)`` is elementwise (``denominator`` is Adam's √v̂ + eps, ``decay`` is
    lr·wd), and ``effective_decay(penalty_sum, w2, decay)`` turns its sum and Σw² into d, both over the weights the
    penalty acted on (None where the mode's effect is not known). ``equilibrium(group)`` is c of the update ratio
    √(c·lr·wd) at rotational equilibrium, or None.

    Examples:
        >>> DECAY_MODES["decoupled"].effective_decay(0.0, 4.0, 0.01)
        0.01
        >>> DECAY_MODES["decoupled_l1"].after is soft_threshold
        True
    """

    name: str
    torch_term: Literal["none", "l2", "decoupled"] = "none"
    before: Before | None = None
    after: After | None = None
    penalty: Penalty | None = None
    effective_decay: Callable[[float, float, float], float | None] = lambda penalty_sum, w2, decay: 0.0
    sparsity: bool = False
    timescale: bool = False
    equilibrium: Callable[[Mapping[str, Any]], float | None] | None = None

    @property
    def decays(self) -> bool:
        """Whether the mode applies any decay at all (``none`` does not, whatever the strength)."""
        return self.torch_term != "none" or self.needs_lit_decay

    @property
    def needs_lit_decay(self) -> bool:
        """Whether only ``lit_decay.Adam`` applies this mode (torch alone would read its strength as L2)."""
        return self.before is not None or self.after is not None


def add_sign(params: TensorList, grads: TensorList, strength: Scalar, foreach: bool) -> None:
    """``g ← g + strength·sign(p)`` in place (torch.sign's conventions: no term for ±0 and NaN weights), with torch's
    multi-tensor ops: the whole group at once where they are real kernels (``foreach``), else in batches.

    Examples:
        >>> p, g = torch.tensor([2.0, -1.0, 0.0]), torch.zeros(3)
        >>> add_sign([p], [g], 0.1, foreach=False); g
        tensor([ 0.1000, -0.1000,  0.0000])
    """
    for ps, gs in [(params, grads)] if foreach else _batches(params, grads):
        signs = torch._foreach_sign(ps)
        if isinstance(strength, torch.Tensor):
            torch._foreach_mul_(signs, strength.to(ps[0].device))
            torch._foreach_add_(gs, signs)
        else:
            torch._foreach_add_(gs, signs, alpha=strength)


def _batches(*lists: TensorList, size: int = 1 << 20) -> list[tuple[TensorList, ...]]:
    """Aligned lists cut into batches of about ``size`` elements, a large contiguous tensor into flat pieces of that
    size: on a CPU, a temporary the size of a large tensor or group is page-faulted in anew at every step (the l1
    term at 50M parameters, 2 cores: 1.81× a fused Adam step whole, 1.57× by 2**20 elements, 1.59× by 2**18)."""
    pieces: list[tuple[torch.Tensor, ...]] = []
    for tensors in zip(*lists):
        if tensors[0].numel() <= size or not all(t.is_contiguous() for t in tensors):
            pieces.append(tensors)
        else:
            pieces += zip(*(t.view(-1).split(size) for t in tensors))
    batches: list[list[tuple[torch.Tensor, ...]]] = []
    filled = 0
    for piece in pieces:
        if not batches or filled + piece[0].numel() > size:
            batches.append([])
            filled = 0
        batches[-1].append(piece)
        filled += piece[0].numel()
    return [tuple(list(column) for column in zip(*batch)) for batch in batches]


def soft_threshold(params: TensorList, threshold: Scalar, foreach: bool) -> None:
    """The proximal L1 step ``p ← sign(p)·max(|p| − threshold, 0)`` in place: exact zeros where ``|p| ≤ threshold``.

    Examples:
        >>> p = torch.tensor([0.5, -0.05, 0.02, -2.0])
        >>> soft_threshold([p], 0.1, foreach=False); p.abs()
        tensor([0.4000, 0.0000, 0.0000, 1.9000])
    """
    if foreach:
        if isinstance(threshold, torch.Tensor):
            t = threshold.to(params[0].device, params[0].dtype)
            clamped = torch._foreach_clamp_max(params, [t] * len(params))
            torch._foreach_clamp_min_(clamped, [-t] * len(params))
        else:
            clamped = torch._foreach_clamp_max(params, threshold)
            torch._foreach_clamp_min_(clamped, -threshold)
        torch._foreach_sub_(params, list(clamped))
        return
    for param in params:
        if isinstance(threshold, torch.Tensor):
            t = threshold.to(param.device, param.dtype)
            param.sub_(torch.clamp(param, -t, t))
        else:
            torch.ops.aten.softshrink.out(param, threshold, out=param)  # one pass, in place


def _adamw_equilibrium(group: Mapping[str, Any]) -> float:  # Kosson, Messmer & Jaggi (2024): 2(1−β₁)/(1+β₁)
    return 2.0 * (1.0 - float(group["betas"][0])) / (1.0 + float(group["betas"][0]))


def _sgd_equilibrium(group: Mapping[str, Any]) -> float | None:
    if group.get("nesterov") or float(group.get("dampening", 0.0) or 0.0) != 0.0:
        return None
    return 2.0 / (1.0 + float(group.get("momentum", 0.0) or 0.0))


def _scaled_by_decay(penalty_sum: float, w2: float, decay: float) -> float:  # a penalty through Adam's moments
    return 0.0 if w2 == 0.0 else decay * penalty_sum / w2


def _ratio(penalty_sum: float, w2: float, decay: float) -> float:  # a penalty that is the removed part itself
    return 0.0 if w2 == 0.0 else penalty_sum / w2


def _lr_times_wd(penalty_sum: float, w2: float, decay: float) -> float:  # a shrink by lr·wd of every weight
    return decay


#: The modes users choose from, by name (``mode=`` and a group's ``"decay_mode"``).
DECAY_MODES: Mapping[str, DecayMode] = {
    "l2": DecayMode(
        "l2",
        torch_term="l2",
        penalty=lambda w, denominator, decay: w * w / denominator,
        effective_decay=_scaled_by_decay,
    ),
    "decoupled": DecayMode(
        "decoupled",
        torch_term="decoupled",
        effective_decay=_lr_times_wd,
        timescale=True,
        equilibrium=_adamw_equilibrium,
    ),
    "l1": DecayMode(
        "l1",
        before=add_sign,
        penalty=lambda w, denominator, decay: w.abs() / denominator,
        effective_decay=_scaled_by_decay,
        sparsity=True,
    ),
    "decoupled_l1": DecayMode(
        "decoupled_l1",
        after=soft_threshold,
        penalty=lambda w, denominator, decay: w.abs() * torch.clamp(w.abs(), max=decay),
        effective_decay=_ratio,
        sparsity=True,
    ),
    "none": DecayMode("none"),
}
MODES: tuple[str, ...] = tuple(DECAY_MODES)

# What torch's own optimizers apply from their keys, as entries of the same kind (never chosen by users).
SGD = DecayMode("sgd", torch_term="l2", effective_decay=_lr_times_wd, equilibrium=_sgd_equilibrium)
# Another optimizer applies its "weight_decay" key by a rule lit_decay does not know: some decay, of no known size.
UNKNOWN = DecayMode("unknown", torch_term="l2", effective_decay=lambda penalty_sum, w2, decay: None)


@dataclass(frozen=True)
class Rule:
    """How a group is decayed: its mode's entry and its strength (the group's ``"weight_decay"``).

    ``lit_decay`` is True when lit_decay's Adam applies the entry (else torch's keys were read).
    """

    mode: DecayMode
    strength: float
    lit_decay: bool = False

    @property
    def active(self) -> bool:
        """Whether the group is decayed at all (a mode other than ``none`` at a positive strength)."""
        return self.mode.decays and self.strength > 0


def _strength(group: Mapping[str, Any]) -> float:
    value = group.get("weight_decay", 0.0) or 0.0
    return float(value)


def rule_of(optimizer: Optimizer, group: Mapping[str, Any]) -> Rule:
    """The decay rule of ``group``: its ``"decay_mode"`` entry in a ``lit_decay.Adam``; elsewhere what torch's keys
    mean, whatever ``"decay_mode"`` says (torch would read an L1 group's strength as L2).

    Examples:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> rule_of(torch.optim.AdamW([w], weight_decay=0.1), {"weight_decay": 0.1}).mode.name
        'decoupled'
        >>> rule_of(torch.optim.Adam([w]), {"weight_decay": 0.1, "decay_mode": "l1"}).mode.name
        'l2'
    """
    table = getattr(optimizer, "modes", None)
    if isinstance(table, Mapping) and isinstance(optimizer, torch.optim.Adam) and "decay_mode" in group:
        return Rule(table[group["decay_mode"]], _strength(group), lit_decay=True)
    if isinstance(optimizer, torch.optim.Adam):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        return Rule(DECAY_MODES["decoupled" if decoupled else "l2"], _strength(group))
    if isinstance(optimizer, torch.optim.SGD):
        return Rule(SGD, _strength(group))
    return Rule(UNKNOWN, _strength(group))
