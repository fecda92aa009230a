"""The decay modes: the one place that says what each mode is, and how a param group's decay is read.

A mode is only *where* its penalty sits around Adam (optax's view), which decides everything else about it:

================  ===========================  ==================================================================
mode              applied                      effective decay d = −⟨Δw_reg, w⟩/‖w‖² per step
================  ===========================  ==================================================================
``l2``            by torch's kernel, coupled   lr·wd·Σ(w²/D)/Σw², D = √v̂ + eps (the term goes through the moments)
``decoupled``     by torch's kernel (AdamW)    lr·wd
``l1``            before the step (gradient)   lr·wd·Σ(|w|/D)/Σw²
``decoupled_l1``  after the step (proximal)    Σ|w|·min(|w|, lr·wd)/Σw², w the weights the shrink acts on
``none``          nothing                      0
================  ===========================  ==================================================================

``lit_decay.penalties`` applies the two L1 modes, ``lit_decay.stats`` measures every mode, ``lit_decay.schedule``
and ``lit_decay.monitor`` ask ``group_rule(optimizer, group)`` whether and how a group is decayed. Every lit_decay
group carries the strength the user asked for in ``"decay_coefficient"`` whatever the mode; torch's ``"weight_decay"``
key is what torch's kernel applies, so for the modes torch applies it is the source of truth.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer

Mode = Literal["l2", "decoupled", "l1", "decoupled_l1", "none"]
MODES: tuple[Mode, ...] = ("l2", "decoupled", "l1", "decoupled_l1", "none")


class Penalty(enum.Enum):
    """What a group's penalty term is, which picks the formula of its effective decay."""

    NONE = "none"
    DECOUPLED = "decoupled"  # w ← w·(1 − lr·wd): AdamW's decay, and SGD's coupled decay (the same shrink)
    ADAM_L2 = "adam_l2"  # wd·w through Adam's moments
    ADAM_L1 = "adam_l1"  # wd·sign(w) through Adam's moments
    PROXIMAL_L1 = "proximal_l1"  # soft-threshold by lr·wd after the step
    UNKNOWN = "unknown"  # an optimizer whose update rule lit_decay does not know


@dataclass(frozen=True)
class ModeSpec:
    """One decay mode: which torch keys it sets and where its penalty is applied.

    ``applied_by`` is ``"torch"`` (torch's kernel, from ``"weight_decay"``), ``"before_step"`` (lit_decay adds the
    term to the gradients), ``"after_step"`` (lit_decay's proximal step) or ``"nothing"``. ``penalty`` is the term
    under torch's Adam.
    """

    name: Mode
    applied_by: Literal["torch", "before_step", "after_step", "nothing"]
    decoupled_weight_decay: bool
    penalty: Penalty

    @property
    def torch_applied(self) -> bool:
        """Whether torch's kernel applies this mode from the group's ``"weight_decay"`` key."""
        return self.applied_by == "torch"

    @property
    def l1(self) -> bool:
        """Whether this is one of the L1 modes (their groups report ``sparsity``)."""
        return self.penalty in (Penalty.ADAM_L1, Penalty.PROXIMAL_L1)


SPECS: dict[str, ModeSpec] = {
    "l2": ModeSpec("l2", "torch", False, Penalty.ADAM_L2),
    "decoupled": ModeSpec("decoupled", "torch", True, Penalty.DECOUPLED),
    "l1": ModeSpec("l1", "before_step", False, Penalty.ADAM_L1),
    "decoupled_l1": ModeSpec("decoupled_l1", "after_step", False, Penalty.PROXIMAL_L1),
    "none": ModeSpec("none", "nothing", False, Penalty.NONE),
}

# Modes whose penalty torch's Adam kernel applies from the group's "weight_decay" key.
TORCH_APPLIED: frozenset[str] = frozenset(m for m, s in SPECS.items() if s.torch_applied)
L1_MODES: frozenset[str] = frozenset(m for m, s in SPECS.items() if s.l1)


def torch_decay_keys(mode: str, coefficient: float) -> dict[str, Any]:
    """Torch's own group keys for ``mode`` at strength ``coefficient``.

    Examples:
        >>> torch_decay_keys("decoupled", 0.1)
        {'weight_decay': 0.1, 'decoupled_weight_decay': True}
        >>> torch_decay_keys("l1", 0.1)
        {'weight_decay': 0.0, 'decoupled_weight_decay': False}
    """
    spec = SPECS[mode]
    return {
        "weight_decay": float(coefficient) if spec.torch_applied else 0.0,
        "decoupled_weight_decay": spec.decoupled_weight_decay,
    }


def set_decay_coefficient(group: MutableMapping[str, Any], coefficient: float) -> None:
    """Change a lit_decay group's decay strength in place, keeping torch's keys consistent with its mode.

    This is what a weight-decay schedule writes each step: the fused kernel reads ``"weight_decay"``, the L1 hooks
    and the monitor read ``"decay_coefficient"``.

    Examples:
        >>> group = {"decay_mode": "l2", "decay_coefficient": 0.1, "weight_decay": 0.1}
        >>> set_decay_coefficient(group, 0.05)
        >>> group["weight_decay"], group["decay_coefficient"]
        (0.05, 0.05)
    """
    group["decay_coefficient"] = float(coefficient)
    group.update(torch_decay_keys(group.get("decay_mode", "none"), coefficient))


@dataclass(frozen=True)
class Rule:
    """How a group's penalty acts, read from lit_decay's keys or else from torch's own.

    ``mode`` is the lit_decay mode name, or ``"sgd"`` / ``"unknown"`` for what lit_decay has no mode for;
    ``coefficient`` is the strength; ``penalty`` picks the effective-decay formula.
    """

    mode: str
    coefficient: float
    penalty: Penalty

    @property
    def active(self) -> bool:
        """Whether the group is decayed at all (a mode other than ``none``, with a positive coefficient)."""
        return self.penalty is not Penalty.NONE

    @property
    def decoupled(self) -> bool:
        """Whether the decay is AdamW's ``w ← w·(1 − lr·wd)``: the groups with a timescale 1/(lr·wd)."""
        return self.mode == "decoupled" and self.active

    @property
    def l1(self) -> bool:
        """Whether the group is one of the L1 modes (active or not: its ``sparsity`` is still reported)."""
        return self.mode in L1_MODES


def group_rule(optimizer: Optimizer, group: Mapping[str, Any]) -> Rule:
    """The decay rule of ``group``: lit_decay's ``decay_mode`` if present, else what torch's keys mean.

    Torch applies its own ``"weight_decay"`` key whatever lit_decay's keys say (loops set it directly, as timm's and
    DINO's do): it is the coefficient of the modes torch applies, and a ``"none"`` group given one decays as torch's
    keys say.

    Examples:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> group_rule(torch.optim.AdamW([w], weight_decay=0.1), {"weight_decay": 0.1}).mode
        'decoupled'
        >>> group_rule(torch.optim.Adam([w], weight_decay=0.1), {"weight_decay": 0.1}).mode
        'l2'
        >>> group_rule(torch.optim.Adam([w]), {"decay_mode": "l1", "decay_coefficient": 0.1}).active
        True
    """
    adam = isinstance(optimizer, torch.optim.Adam)
    torch_key = group.get("weight_decay", 0.0) or 0.0
    if "decay_mode" in group and not (group["decay_mode"] == "none" and torch_key):
        mode = str(group["decay_mode"])
        spec = SPECS.get(mode)
        from_torch = spec is not None and spec.torch_applied
        coefficient = float(torch_key if from_torch else group.get("decay_coefficient", 0.0))
    else:
        coefficient = float(torch_key)
        if isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False)):
            mode = "decoupled"
        elif adam:
            mode = "l2"
        elif isinstance(optimizer, torch.optim.SGD):
            mode = "sgd"
        else:
            mode = "unknown"
    if coefficient == 0.0 or mode == "none":
        return Rule(mode, coefficient, Penalty.NONE)
    if mode == "sgd":
        return Rule(mode, coefficient, Penalty.DECOUPLED)
    spec = SPECS.get(mode)
    if spec is None or (not adam and spec.penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1)):
        return Rule(mode, coefficient, Penalty.UNKNOWN)
    return Rule(mode, coefficient, spec.penalty)


def group_names(optimizers: Sequence[Optimizer]) -> list[list[str]]:
    """Tag names of every group: its ``"name"`` key, else ``pg1``, ``pg2``... as Lightning's LearningRateMonitor
    names them; a name seen before gets the first free ``-1``, ``-2``... (never one that another group is named),
    so several optimizers never share a tag.

    Examples:
        >>> a = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": "decay"}], lr=0.1)
        >>> b = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> group_names([a, b, a])
        [['decay'], ['pg1'], ['decay-1']]
    """
    bases = [
        [str(group.get("name", f"pg{index + 1}")) for index, group in enumerate(optimizer.param_groups)]
        for optimizer in optimizers
    ]
    reserved = {base for current in bases for base in current}
    used: set[str] = set()
    names: list[list[str]] = []
    for current in bases:
        tagged = []
        for base in current:
            name, suffix = base, 0
            while name in used or (suffix and name in reserved):
                suffix += 1
                name = f"{base}-{suffix}"
            used.add(name)
            tagged.append(name)
        names.append(tagged)
    return names
