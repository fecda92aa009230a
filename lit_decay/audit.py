"""The monitor's fit-start audit, as a plain function: what looks wrong in a model's optimizers, as messages.

``WeightDecayMonitor(audit=True)`` warns each message once at fit start; nothing here needs Lightning, so the audit
can be run (and tested) on any module and optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from lit_decay.configure import report_of
from lit_decay.modes import DECAY_MODES, rule_of
from lit_decay.rules import RULE_BIAS, RULE_NORMALIZATION, Placement, clean_name, place_parameters
from lit_decay.tags import group_names

AUDIT = "WeightDecayMonitor audit"


def audit_messages(module: nn.Module, optimizers: Sequence[Optimizer]) -> list[str]:
    """Warnings about defects in how ``optimizers`` decay ``module``'s parameters; an empty list when there is none.

    - trainable parameters that are in no optimizer;
    - a hand-built optimizer (not ``configure_adam``'s) that decays normalization or bias parameters;
    - groups asking for a mode only ``lit_decay.Adam`` applies (the L1 modes) in another optimizer, which reads
      their strength as its own decay.

    Information (a decay timescale longer than the run) is no defect: it goes to the grouping summary and the
    TensorBoard text (``lit_decay.diagnostics.timescale_advice``), as LearningRateMonitor stays quiet.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> for message in audit_messages(model, [optimizer]):
        ...     print(message[:90])
        WeightDecayMonitor audit: optimizer 0 (AdamW) applies weight decay to 3 normalization or b
    """
    messages = _missing_parameters(module, optimizers)
    try:
        placements: dict[int, Placement] | None = {id(p.tensor): p for p in place_parameters(module)[0]}
    except ValueError as error:
        # e.g. a lazy module before its first forward: the audit only comments, it must not stop the run.
        placements = None
        messages.append(
            f"{AUDIT}: could not check which parameters are normalization or bias parameters "
            f"({error}); that part of the audit is skipped."
        )
    names = group_names(optimizers)
    labels = [f"optimizer {index} ({type(optimizer).__name__})" for index, optimizer in enumerate(optimizers)]
    for label, optimizer, group_labels in zip(labels, optimizers, names):
        if report_of(optimizer) is None and placements is not None:
            messages.extend(_decayed_norms_and_biases(label, optimizer, placements))
        messages.extend(_unapplied_modes(label, optimizer, group_labels))
    return messages


def listing(items: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are.

    Examples:
        >>> listing(["a", "b", "c"], limit=2)
        'a, b, ... (1 more)'
    """
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _missing_parameters(module: nn.Module, optimizers: Sequence[Optimizer]) -> list[str]:
    in_optimizers = {id(p) for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
    missing = [clean_name(n) for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_optimizers]
    if not missing:
        return []
    return [
        f"{AUDIT}: {len(missing)} trainable parameter(s) are in no optimizer and will not be "
        f"trained: {listing(missing)}. Freeze them (requires_grad=False) or add them to an optimizer."
    ]


def _decayed_norms_and_biases(label: str, optimizer: Optimizer, placements: dict[int, Placement]) -> list[str]:
    decayed = [
        f"{placement.name} ({placement.reason})"
        for group in optimizer.param_groups
        if rule_of(optimizer, group).active
        for p in group["params"]
        if (placement := placements.get(id(p))) is not None and placement.rule in (RULE_NORMALIZATION, RULE_BIAS)
    ]
    if not decayed:
        return []
    return [
        f"{AUDIT}: {label} applies weight decay to {len(decayed)} normalization or bias "
        f"parameter(s): {listing(decayed)}. Usually they should not be decayed; build the groups with "
        "lit_decay.param_groups(...) or lit_decay.configure_adam(...)."
    ]


def _unapplied_modes(label: str, optimizer: Optimizer, names: Sequence[str]) -> list[str]:
    # Torch applies no L1 term: an optimizer other than lit_decay.Adam reads such a group's strength as its own decay.
    unapplied = [
        f"{name} ({group['decay_mode']}, applied as {rule.mode.name})"
        for name, group in zip(names, optimizer.param_groups)
        if (mode := DECAY_MODES.get(str(group.get("decay_mode")))) is not None
        and mode.needs_lit_decay
        and not (rule := rule_of(optimizer, group)).lit_decay
        and rule.strength > 0
    ]
    if not unapplied:
        return []
    return [
        f"{AUDIT}: {label} has group(s) {listing(unapplied)} whose decay_mode only lit_decay.Adam applies; "
        f"{type(optimizer).__name__} reads their weight_decay as its own decay instead. Build the optimizer with "
        "lit_decay.configure_adam(...) or lit_decay.Adam(param_groups)."
    ]
