"""Is the decay doing anything? Rotational equilibrium, decay progress and the decay timescale against the run.

Two published results, as plain functions of a group's lr, decay and momentum:

- **Rotational equilibrium** (Kosson, Messmer & Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
  Across Neural Networks", ICML 2024). A weight tensor whose scale does not matter to the loss (one followed by a
  normalization) settles where decoupled decay's shrinking balances the updates' growth; its relative update per
  step ‖Δw‖/‖w‖ is then √(2·η·λ·(1−β₁)/(1+β₁)) under AdamW, and √(2·η·λ/(1+μ)) under SGD with momentum μ,
  whatever the size of the gradients. ``equilibrium`` is the measured ratio over that prediction: 1 at equilibrium.
- **Timescale against the run** (Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset
  size", 2024): decoupled decay forgets the past over τ = 1/(η·λ) steps. Over a run of T steps at constant η and λ
  it can shrink the weights by at most a factor e^(−T/τ), so a τ longer than the run means the decay has barely
  acted. ``decay_progress`` is Σ_t η_t·λ_t, the number of e-folds applied so far (T/τ for constant η and λ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer


def equilibrium_update_ratio(
    lr: float, weight_decay: float, *, beta1: float | None = None, momentum: float | None = None
) -> float:
    """The relative update ‖Δw‖/‖w‖ per step at rotational equilibrium (Kosson, Messmer & Jaggi, ICML 2024).

    AdamW (give ``beta1``): √(2·η·λ·(1−β₁)/(1+β₁)). SGD with momentum (give ``momentum``): √(2·η·λ/(1+μ)).

    Examples:
        >>> round(equilibrium_update_ratio(1e-3, 0.1, beta1=0.9), 6)
        0.003244
        >>> round(equilibrium_update_ratio(0.1, 5e-4, momentum=0.9), 6)
        0.007255
    """
    if (beta1 is None) == (momentum is None):
        raise ValueError(f"give exactly one of beta1 (Adam) or momentum (SGD); got beta1={beta1}, momentum={momentum}")
    if beta1 is not None:
        return math.sqrt(2.0 * lr * weight_decay * (1.0 - beta1) / (1.0 + beta1))
    assert momentum is not None
    return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))


def decay_timescale(lr: float, weight_decay: float) -> float:
    """τ = 1/(η·λ): the steps decoupled decay takes to shrink the weights by a factor e (inf without decay).

    Examples:
        >>> round(decay_timescale(3e-3, 0.05))
        6667
    """
    rate = lr * weight_decay
    return math.inf if rate <= 0 else 1.0 / rate


def removable_fraction(run_steps: float, timescale: float) -> float:
    """1 − e^(−T/τ): the most of the weight norm decay can remove in ``run_steps`` steps (Wang & Aitchison, 2024).

    Examples:
        >>> round(removable_fraction(440, decay_timescale(3e-3, 0.05)), 3)
        0.064
    """
    if math.isinf(timescale):
        return 0.0
    return 1.0 - math.exp(-run_steps / timescale)


def peak_lr(group: Mapping[str, Any]) -> float:
    """The largest lr the group's schedule reaches, as far as the group tells: the optimizer's lr, the
    ``initial_lr`` an lr scheduler records, and OneCycleLR's ``max_lr`` — never a warmup's starting 0.

    Examples:
        >>> peak_lr({"lr": 0.0, "initial_lr": 3e-4})
        0.0003
    """
    candidates = [group.get(key) for key in ("lr", "initial_lr", "max_lr")]
    return max(float(value) for value in candidates if value is not None)


def timescale_cells(lr: float, weight_decay: float, run_steps: float | None) -> tuple[str, str]:
    """The τ and τ/run-length cells of a grouping table ("–" where there is no decay or no known run length).

    Examples:
        >>> timescale_cells(3e-3, 0.05, 440)
        ('6,667', '15')
        >>> timescale_cells(1e-3, 0.0, 440)
        ('–', '–')
    """
    tau = decay_timescale(lr, weight_decay)
    if math.isinf(tau):
        return "–", "–"
    share = "–" if not run_steps or not math.isfinite(run_steps) else f"{tau / run_steps:.2g}"
    return f"{tau:,.0f}", share


def timescale_advice(lr: float, weight_decay: float, run_steps: float) -> str | None:
    """What to change when a decoupled group's τ = 1/(lr·wd) is longer than the run, in one sentence (else None).

    Information, not a warning: a smoke test's τ is always longer than its few steps. Wang & Aitchison (2024) find
    the best τ a fixed fraction of the run; ``WeightDecayScheduler(timescale_fraction=...)`` sets it that way.

    Examples:
        >>> print(timescale_advice(3e-3, 0.05, 440))  # doctest: +ELLIPSIS
        τ = 1/(lr·wd) = 6,667 steps is 15× the run of 440 steps: decay can remove at most 6% of the weight norm; ...
        >>> timescale_advice(3e-3, 3.0, 440) is None
        True
    """
    tau = decay_timescale(lr, weight_decay)
    if math.isinf(tau) or tau <= run_steps:
        return None
    return (
        f"τ = 1/(lr·wd) = {tau:,.0f} steps is {tau / run_steps:.2g}× the run of {run_steps:,.0f} steps: decay can "
        f"remove at most {removable_fraction(run_steps, tau):.0%} of the weight norm; "
        "WeightDecayScheduler(timescale_fraction=0.1) would make it act."
    )


def timescale_findings(optimizer: Optimizer, names: Sequence[str], run_steps: float | None) -> list[str]:
    """``timescale_advice`` for each decayed group with a timescale (decoupled) of ``optimizer``, at its peak lr,
    as lines ``group 'decay': ...``; none when the run's length is not known.

    Examples:
        >>> opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], lr=1e-3, weight_decay=0.01)
        >>> timescale_findings(opt, ["pg1"], 1_000)[0][:40]
        "group 'pg1': τ = 1/(lr·wd) = 100,000 ste"
    """
    from lit_decay.modes import rule_of  # the modes import torch's optimizers; the formulas above do not need them

    if not run_steps or not math.isfinite(run_steps):
        return []
    findings = []
    for name, group in zip(names, optimizer.param_groups):
        rule = rule_of(optimizer, group)
        advice = timescale_advice(peak_lr(group), rule.strength, run_steps) if rule.mode.timescale else None
        if advice is not None:
            findings.append(f"group {name!r}: {advice}")
    return findings


class DecayProgress:
    """Σ_t η_t·λ_t per group over every optimizer step: the e-folds of decoupled decay applied so far.

    ``add`` is called once per group and step with the group's host-side lr and coefficient: a float addition, no
    tensor work. A tensor lr (capturable or device-scheduled) is summed on its device instead, so that counting
    never waits for the device; it is read on the host only when the figures are asked for.

    Examples:
        >>> progress = DecayProgress()
        >>> for lr in (0.1, 0.2):
        ...     progress.add("decay", lr, 0.5)
        >>> progress.figures()
        {'decay': 0.15000000000000002}
        >>> DecayProgress.from_state(progress.state_dict()).figures() == progress.figures()
        True
    """

    def __init__(self) -> None:
        self._host: dict[str, float] = {}
        self._device: dict[str, torch.Tensor] = {}

    def add(self, name: str, lr: float | torch.Tensor, weight_decay: float) -> None:
        """Count one step of group ``name``."""
        if isinstance(lr, torch.Tensor):
            step = lr.detach() * weight_decay
            previous = self._device.get(name)
            self._device[name] = step.double() if previous is None else previous + step
            self._host.setdefault(name, 0.0)
        else:
            self._host[name] = self._host.get(name, 0.0) + float(lr) * weight_decay

    def figures(self) -> dict[str, float]:
        """The sums so far, by group (a tensor lr's sum is read from its device here)."""
        totals = dict(self._host)
        for name, total in self._device.items():
            totals[name] += float(total)
        return totals

    def state_dict(self) -> dict[str, float]:
        """Plain floats, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
        return self.figures()

    @classmethod
    def from_state(cls, state: Mapping[str, float]) -> DecayProgress:
        """A counter that continues from ``state_dict()``'s sums."""
        progress = cls()
        progress._host = {str(name): float(total) for name, total in state.items()}
        return progress
