"""Weight-decay schedules, and decay given as a timescale instead of a coefficient.

A schedule is a factor of each group's base coefficient as a function of the optimizer step, written into the group's
``"weight_decay"`` before every step: the one home of a group's strength, whatever its mode. Shapes: ``"constant"``,
``"linear"`` and ``"cosine"`` from ``start_factor`` to ``end_factor`` over the run, an optional linear warmup from 0,
or any callable of the step.

A timescale τ fixes how many steps decoupled decay takes to shrink the weights by e: lr·wd = 1/τ, so wd = 1/(lr·τ).
Given in epochs, τ_steps = τ_epochs · (optimizer steps per epoch) = τ_epochs · N/B for N samples in batches of B;
given as a fraction f of the run, τ_steps = f · T for a run of T optimizer steps, which is what Wang & Aitchison
(2024) find transfers across model and data sizes. ``hold_timescale=True`` (the default with a fraction) recomputes
wd from the current lr at every step, which keeps τ fixed while an lr scheduler moves lr: the decay coefficient is
then proportional to 1/lr. Otherwise wd is computed once, from the lr the run starts from, and τ follows the lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from lit_decay._checks import check_bool, check_non_negative, is_real_number
from lit_decay.modes import Rule, rule_of
from lit_decay.tags import group_names

SHAPES = ("constant", "linear", "cosine")

Schedule = str | Callable[[int], float]


def schedule_factor(
    shape: str,
    step: int,
    total_steps: int,
    *,
    start_factor: float = 1.0,
    end_factor: float = 1.0,
    warmup_steps: int = 0,
) -> float:
    """The factor of the base coefficient at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup ramps linearly from 0 to ``start_factor`` over ``warmup_steps``; then ``"linear"`` and ``"cosine"`` go from
    ``start_factor`` to ``end_factor`` by the last step, ``"constant"`` stays at ``start_factor``.

    Examples:
        >>> [round(schedule_factor("cosine", s, 5, start_factor=1.0, end_factor=0.0), 3) for s in range(5)]
        [1.0, 0.854, 0.5, 0.146, 0.0]
        >>> [schedule_factor("linear", s, 6, end_factor=3.0, warmup_steps=2) for s in range(6)]
        [0.0, 0.5, 1.0, 1.6666666666666665, 2.333333333333333, 3.0]
    """
    if warmup_steps and step < warmup_steps:
        return start_factor * step / warmup_steps
    if shape == "constant":
        return start_factor
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if shape == "linear":
        return start_factor + (end_factor - start_factor) * progress
    if shape == "cosine":
        return end_factor + (start_factor - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule={shape!r} is not a schedule shape; valid shapes are {', '.join(SHAPES)} or a callable")


def timescale_coefficient(lr: float, timescale_steps: float) -> float:
    """The decoupled decay coefficient wd = 1/(lr·τ) whose timescale is ``timescale_steps`` at ``lr``.

    lr = 0 applies no decoupled decay whatever wd is (e.g. the last step of a cosine lr schedule): then 0.

    Examples:
        >>> timescale_coefficient(0.01, 100.0)
        1.0
        >>> timescale_coefficient(0.0, 100.0)
        0.0
    """
    return 1.0 / (lr * timescale_steps) if lr > 0 else 0.0


def batches_in_run(estimated_batches: float, *, max_steps: int | None = None, optimizers: int = 1) -> float:
    """The training steps (batches that step the optimizers) of a run, from Lightning's estimate.

    ``estimated_batches`` is ``trainer.estimated_stepping_batches``. In manual optimization with several optimizers
    Lightning's ``max_steps`` counts every optimizer's steps (``global_step``) while a schedule counts batches: with
    each optimizer stepping once per batch, the run ends after ``max_steps / optimizers`` batches. Give
    ``max_steps`` only in that case (None or -1: no step limit).

    Examples:
        >>> batches_in_run(100.0)
        100.0
        >>> batches_in_run(100.0, max_steps=60, optimizers=2)
        30
    """
    if optimizers > 1 and max_steps is not None and max_steps != -1:
        return min(estimated_batches, math.ceil(max_steps / optimizers))
    return estimated_batches


def _positive(name: str, value: Any) -> float:
    value = check_non_negative(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return value


def _timescale_kind(rule: Rule) -> bool:
    """Whether a timescale describes ``rule``'s decay (its mode has one: ``decoupled``), at any coefficient.

    Not ``rule.active``, which also asks for a positive coefficient: with a timescale the coefficient is
    1/(lr·τ), so a group built with weight_decay=0 is scheduled too.
    """
    return rule.mode.timescale


@dataclass(frozen=True)
class ScheduleSettings:
    """The arguments of a ``WeightDecayScheduler``, checked and normalized; usable without Lightning.

    Building one raises ``ValueError`` (``TypeError`` for a non-number or non-boolean) naming the bad argument. See
    ``WeightDecayScheduler`` for what each argument means.

    Examples:
        >>> settings = ScheduleSettings("linear", end_factor=0.0, total_steps=3)
        >>> [settings.factor(step) for step in range(3)]
        [1.0, 0.5, 0.0]
        >>> ScheduleSettings(timescale_epochs=2.0, steps_per_epoch=50).timescale()
        100.0
        >>> ScheduleSettings(timescale_fraction=0.1).timescale(total_steps=2_000)
        200.0
        >>> ScheduleSettings(hold_timescale=True)
        Traceback (most recent call last):
        ...
        ValueError: hold_timescale=True needs a timescale: set timescale_fraction, timescale_steps or timescale_epochs
    """

    schedule: Schedule = "constant"
    start_factor: float = 1.0
    end_factor: float = 1.0
    warmup_steps: int = 0
    total_steps: int | None = None
    groups: Sequence[str] | None = None  # a tuple once built (one name given as a string becomes one)
    timescale_steps: float | None = None
    timescale_epochs: float | None = None
    steps_per_epoch: float | None = None
    hold_timescale: bool | None = None  # None: hold a fraction of the run, not steps or epochs
    timescale_fraction: float | None = None

    def __post_init__(self) -> None:
        # Frozen: the checked, normalized values (floats from numpy's numbers, a tuple of groups) replace the given.
        def normalize(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        schedule, warmup_steps, total_steps = self.schedule, self.warmup_steps, self.total_steps
        if not callable(schedule) and schedule not in SHAPES:
            raise ValueError(f"schedule={schedule!r} is not valid; valid values are {', '.join(SHAPES)} or a callable")
        normalize("start_factor", check_non_negative("start_factor", self.start_factor))
        normalize("end_factor", check_non_negative("end_factor", self.end_factor))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive int or None (from the Trainer); got {total_steps!r}")
        check_warmup(warmup_steps, total_steps)
        groups: Any = self.groups
        normalize("groups", None if groups is None else (groups,) if isinstance(groups, str) else tuple(groups))
        if self.groups == ():
            raise ValueError(
                f"groups={groups!r} names no param group, so the schedule would cover nothing; name the groups to "
                "schedule (e.g. groups=['decay']), or leave groups=None for every decayed group"
            )
        steps, epochs, per_epoch = self.timescale_steps, self.timescale_epochs, self.steps_per_epoch
        fraction = self.timescale_fraction
        named = (("timescale_fraction", fraction), ("timescale_steps", steps), ("timescale_epochs", epochs))
        given = [f"{name}={value!r}" for name, value in named if value is not None]
        if len(given) > 1:
            both = "both" if len(given) == 2 else "all"
            raise ValueError(f"give the decay timescale once: {' and '.join(given)} were {both} set")
        normalize("timescale_steps", None if steps is None else _positive("timescale_steps", steps))
        normalize("timescale_epochs", None if epochs is None else _positive("timescale_epochs", epochs))
        normalize("timescale_fraction", None if fraction is None else _positive("timescale_fraction", fraction))
        if self.timescale_steps is not None:
            check_timescale(self.timescale_steps, f"timescale_steps={steps!r}")
        if per_epoch is not None and epochs is None:
            raise ValueError(f"steps_per_epoch={per_epoch!r} is only used with timescale_epochs, which is not set")
        normalize("steps_per_epoch", None if per_epoch is None else _positive("steps_per_epoch", per_epoch))
        hold = self.timescale_fraction is not None if self.hold_timescale is None else self.hold_timescale
        normalize("hold_timescale", check_bool("hold_timescale", hold))
        if self.hold_timescale and not self.uses_timescale:
            raise ValueError(
                "hold_timescale=True needs a timescale: set timescale_fraction, timescale_steps or timescale_epochs"
            )
        if self.timescale_fraction is not None and self.total_steps is not None:
            check_timescale(self.timescale_fraction * self.total_steps, self._fraction_label(self.total_steps))

    @property
    def uses_timescale(self) -> bool:
        """Whether decay is given as a timescale τ (wd = 1/(lr·τ)) rather than by the groups' coefficients."""
        return any(t is not None for t in (self.timescale_steps, self.timescale_epochs, self.timescale_fraction))

    @property
    def holds_timescale(self) -> bool:
        """Whether wd = 1/(lr·τ) is recomputed from the current lr at every step: ``hold_timescale``, which defaults
        to True with a ``timescale_fraction`` (τ a fixed fraction of the run, whatever lr does) and to False with
        ``timescale_steps`` or ``timescale_epochs``."""
        return bool(self.hold_timescale)

    @property
    def needs_run_length(self) -> bool:
        """Whether the settings depend on the run's length: the ``"linear"`` and ``"cosine"`` shapes, and
        ``timescale_fraction``."""
        return (not callable(self.schedule) and self.schedule != "constant") or self.timescale_fraction is not None

    def _fraction_label(self, total_steps: float) -> str:
        return f"timescale_fraction={self.timescale_fraction!r} of a run of {total_steps:,.0f} steps"

    def factor(self, step: int, total_steps: int | None = None) -> float:
        """The factor at optimizer step ``step`` (0-based) of a run of ``total_steps`` (default: ``total_steps``
        given at construction); raises if a callable returns a bad value, or if a shape needs an unknown length."""
        if callable(self.schedule):
            value = self.schedule(step)
            if not is_real_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"the weight-decay schedule returned {value!r} at step {step}; it must be a finite number >= 0"
                )
            return float(value)
        total = total_steps or self.total_steps
        if total is None and self.needs_run_length:
            raise ValueError(
                f"schedule={self.schedule!r} needs the run's length: pass total_steps= (within a Lightning fit it "
                "defaults to the Trainer's estimated_stepping_batches)"
            )
        return schedule_factor(
            self.schedule,
            step,
            total or 1,
            start_factor=self.start_factor,
            end_factor=self.end_factor,
            warmup_steps=self.warmup_steps,
        )

    def timescale(self, steps_per_epoch: float | None = None, total_steps: float | None = None) -> float | None:
        """τ in optimizer steps (None without a timescale); ``timescale_epochs`` is multiplied by the given
        ``steps_per_epoch`` or, when given, the one set at construction, and ``timescale_fraction`` by the given
        ``total_steps`` or the one set at construction (None when neither is known).

        Raises ``ValueError`` when τ would be 1 step or less: lr·wd = 1/τ ≥ 1 flips the weights' sign every step.
        """
        if self.timescale_fraction is not None:
            total = self.total_steps or total_steps
            if total is None:
                return None
            return check_timescale(self.timescale_fraction * total, self._fraction_label(total))
        if self.timescale_epochs is None:
            return self.timescale_steps
        per_epoch = self.steps_per_epoch or steps_per_epoch
        if per_epoch is None:
            return None
        label = f"timescale_epochs={self.timescale_epochs!r} of {per_epoch:,.4g} steps each"
        return check_timescale(self.timescale_epochs * per_epoch, label)

    def selects(self, name: str, rule: Rule) -> bool:
        """Whether a group named ``name`` with decay ``rule`` is scheduled: the ones named in ``groups``, else every
        decayed group; with a timescale, every ``decoupled`` group, whatever its coefficient (τ replaces it)."""
        if self.groups is not None:
            return name in self.groups
        return _timescale_kind(rule) if self.uses_timescale else rule.active

    def check_groups(self, optimizers: Sequence[Optimizer]) -> None:
        """Raise ``ValueError`` if ``groups`` names a group the optimizers do not have, if the schedule covers no
        group at all, or if a timescale would be given to a scheduled group whose decay is not decoupled."""
        all_names = group_names(list(optimizers))
        known = [n for names in all_names for n in names]
        unknown = [g for g in self.groups or () if g not in known]
        if unknown:
            raise ValueError(
                f"WeightDecayScheduler groups {unknown!r} are not param groups of the optimizers; "
                f"valid group names are {known!r}"
            )
        rules = [
            (name, rule_of(optimizer, group))
            for optimizer, names in zip(optimizers, all_names)
            for name, group in zip(names, optimizer.param_groups)
        ]
        for name, rule in rules:
            scheduled = name in self.groups if self.groups is not None else rule.active
            if self.uses_timescale and scheduled and not _timescale_kind(rule):
                raise ValueError(
                    f"a decay timescale τ = 1/(lr·wd) describes decoupled decay, but group {name!r} has mode "
                    f"{rule.mode.name!r}; use mode='decoupled' or leave this group out with groups="
                )
        if not any(self.selects(name, rule) for name, rule in rules):
            listed = ", ".join(f"{name} ({rule.mode.name}, weight_decay={rule.strength:g})" for name, rule in rules)
            wanted = "'decoupled' groups" if self.uses_timescale else "groups with a decay mode and weight_decay > 0"
            raise ValueError(
                f"the WeightDecayScheduler covers no param group: it schedules {wanted} (or those named in groups=), "
                f"and the groups are {listed or 'none'}"
            )


def check_warmup(warmup_steps: int, total_steps: float | None) -> None:
    """Raise ``ValueError`` when a warm-up of ``warmup_steps`` is longer than a run of ``total_steps`` (None: not known
    yet, nothing to check).

    Examples:
        >>> check_warmup(10, 5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: warmup_steps=10 is longer than the run of 5 optimizer steps: the schedule would never reach ...
    """
    if total_steps is not None and warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r} is longer than the run of {total_steps:,.0f} optimizer steps: the schedule "
            "would never reach its start_factor"
        )


def check_timescale(timescale: float, given: str) -> float:
    """Return ``timescale`` (τ in optimizer steps) if it is longer than one step, else raise ``ValueError`` naming
    what ``given`` it: lr·wd = 1/τ ≥ 1 would flip the weights' sign at every step.

    Examples:
        >>> check_timescale(0.5, "timescale_fraction=0.1 of a run of 5 steps")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: timescale_fraction=0.1 of a run of 5 steps is a decay timescale of 0.5 optimizer steps: ...
    """
    if timescale <= 1.0:
        raise ValueError(
            f"{given} is a decay timescale of {timescale:.4g} optimizer steps: lr·wd = 1/τ = {1.0 / timescale:.4g} ≥ 1 "
            "would flip the weights' sign at every step; τ must be more than 1 step"
        )
    return timescale


def _setting(name: str) -> Any:
    """A read-only attribute of the callback that is its ``settings``' field ``name``."""
    return property(lambda self: getattr(self.settings, name), doc=f"The checked ``{name}`` argument.")


class WeightDecayScheduler(Callback):
    r"""Schedule each param group's weight decay over training, or set it from a decay timescale.

    The factor multiplies each scheduled group's base coefficient (its ``"weight_decay"`` at the start of training,
    or ``1/(lr·τ)`` with a timescale) and is written into the group before every optimizer step. Groups with mode
    ``"none"`` or a zero coefficient are left alone unless named in ``groups``. The base coefficients are saved in
    checkpoints, so a resumed run continues the schedule where it stopped. ``lit_decay.WeightDecayMonitor`` logs the
    result as ``weight_decay`` and ``effective_decay``.

    ``timescale_fraction=f`` is Wang & Aitchison (2024)'s advice as one argument: τ = 1/(lr·wd) held at f·T for a
    run of T optimizer steps, wd recomputed from the current lr before every step (through lr warm-up and decay).

    Args:
        schedule: ``"constant"``, ``"linear"``, ``"cosine"``, or a callable ``factor(step)`` of the 0-based
            optimizer step.
        start_factor: factor after warmup (shapes only).
        end_factor: factor at the last step (``"linear"`` and ``"cosine"``).
        warmup_steps: linear ramp of the factor from 0 to ``start_factor`` over these many steps.
        total_steps: length of the schedule; None takes ``trainer.estimated_stepping_batches``.
        groups: names of the groups to schedule (``"name"`` key, else ``pg1``, ``pg2``...); None for every decayed
            group.
        timescale_steps: give decay as τ in optimizer steps: wd = 1/(lr·τ) (decoupled groups only).
        timescale_epochs: give decay as τ in epochs: τ_steps = τ_epochs · steps per epoch.
        steps_per_epoch: optimizer steps per epoch for ``timescale_epochs`` (e.g. dataset_size / batch_size); None
            takes it from the Trainer.
        hold_timescale: recompute wd = 1/(lr·τ) from the current lr at every step (decay ∝ 1/lr), instead of once
            from the lr at the start (then τ lengthens as the lr falls). None: True with ``timescale_fraction``,
            False with ``timescale_steps`` or ``timescale_epochs``.
        timescale_fraction: give decay as τ = f·T, a fraction f > 0 of the run's T optimizer steps (``total_steps``,
            else the Trainer's ``estimated_stepping_batches``), held through the lr schedule unless
            ``hold_timescale=False``. Decoupled groups only.

    Example::

        # τ = 1/(lr·wd) held at a tenth of the run, whatever the lr schedule does (Wang & Aitchison, 2024):
        trainer = L.Trainer(callbacks=[lit_decay.WeightDecayScheduler(timescale_fraction=0.1)])

        # DINO-style: cosine ramp of weight decay from 0.04 to 0.4 over training.
        trainer = L.Trainer(callbacks=[lit_decay.WeightDecayScheduler("cosine", start_factor=1.0, end_factor=10.0)])
        # with configure_adam(self, weight_decay=0.04, mode="decoupled") in the LightningModule

        # decay timescale of 5 epochs, whatever lr and batch size:
        trainer = L.Trainer(callbacks=[lit_decay.WeightDecayScheduler.from_timescale(epochs=5.0)])
    """

    schedule = _setting("schedule")
    start_factor = _setting("start_factor")
    end_factor = _setting("end_factor")
    warmup_steps = _setting("warmup_steps")
    total_steps = _setting("total_steps")
    timescale_steps = _setting("timescale_steps")
    timescale_epochs = _setting("timescale_epochs")
    steps_per_epoch = _setting("steps_per_epoch")
    hold_timescale = _setting("hold_timescale")
    timescale_fraction = _setting("timescale_fraction")

    # The shape's options and the timescale's, all checked by ScheduleSettings; from_timescale is the short form.
    def __init__(
        self,
        schedule: Schedule = "constant",
        *,
        start_factor: float = 1.0,
        end_factor: float = 1.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        groups: Sequence[str] | None = None,
        timescale_steps: float | None = None,
        timescale_epochs: float | None = None,
        steps_per_epoch: float | None = None,
        hold_timescale: bool | None = None,
        timescale_fraction: float | None = None,
    ) -> None:
        self.settings = ScheduleSettings(
            schedule,
            start_factor=start_factor,
            end_factor=end_factor,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            groups=groups,
            timescale_steps=timescale_steps,
            timescale_epochs=timescale_epochs,
            steps_per_epoch=steps_per_epoch,
            hold_timescale=hold_timescale,
            timescale_fraction=timescale_fraction,
        )
        # Plain data, saved in checkpoints: the base coefficient of each scheduled group, keyed "optimizer/group".
        self._base: dict[str, float] = {}
        self._timescale: float | None = self.settings.timescale()
        self._total: int | None = None

    @classmethod
    def from_timescale(
        cls,
        *,
        steps: float | None = None,
        epochs: float | None = None,
        fraction: float | None = None,
        steps_per_epoch: float | None = None,
        groups: Sequence[str] | None = None,
        hold: bool | None = None,
    ) -> WeightDecayScheduler:
        """Decay given as its timescale τ = 1/(lr·wd), in optimizer steps, in epochs or as a fraction of the run (give
        one): each decoupled group gets wd = 1/(lr·τ). The same as ``WeightDecayScheduler(timescale_steps=..., ...)``,
        without the schedule's arguments that a timescale does not use.

        Examples:
            >>> WeightDecayScheduler.from_timescale(epochs=5.0).timescale_epochs
            5.0
            >>> held = WeightDecayScheduler.from_timescale(fraction=0.1)
            >>> held.timescale_fraction, held.hold_timescale
            (0.1, True)
        """
        return cls(
            timescale_steps=steps,
            timescale_epochs=epochs,
            timescale_fraction=fraction,
            steps_per_epoch=steps_per_epoch,
            groups=groups,
            hold_timescale=hold,
        )

    @property
    def groups(self) -> list[str] | None:
        """The names of the scheduled groups, or None for every decayed group."""
        return None if self.settings.groups is None else list(self.settings.groups)

    # ---- Lightning hooks -------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Derived from the arguments, as Lightning's ``ModelCheckpoint`` does, so that several schedulers (one per
        group, say) can share a Trainer and each finds its own state in a checkpoint."""
        schedule = self.schedule
        if callable(schedule):
            # A callable's repr holds its address, which changes between runs; its name does not.
            schedule = getattr(schedule, "__qualname__", type(schedule).__qualname__)
        return self._generate_state_key(
            schedule=schedule,
            start_factor=self.start_factor,
            end_factor=self.end_factor,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            groups=self.groups,
            timescale_steps=self.timescale_steps,
            timescale_epochs=self.timescale_epochs,
            steps_per_epoch=self.steps_per_epoch,
            hold_timescale=self.hold_timescale,
            # Only when given: the keys of schedulers without it stay those their checkpoints were saved under.
            **({} if self.timescale_fraction is None else {"timescale_fraction": self.timescale_fraction}),
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.settings.check_groups(trainer.optimizers)
        self._total = None
        self._timescale = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._total is None:
            self._resolve(trainer, pl_module)
        self.apply(trainer.optimizers, _training_step_index(trainer))

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run length and timescale in steps, once the training data is set up (after any checkpoint restore)."""
        self._total = self.total_steps or 1
        needs_length = self.settings.needs_run_length
        if self.total_steps is None and (needs_length or self.warmup_steps):
            manual = not pl_module.automatic_optimization
            estimated = batches_in_run(
                float(trainer.estimated_stepping_batches),
                max_steps=trainer.max_steps if manual else None,
                optimizers=len(trainer.optimizers),
            )
            if not math.isfinite(estimated) and needs_length:
                needs = "timescale_fraction" if self.timescale_fraction is not None else f"schedule={self.schedule!r}"
                raise ValueError(
                    f"{needs} needs the run's length, but the Trainer has no max_steps or max_epochs; pass total_steps="
                )
            if math.isfinite(estimated):
                check_warmup(self.warmup_steps, estimated)
                if needs_length:
                    self._total = int(estimated)
        from_trainer = self.timescale_epochs is not None and self.steps_per_epoch is None
        per_epoch = _optimizer_steps_per_epoch(trainer) if from_trainer else None
        self._timescale = self.settings.timescale(per_epoch, self._total)

    def state_dict(self) -> dict[str, Any]:
        return {"base": dict(self._base)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base = {str(k): float(v) for k, v in state_dict.get("base", {}).items()}

    # ---- the schedule ----------------------------------------------------------------------------------------------

    def factor(self, step: int) -> float:
        """The schedule's factor at optimizer step ``step`` (0-based); raises if a callable returns a bad value.

        Examples:
            >>> WeightDecayScheduler("linear", end_factor=0.0, total_steps=3).factor(1)
            0.5
        """
        return self.settings.factor(step, self._total)

    def apply(self, optimizers: Sequence[Optimizer], step: int) -> dict[str, float]:
        """Write the coefficients of ``step`` into the scheduled groups; returns them keyed ``"optimizer/group"``.

        ``step`` counts training steps (batches that step the optimizers), once whatever the number of optimizers.
        Outside a Lightning fit, a ``"linear"`` or ``"cosine"`` shape needs ``total_steps`` and ``timescale_epochs``
        needs ``steps_per_epoch``.

        Examples:
            >>> import torch
            >>> layer = torch.nn.Linear(2, 2)
            >>> optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.1)
            >>> WeightDecayScheduler(timescale_epochs=2.0, steps_per_epoch=50).apply([optimizer], 0)
            {'0/pg1': 1.0}
        """
        if self._timescale is None and self.timescale_epochs is not None:
            raise ValueError(
                f"timescale_epochs={self.timescale_epochs!r} needs the optimizer steps per epoch: pass "
                "steps_per_epoch= (within a Lightning fit it defaults to the Trainer's)"
            )
        if self._timescale is None and self.timescale_fraction is not None:
            raise ValueError(
                f"timescale_fraction={self.timescale_fraction!r} needs the run's length: pass total_steps= (within a "
                "Lightning fit it defaults to the Trainer's estimated_stepping_batches)"
            )
        factor = self.factor(step)
        written: dict[str, float] = {}
        for index, (optimizer, names) in enumerate(zip(optimizers, group_names(list(optimizers)))):
            for name, group in zip(names, optimizer.param_groups):
                key = f"{index}/{name}"
                # A group once scheduled stays so (its base is in a checkpoint), whatever its coefficient now.
                if key not in self._base and not self.settings.selects(name, rule_of(optimizer, group)):
                    continue
                if self._timescale is not None and (self.settings.holds_timescale or key not in self._base):
                    # Held: the current lr. Otherwise the lr the run starts from, before any lr warmup.
                    lr = float(group["lr"] if self.settings.holds_timescale else group.get("initial_lr", group["lr"]))
                    self._base[key] = timescale_coefficient(lr, self._timescale)
                self._base.setdefault(key, rule_of(optimizer, group).strength)
                coefficient = self._base[key] * factor
                group["weight_decay"] = coefficient
                written[key] = coefficient
        return written


def _training_step_index(trainer: pl.Trainer) -> int:
    """The 0-based index of the training step about to run: batches that stepped so far, counted once per batch.

    ``trainer.global_step`` counts every optimizer's steps, so it runs at twice the pace with two optimizers in manual
    optimization; Lightning's own count of stepping batches (what it gives loggers as the step) does not.
    """
    counted = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return trainer.global_step if counted is None else int(counted)


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> float:
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        raise ValueError(
            "timescale_epochs needs the number of optimizer steps per epoch, which the Trainer cannot tell "
            f"(num_training_batches={batches!r}); pass steps_per_epoch= (dataset_size / batch_size)"
        )
    return math.ceil(batches / trainer.accumulate_grad_batches)
