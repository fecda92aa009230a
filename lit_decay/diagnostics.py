"""Is the decay doing anything? Rotational equilibrium, decay progress, the decay timescale against the run, and the
report of what the decay did in a run (``DecayRecord``, ``decay_report``), as plain functions without Lightning.

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
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from lit_decay.grouping import Table

if TYPE_CHECKING:
    from lit_decay.modes import DecayMode


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
        # The last step's lr·wd of each group (a device scalar for a tensor lr): the decay report's τ at the end.
        # Not saved: the next step after a resume sets it again.
        self._last: dict[str, float | torch.Tensor] = {}

    def add(self, name: str, lr: float | torch.Tensor, weight_decay: float) -> None:
        """Count one step of group ``name``."""
        if isinstance(lr, torch.Tensor):
            step = lr.detach() * weight_decay
            previous = self._device.get(name)
            self._device[name] = step.double() if previous is None else previous + step
            self._host.setdefault(name, 0.0)
            self._last[name] = step
        else:
            rate = float(lr) * weight_decay
            self._host[name] = self._host.get(name, 0.0) + rate
            self._last[name] = rate

    def last_rates(self) -> dict[str, float]:
        """Each counted group's lr·wd at its last step (read from the device here for a tensor lr).

        Examples:
            >>> progress = DecayProgress()
            >>> progress.add("decay", 0.1, 0.5); progress.add("decay", 0.2, 0.5)
            >>> progress.last_rates()
            {'decay': 0.1}
        """
        return {name: float(rate) for name, rate in self._last.items()}

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


# ---- the end-of-fit decay report ----------------------------------------------------------------------------------

#: Decoupled decay "acted" once it applied at least one e-fold over the run (Σ lr·wd ≥ 1): the decay alone could then
#: remove 63% or more of the weight norm. Below, the weights are mostly what the updates made them.
ACTED_EFOLDS = 1.0
#: ``equilibrium`` "held" when its mean over the last quarter of the logging steps is within this of 1.
EQUILIBRIUM_TOLERANCE = 0.2
#: The timescale fraction the advice suggests: ten e-folds over the run, a tenth of it per e-fold.
SUGGESTED_FRACTION = 0.1

REPORT_FIELDS: tuple[str, ...] = (
    "mode",
    "run_steps",
    "decay_progress",
    "timescale_over_run",
    "weight_norm_first",
    "weight_norm_last",
    "first_step",
    "last_step",
    "equilibrium_last",
    "equilibrium_mean_last_quarter",
    "equilibrium_held",
    "sparsity_last",
    "acted",
    "advice",
)


class DecayRecord:
    """The few host floats per group that the end-of-fit decay report is made from, noted from the figures of each
    logging step (no tensor work: the figures are already floats on the host).

    Per group: the steps and values of the first and last ``weight_norm``, the last ``effective_decay``,
    ``decay_timescale`` and ``sparsity``, the largest and last strength, and the ``equilibrium`` values that can
    still belong to the last quarter of the logging steps. That quarter ends at the last step, and only its start
    moves, forward: once ``n`` values were seen, the first ``⌊3n/4⌋`` can never be in it, and are dropped. Plain
    Python data, so a checkpoint holding ``state_dict()`` loads with ``torch.load(weights_only=True)``.

    Examples:
        >>> record = DecayRecord()
        >>> for step, value in enumerate([0.2, 0.5, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0]):
        ...     record.add(step, "decay", {"equilibrium": value, "weight_norm": 10.0 - step}, weight_decay=0.1)
        >>> record.equilibrium_window("decay")
        [1.05, 1.0]
        >>> DecayRecord.from_state(record.state_dict()).state_dict() == record.state_dict()
        True
    """

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, Any]] = {}

    def add(self, step: int, group: str, figures: Mapping[str, float], weight_decay: float) -> None:
        """Note what group ``group`` logged at ``step`` (``figures`` keyed by metric) and its strength then."""
        entry = self._groups.setdefault(
            group,
            {
                "weight_norm_first": None,
                "weight_norm_last": None,
                "first_step": None,
                "last_step": None,
                "effective_decay_last": None,
                "decay_timescale_last": None,
                "sparsity_last": None,
                "weight_decay_max": 0.0,
                "weight_decay_last": 0.0,
                "equilibrium_seen": 0,
                "equilibrium_from": 0,
                "equilibrium": [],
            },
        )
        strength = float(weight_decay)
        entry["weight_decay_last"] = strength
        entry["weight_decay_max"] = max(entry["weight_decay_max"], strength)
        norm = figures.get("weight_norm")
        if norm is not None:
            if entry["weight_norm_first"] is None:
                entry["weight_norm_first"], entry["first_step"] = float(norm), int(step)
            entry["weight_norm_last"], entry["last_step"] = float(norm), int(step)
        for metric in ("effective_decay", "decay_timescale", "sparsity"):
            if metric in figures:
                entry[f"{metric}_last"] = float(figures[metric])
        value = figures.get("equilibrium")
        if value is not None:
            entry["equilibrium_seen"] += 1
            entry["equilibrium"].append(float(value))
            drop = (3 * entry["equilibrium_seen"]) // 4 - entry["equilibrium_from"]
            if drop > 0:
                del entry["equilibrium"][:drop]
                entry["equilibrium_from"] += drop

    def groups(self) -> list[str]:
        """The groups noted so far, in the order they first logged."""
        return list(self._groups)

    def get(self, group: str) -> dict[str, Any]:
        """What was noted of ``group`` (an empty dict when it never logged)."""
        return dict(self._groups.get(group, {}))

    def equilibrium_window(self, group: str) -> list[float]:
        """The ``equilibrium`` values of the last quarter of ``group``'s logging steps so far (⌈n/4⌉ of n)."""
        return list(self._groups.get(group, {}).get("equilibrium", []))

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data: a copy of every group's entry."""
        return {name: {**entry, "equilibrium": list(entry["equilibrium"])} for name, entry in self._groups.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, Mapping[str, Any]]) -> DecayRecord:
        """A record that continues from ``state_dict()``."""
        record = cls()
        record._groups = {
            str(name): {**entry, "equilibrium": list(entry["equilibrium"])} for name, entry in state.items()
        }
        return record


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (the report stays JSON-safe)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _times(value: float) -> str:
    """A ratio as a reader says it: "12", "170", "27,000", "1.5", "0.083".

    Examples:
        >>> [_times(v) for v in (12.4, 170.0, 27_041.0, 1.5, 0.0833)]
        ['12', '170', '27,041', '1.5', '0.083']
    """
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _percent(value: float) -> str:
    """A fraction as a percentage, with two digits where it is below 1%: "8%", "0.31%"."""
    return f"{value:.0%}" if value >= 0.01 else f"{value * 100:.2g}%"


def decay_report(
    record: DecayRecord,
    modes: Mapping[str, DecayMode],
    *,
    run_steps: int,
    progress: Mapping[str, float] | None = None,
    last_rates: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """What the decay did in a run, per decayed group: a JSON-safe dict keyed by group, with the ``REPORT_FIELDS``.

    ``modes`` gives each group's ``DecayMode`` (in the order of the report), ``run_steps`` the run's optimizer steps
    T, ``progress`` the groups' ``decay_progress`` (``DecayProgress.figures()``) and ``last_rates`` their lr·wd at the
    last step (``DecayProgress.last_rates()``). A group is in the report when its mode decays and it had a positive
    strength at a logging step or applied some decay. Fields (None where the run did not log what they need):

    - ``mode``, ``run_steps`` (T);
    - ``decay_progress``: Σ lr·wd over the run, the e-folds decoupled decay applied (decoupled groups);
    - ``timescale_over_run``: τ/T at the end, τ = 1/(lr·wd) of the last step for decoupled groups, else
      1/``effective_decay`` of the last logging step;
    - ``weight_norm_first``, ``weight_norm_last``: ``weight_norm`` at the first and last logging steps, which are
      ``first_step`` and ``last_step``;
    - ``equilibrium_last``; ``equilibrium_mean_last_quarter``, the mean over the last quarter of the logging steps
      (⌈n/4⌉ of n); ``equilibrium_held``, whether that mean is within 20% of 1 (one step's value fluctuates around
      the average the theory predicts, so the average is what is compared);
    - ``sparsity_last`` (L1 groups);
    - ``acted``: decoupled groups, ``decay_progress`` ≥ 1 (``ACTED_EFOLDS``); other modes, τ ≤ T at the last logging
      step;
    - ``advice``: one sentence when decay did not act (what to change), or when it acted, τ at the end fits in the
      last quarter of the run (so equilibrium had time to settle) and a measured ``equilibrium`` did not hold near 1
      (why, and how to see it); else None.

    Examples:
        >>> from lit_decay.modes import DECAY_MODES
        >>> record = DecayRecord()
        >>> record.add(9, "decay", {"weight_norm": 8.0, "equilibrium": 0.9}, weight_decay=0.05)
        >>> record.add(99, "decay", {"weight_norm": 7.5, "equilibrium": 0.95}, weight_decay=0.05)
        >>> report = decay_report(record, {"decay": DECAY_MODES["decoupled"]}, run_steps=100,
        ...                       progress={"decay": 1 / 12}, last_rates={"decay": 1 / 1200})
        >>> report["decay"]["acted"], report["decay"]["timescale_over_run"]
        (False, 12.0)
        >>> print(report["decay"]["advice"])  # doctest: +ELLIPSIS
        τ is 12× the run: decay removed 8% of the weight norm; WeightDecayScheduler(timescale_fraction=0.1) would ...
    """
    progress = progress or {}
    last_rates = last_rates or {}
    report: dict[str, dict[str, Any]] = {}
    for name, mode in modes.items():
        entry = record.get(name)
        counted = _finite(progress.get(name)) if mode.timescale else None
        if not mode.decays or (entry.get("weight_decay_max", 0.0) <= 0 and not counted):
            continue
        if mode.timescale:
            rate = _finite(last_rates.get(name))
            rate = _finite(entry.get("effective_decay_last")) if rate is None else rate
            tau = 1.0 / rate if rate else None
        else:
            tau = _finite(entry.get("decay_timescale_last"))
            effective = _finite(entry.get("effective_decay_last"))
            tau = 1.0 / effective if tau is None and effective else tau
        over_run = tau / run_steps if tau is not None and run_steps > 0 else None
        window = [v for v in record.equilibrium_window(name) if math.isfinite(v)]
        mean = sum(window) / len(window) if window else None
        held = None if mean is None else abs(mean - 1.0) <= EQUILIBRIUM_TOLERANCE
        if counted is not None:
            acted: bool | None = counted >= ACTED_EFOLDS
        else:
            acted = None if over_run is None else over_run <= 1.0
        fields = {
            "mode": mode.name,
            "run_steps": int(run_steps),
            "decay_progress": counted,
            "timescale_over_run": over_run,
            "weight_norm_first": _finite(entry.get("weight_norm_first")),
            "weight_norm_last": _finite(entry.get("weight_norm_last")),
            "first_step": entry.get("first_step"),
            "last_step": entry.get("last_step"),
            "equilibrium_last": _finite(window[-1]) if window else None,
            "equilibrium_mean_last_quarter": mean,
            "equilibrium_held": held,
            "sparsity_last": _finite(entry.get("sparsity_last")) if mode.sparsity else None,
            "acted": acted,
        }
        fields["advice"] = _advice(fields)
        report[name] = fields
    return report


def _advice(fields: Mapping[str, Any]) -> str | None:
    """The one sentence of a report entry: what to change when decay did not act, or why equilibrium did not hold."""
    suggestion = f"WeightDecayScheduler(timescale_fraction={SUGGESTED_FRACTION:g})"
    progress, over_run = fields["decay_progress"], fields["timescale_over_run"]
    if fields["acted"] is False and progress is not None:
        if progress <= 0:
            return f"decay applied no e-fold (lr·wd was 0 at every step); {suggestion} would make it act."
        removed = 1.0 - math.exp(-progress)
        return (
            f"τ is {_times(1.0 / progress)}× the run: decay removed {_percent(removed)} of the weight norm; "
            f"{suggestion} would make it act."
        )
    if fields["acted"] is False and over_run is not None:
        return (
            f"τ = 1/effective_decay is {_times(over_run)}× the run at the last logging step: the {fields['mode']} "
            f"penalty removed little of the weight norm; about {_times(over_run / SUGGESTED_FRACTION)}× its "
            f"weight_decay would bring τ to a tenth of the run (or use mode='decoupled' with {suggestion})."
        )
    # Equilibrium is approached over about τ steps: only a τ that fits in the last quarter says it should hold there.
    settles = over_run is not None and over_run <= 0.25
    if fields["acted"] and fields["equilibrium_held"] is False and settles:
        return (
            f"equilibrium averaged {fields['equilibrium_mean_last_quarter']:.2f} over the last quarter of the run, not "
            "1: only weights followed by a normalization settle at 1, and a group that also holds others (a head, "
            "embeddings) is pulled away from it; an override that gives the normalized weights a group of their own "
            "shows them apart."
        )
    return None


def _cell(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report_table(report: Mapping[str, Mapping[str, Any]]) -> Table:
    """The report as one row per group (``lit_decay.grouping.Table``: drawn as text or as markdown).

    Examples:
        >>> entry = dict.fromkeys(REPORT_FIELDS)
        >>> entry.update(mode="decoupled", decay_progress=10.0, timescale_over_run=0.1, weight_norm_first=9.0,
        ...              weight_norm_last=4.5, acted=True)
        >>> for line in report_table({"decay": entry}).text_lines():
        ...     print(line)
        group  mode       e-folds  τ/run  weight_norm first → last  equilibrium (last-quarter mean)  sparsity  acted
        decay  decoupled       10    0.1  9 → 4.5                   –                                –         yes
    """
    rows = []
    for name, entry in report.items():
        first, last = entry["weight_norm_first"], entry["weight_norm_last"]
        norms = "–" if first is None or last is None else f"{first:.4g} → {last:.4g}"
        mean = entry["equilibrium_mean_last_quarter"]
        equilibrium = "–"
        if mean is not None:
            verdict = "near 1" if entry["equilibrium_held"] else "not near 1"
            equilibrium = f"{entry['equilibrium_last']:.2f} ({mean:.2f}, {verdict})"
        acted = {True: "yes", False: "no", None: "?"}[entry["acted"]]
        rows.append(
            (
                name,
                entry["mode"],
                _cell(entry["decay_progress"], ".3g"),
                "–" if entry["timescale_over_run"] is None else _times(entry["timescale_over_run"]),
                norms,
                equilibrium,
                _cell(entry["sparsity_last"], ".1%"),
                acted,
            )
        )
    header = ("group", "mode", "e-folds", "τ/run", "weight_norm first → last", "equilibrium (last-quarter mean)")
    return Table((*header, "sparsity", "acted"), tuple(rows), numeric=(2, 3))


def report_title(report: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's first line: what it is and how long the run was.

    Examples:
        >>> report_title({"decay": {"run_steps": 440}})
        'decay report after 440 optimizer steps (e-folds = decay_progress, Σ lr·wd; τ/run at the last step)'
    """
    steps = next((entry["run_steps"] for entry in report.values()), 0)
    return f"decay report after {steps:,} optimizer steps (e-folds = decay_progress, Σ lr·wd; τ/run at the last step)"


def report_text(report: Mapping[str, Mapping[str, Any]]) -> str:
    """The report as the plain text shown at the end of fit: a title, the table, one line per piece of advice."""
    if not report:
        return "lit_decay: no param group was decayed in this run: no decay report."
    lines = [f"lit_decay: {report_title(report)}", *("  " + line for line in report_table(report).text_lines())]
    lines += [f"group {name!r}: {entry['advice']}" for name, entry in report.items() if entry["advice"]]
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Mapping[str, Any]]) -> str:
    """The report as markdown (TensorBoard's text tab): the same title, table and advice."""
    if not report:
        return "No param group was decayed in this run: no decay report."
    parts = [f"**{report_title(report)}**", "\n".join(report_table(report).markdown_lines())]
    parts += [f"group `{name}`: {entry['advice']}" for name, entry in report.items() if entry["advice"]]
    return "\n\n".join(parts)
