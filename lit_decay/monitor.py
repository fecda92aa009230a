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
from lit_decay.audit import audit_messages
from lit_decay.diagnostics import DecayProgress
from lit_decay.modes import rule_of
from lit_decay.rules import clean_name
from lit_decay.schedule import WeightDecayScheduler
from lit_decay.stats import METRICS, StepStatistics, check_metrics
from lit_decay.tags import GROUPING, HISTOGRAM, TagIndex, check_prefix, extra_tag, prefixed, tag
from lit_decay.tensorboard import custom_scalars_layout, group_values, grouping_markdown

# Counted at every optimizer step from host floats (lit_decay.diagnostics.DecayProgress), not measured on logging steps.
COUNTED_METRICS = frozenset({"decay_progress"})

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
        check_prefix(prefix)
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
        self._logging = False  # the current batch logs
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
            self._audit(trainer, pl_module, optimizers)
        if trainer.is_global_zero:
            self._write_tensorboard_extras(trainer, optimizers)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._logging = self._statistics is not None and self._is_logging_batch(trainer)
        if self._logging and self._statistics is not None and set(self.metrics) - COUNTED_METRICS:
            self._statistics.arm()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._statistics is None or not self._logging:
            return
        self._logging = False
        figures = self._statistics.collect() if self._statistics.armed else {}
        if not figures and set(self.metrics) - COUNTED_METRICS:
            return  # no optimizer step was taken in this batch (gradient accumulation)
        if "decay_progress" in self.metrics:
            progress = self._progress.figures()
            figures.update({tag(None, "decay_progress", name): total for name, total in progress.items()})
        # The step value Lightning gives the user's metrics of this batch (its LoggerConnector's default).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        tagged = {prefixed(self.prefix, key): value for key, value in figures.items()}
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
                    rule = rule_of(optimizer, group)
                    # By mode, not rule.active: a decoupled group at coefficient 0 (a schedule's warmup starts
                    # there) still counts, so its decay_progress is logged from the first step on.
                    if rule.mode.timescale:
                        self._progress.add(name, group["lr"], rule.strength)

    def _is_logging_batch(self, trainer: pl.Trainer) -> bool:
        if self.log_every_n_steps is None:
            # Lightning's own decision for the user's metrics of this batch, so the two always log together.
            return bool(trainer._logger_connector.should_update_logs)
        # Our own interval, on the counter Lightning's decision uses (one per batch, whatever the optimizers).
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        return (stepped + 1) % self.log_every_n_steps == 0 or bool(trainer.should_stop)

    def _audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers: Sequence[Optimizer]) -> None:
        """Warn the defects ``lit_decay.audit.audit_messages`` finds."""
        try:
            messages = audit_messages(pl_module, optimizers)
        except Exception as error:  # the audit only comments on a run: it must never be what stops it
            messages = [f"WeightDecayMonitor audit could not run ({type(error).__name__}: {error}); skipped."]
        for message in messages:
            rank_zero_warn(message)

    def _tensorboard_loggers(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _write_tensorboard_extras(self, trainer: pl.Trainer, optimizers: Sequence[Optimizer]) -> None:
        loggers = self._tensorboard_loggers(trainer)
        if not loggers or self._statistics is None:
            return
        groups = [name for names in self._statistics.names for name in names]
        layout = custom_scalars_layout(self.prefix, [m for m in METRICS if m in self.metrics], groups)
        # A WeightDecayScheduler rewrites the coefficients: those at fit start say nothing of the run.
        scheduled = any(isinstance(c, WeightDecayScheduler) for c in getattr(trainer, "callbacks", ()))
        run_steps = None if scheduled else _run_length(trainer)
        text = grouping_markdown(optimizers, self._statistics.names, run_steps=run_steps)
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)
            logger.experiment.add_text(extra_tag(self.prefix, GROUPING), text, global_step=trainer.global_step)

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
                    logger.experiment.add_histogram(extra_tag(self.prefix, HISTOGRAM, name), values, global_step=step)

    def _check_finite(self, figures: dict[str, float], step: int) -> None:
        if self.on_nonfinite == "ignore" or self._statistics is None:
            return
        nonfinite = [(key, value) for key, value in figures.items() if not math.isfinite(value)]
        if not nonfinite:
            return
        index = TagIndex(METRICS, [name for names in self._statistics.names for name in names])
        # A step the GradScaler skipped for inf/NaN gradients (torch.amp) is AMP working, not a model fault: the
        # figures of such a group are not checked.
        skipped = self._statistics.skipped
        for key, value in nonfinite:
            found = index.find(key)
            metric, group = (found.metric, found.group) if found is not None else (key, key)
            if group in skipped:
                continue
            message = f"WeightDecayMonitor: {metric} of group {group!r} is {value} at step {step}"
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message + " (on_nonfinite='raise')")
            if group not in self._warned_nonfinite:
                self._warned_nonfinite.add(group)
                rank_zero_warn(message + "; further non-finite figures of this group are logged without a warning.")


def _run_length(trainer: pl.Trainer) -> float | None:
    """The run's optimizer steps per optimizer (Lightning's estimate), or None when it is not known or infinite."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # no dataloader length yet, an iterable dataset, or a stand-in trainer
        return None
    return steps if math.isfinite(steps) and steps > 0 else None
