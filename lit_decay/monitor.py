"""``WeightDecayMonitor``: the Lightning callback that logs what weight decay is doing, per param group.

A thin adapter: it decides which steps log, hooks ``lit_decay.stats.StepStatistics`` around each optimizer's
step, and hands the figures to the Trainer's loggers (plus TensorBoard extras from ``lit_decay.tensorboard``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lit_decay._tensors import is_dtensor
from lit_decay.diagnostics import DECOUPLED, DecayProgress, peak_lr, timescale_warning
from lit_decay.modes import L1_MODES, group_names, group_rule
from lit_decay.optim import report_of
from lit_decay.penalties import is_attached
from lit_decay.rules import RULE_BIAS, RULE_NORMALIZATION, clean_name, place_parameters
from lit_decay.schedule import WeightDecayScheduler
from lit_decay.stats import METRICS, StepStatistics, check_metrics
from lit_decay.tensorboard import custom_scalars_layout, group_values, grouping_markdown

NONFINITE_ACTIONS = ("warn", "raise", "ignore")


class WeightDecayMonitor(Callback):
    r"""Log per-group weight norms, gradient norms, update ratios and the effective decay to the Trainer's loggers.

    Tags are ``{prefix}/{metric}/{group}`` (group: the param group's ``"name"``, else ``pg1``, ``pg2``...), logged on
    the batches and at the step values on which Lightning logs the user's own ``self.log`` metrics, from figures taken
    right after the optimizer step. A step that does not log costs nothing; one that does moves its figures to the
    host once. With a ``TensorBoardLogger`` it also writes a custom-scalars layout (one chart per metric, all groups in
    it) and the grouping table as text.

    Args:
        log_every_n_steps: log every this many optimizer steps; None follows ``Trainer(log_every_n_steps=...)``.
        metrics: which of ``weight_norm``, ``grad_norm``, ``update_ratio``, ``effective_decay``,
            ``decay_timescale``, ``sparsity``, ``equilibrium``, ``decay_progress`` to log; None for all.
        prefix: the first part of every tag.
        per_parameter: also log ``{prefix}/{metric}/{group}/{param}`` for weight_norm, grad_norm, update_ratio and
            equilibrium.
        histograms: with a TensorBoard logger, also write per-group weight histograms (an extra transfer).
        audit: at fit start, warn when a hand-built optimizer decays norm or bias parameters, asks for an L1 mode
            nobody applies, or misses trainable parameters, and when a decoupled group's decay timescale
            τ = 1/(lr·wd) is longer than the whole run.
        on_nonfinite: ``"warn"`` once per group, ``"raise"`` to stop training, or ``"ignore"``.

    Example::

        import lightning as L
        from lightning.pytorch.loggers import TensorBoardLogger
        import lit_decay

        trainer = L.Trainer(callbacks=[lit_decay.WeightDecayMonitor()], logger=TensorBoardLogger("runs"))
        trainer.fit(model)  # model.configure_optimizers returns lit_decay.configure_adam(self, ...)
        # then: tensorboard --logdir runs
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        metrics: Sequence[str] | None = None,
        prefix: str = "decay",
        per_parameter: bool = False,
        histograms: bool = False,
        audit: bool = True,
        on_nonfinite: str = "warn",
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be a positive int or None (follow the Trainer); got {log_every_n_steps!r}"
            )
        if not isinstance(prefix, str) or not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty tag prefix such as 'decay'; got {prefix!r}")
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(
                f"on_nonfinite={on_nonfinite!r} is not valid; valid values are {', '.join(NONFINITE_ACTIONS)}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.metrics = check_metrics(metrics)
        self.prefix = prefix
        self.per_parameter = bool(per_parameter)
        self.histograms = bool(histograms)
        self.audit = bool(audit)
        self.on_nonfinite = on_nonfinite
        self._warned_nonfinite: set[str] = set()
        self._statistics: StepStatistics | None = None
        self._progress = DecayProgress()
        self._progress_restored = False
        self._progress_handles: list[Any] = []

    @property
    def state_key(self) -> str:
        # Derived from the arguments, as ModelCheckpoint's is, so that two monitors (a cheap one beside a
        # histogram one) can share a Trainer and each keeps its own state in checkpoints.
        return self._generate_state_key(
            log_every_n_steps=self.log_every_n_steps,
            metrics=list(self.metrics),
            prefix=self.prefix,
            per_parameter=self.per_parameter,
            histograms=self.histograms,
        )

    # ---- Lightning hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException(
                "WeightDecayMonitor has nothing to log to: the Trainer has no logger. "
                "Pass logger=TensorBoardLogger(...) "
                "(or any Lightning logger), or call lit_decay.group_stats(optimizer) yourself."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        if not optimizers:
            rank_zero_warn("WeightDecayMonitor: the model has no optimizer, so there is nothing to monitor.")
            return
        self._release()  # a fit that ended without teardown must not leave a second set of hooks
        names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
        self._statistics = StepStatistics(
            optimizers, metrics=self.metrics, per_parameter=self.per_parameter, parameter_names=names
        )
        self._statistics.attach()
        if not self._progress_restored:
            self._progress = DecayProgress()
        self._progress_restored = False
        if "decay_progress" in self.metrics:
            for optimizer in optimizers:
                self._progress_handles.append(optimizer.register_step_post_hook(self._count_progress))
        if self.audit:
            try:
                self._audit(trainer, pl_module, optimizers)
            except Exception as error:  # the audit only comments on a run: it must never be what stops it
                rank_zero_warn(f"WeightDecayMonitor audit could not run ({type(error).__name__}: {error}); skipped.")
        if trainer.is_global_zero:
            self._write_tensorboard_extras(trainer, optimizers)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._statistics is not None and self._is_logging_batch(trainer):
            self._statistics.arm()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._statistics is None or not self._statistics.armed:
            return
        figures = self._statistics.collect()
        if not figures:
            return
        if "decay_progress" in self.metrics:
            figures.update({f"decay_progress/{name}": total for name, total in self._progress.figures().items()})
        # The step value Lightning gives the user's metrics of this batch (its LoggerConnector's default).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        tagged = {f"{self.prefix}/{key}": value for key, value in figures.items()}
        for logger in trainer.loggers:
            logger.log_metrics(tagged, step=step)
        if self.histograms:
            self._write_histograms(trainer, step)
        self._check_finite(figures, step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips the callbacks' teardown when fit raises: without this the hooks stay on the optimizers.
        self._release()
        self._progress_restored = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._progress_restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"warned_nonfinite": sorted(self._warned_nonfinite), "decay_progress": self._progress.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned_nonfinite = set(state_dict.get("warned_nonfinite", ()))
        # Lightning restores callbacks before or after on_fit_start (depending on the strategy): either way the
        # restored sums are what the counting continues from.
        self._progress = DecayProgress.from_state(state_dict.get("decay_progress", {}))
        self._progress_restored = True

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def _release(self) -> None:
        """Remove every hook this monitor put on the optimizers and drop what it was measuring."""
        if self._statistics is not None:
            self._statistics.detach()
        self._statistics = None
        for handle in self._progress_handles:
            handle.remove()
        self._progress_handles.clear()

    def _count_progress(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Every optimizer step: add each decoupled group's lr·wd to its decay progress (host floats only)."""
        if self._statistics is None:
            return
        for index, known in enumerate(self._statistics.optimizers):
            if known is optimizer:
                for name, group in zip(self._statistics.names[index], optimizer.param_groups):
                    rule = group_rule(optimizer, group)
                    if rule.mode == DECOUPLED:
                        self._progress.add(name, group["lr"], rule.coefficient)

    def _is_logging_batch(self, trainer: pl.Trainer) -> bool:
        if self.log_every_n_steps is None:
            # Lightning's own decision for the user's metrics of this batch, so the two always log together.
            return bool(trainer._logger_connector.should_update_logs)
        # Our own interval, on the counter Lightning's decision uses (one per batch, whatever the optimizers).
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        return (stepped + 1) % self.log_every_n_steps == 0 or bool(trainer.should_stop)

    def _audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers: Sequence[Optimizer]) -> None:
        in_optimizers = {id(p) for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
        missing = [
            clean_name(n) for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizers
        ]
        if missing:
            rank_zero_warn(
                f"WeightDecayMonitor audit: {len(missing)} trainable parameter(s) are in no optimizer and will not be "
                f"trained: {_listing(missing)}. Freeze them (requires_grad=False) or add them to an optimizer."
            )
        try:
            placements = {id(p.tensor): p for p in place_parameters(pl_module)[0]}
        except ValueError as error:
            # e.g. a lazy module before its first forward: the audit only comments, it must not stop the run.
            placements = None
            rank_zero_warn(
                f"WeightDecayMonitor audit: could not check which parameters are normalization or bias parameters "
                f"({error}); that part of the audit is skipped."
            )
        for index, optimizer in enumerate(optimizers):
            label = f"optimizer {index} ({type(optimizer).__name__})"
            if report_of(optimizer) is None and placements is not None:
                decayed = [
                    f"{placement.name} ({placement.reason})"
                    for group in optimizer.param_groups
                    if group_rule(optimizer, group).coefficient > 0 and group_rule(optimizer, group).mode != "none"
                    for p in group["params"]
                    if (placement := placements.get(id(p))) is not None
                    and placement.rule in (RULE_NORMALIZATION, RULE_BIAS)
                ]
                if decayed:
                    rank_zero_warn(
                        f"WeightDecayMonitor audit: {label} applies weight decay to {len(decayed)} "
                        "normalization or bias "
                        f"parameter(s): {_listing(decayed)}. Usually they should not be decayed; build the groups with "
                        "lit_decay.param_groups(...) or lit_decay.configure_adam(...)."
                    )
            if not is_attached(optimizer):
                unapplied = [
                    f"{group.get('name', f'pg{i + 1}')} ({group['decay_mode']})"
                    for i, group in enumerate(optimizer.param_groups)
                    if group.get("decay_mode") in L1_MODES and group.get("decay_coefficient", 0.0) > 0
                ]
                if unapplied:
                    rank_zero_warn(
                        f"WeightDecayMonitor audit: {label} has group(s) {_listing(unapplied)} "
                        "asking for an L1 penalty, "
                        "but torch applies no L1 term by itself and none is attached, so these groups get no decay at "
                        "all. Build the optimizer with lit_decay.configure_adam(...), which attaches it."
                    )
        self._audit_timescales(trainer, optimizers)

    def _audit_timescales(self, trainer: pl.Trainer, optimizers: Sequence[Optimizer]) -> None:
        """Warn for each decoupled group whose τ = 1/(lr·wd), at the schedule's peak lr, exceeds the whole run."""
        run_steps = _run_length(trainer)
        if run_steps is None or any(isinstance(c, WeightDecayScheduler) for c in getattr(trainer, "callbacks", ())):
            # Unknown length, or a scheduler that rewrites wd at every step: the coefficient now says nothing.
            return
        for index, (optimizer, names) in enumerate(zip(optimizers, group_names(optimizers))):
            for name, group in zip(names, optimizer.param_groups):
                rule = group_rule(optimizer, group)
                if rule.mode != DECOUPLED:
                    continue
                label = f"optimizer {index} ({type(optimizer).__name__}) group {name!r}"
                message = timescale_warning(label, peak_lr(group), rule.coefficient, run_steps)
                if message is not None:
                    rank_zero_warn(message)

    def _tensorboard_loggers(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _write_tensorboard_extras(self, trainer: pl.Trainer, optimizers: Sequence[Optimizer]) -> None:
        loggers = self._tensorboard_loggers(trainer)
        if not loggers or self._statistics is None:
            return
        groups = [name for names in self._statistics.names for name in names]
        layout = custom_scalars_layout(self.prefix, [m for m in METRICS if m in self.metrics], groups)
        text = grouping_markdown(optimizers, self._statistics.names, run_steps=_run_length(trainer))
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)
            logger.experiment.add_text(f"{self.prefix}/grouping", text, global_step=trainer.global_step)

    def _write_histograms(self, trainer: pl.Trainer, step: int) -> None:
        if self._statistics is None:
            return
        loggers = self._tensorboard_loggers(trainer)
        for optimizer, names in zip(self._statistics.optimizers, self._statistics.names):
            for name, group in zip(names, optimizer.param_groups):
                sharded = any(is_dtensor(p) for p in group["params"])
                # Gathering a sharded group is a collective: every rank takes part, rank zero writes.
                if not (loggers and trainer.is_global_zero) and not sharded:
                    continue
                values = group_values(group)
                for logger in loggers:
                    logger.experiment.add_histogram(f"{self.prefix}/histogram/{name}", values, global_step=step)

    def _check_finite(self, figures: dict[str, float], step: int) -> None:
        if self.on_nonfinite == "ignore" or self._statistics is None:
            return
        groups = [name for names in self._statistics.names for name in names]
        for key, value in figures.items():
            if math.isfinite(value):
                continue
            metric, group = _split_key(key, groups)
            message = f"WeightDecayMonitor: {metric} of group {group!r} is {value} at step {step}"
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message + " (on_nonfinite='raise')")
            if group not in self._warned_nonfinite:
                self._warned_nonfinite.add(group)
                rank_zero_warn(message + "; further non-finite figures of this group are logged without a warning.")


def _split_key(key: str, groups: Sequence[str]) -> tuple[str, str]:
    """(metric, group) of a figure's key ``{metric}/{group}[/{param}]``, where a group's name may hold "/" itself.

    Examples:
        >>> _split_key("update_ratio/enc/dec/w", ["enc", "enc/dec"])
        ('update_ratio', 'enc/dec')
    """
    metric, rest = key.split("/", 1)
    owners = [g for g in groups if rest == g or rest.startswith(g + "/")]
    return metric, max(owners, key=len) if owners else rest.split("/")[0]


def _run_length(trainer: pl.Trainer) -> float | None:
    """The run's optimizer steps per optimizer (Lightning's estimate), or None when it is not known or infinite."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # no dataloader length yet, an iterable dataset, or a stand-in trainer
        return None
    return steps if math.isfinite(steps) and steps > 0 else None


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
