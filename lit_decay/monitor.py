"""``WeightDecayMonitor``: the Lightning callback that logs what weight decay is doing, per param group.

A thin adapter: it decides which steps log, hooks ``lit_decay.stats.StepStatistics`` around each optimizer's
step, and hands the figures to the Trainer's loggers (plus TensorBoard extras from ``lit_decay.tensorboard``). At the
end of training it turns what it logged into the decay report (``lit_decay.diagnostics.decay_report``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lit_decay._checks import check_bool
from lit_decay._tensors import is_dtensor
from lit_decay.audit import audit_messages
from lit_decay.diagnostics import DecayProgress, DecayRecord, decay_report, report_markdown, report_text
from lit_decay.modes import rule_of
from lit_decay.rules import clean_name
from lit_decay.schedule import WeightDecayScheduler
from lit_decay.stats import METRICS, StepStatistics, check_metrics
from lit_decay.tags import (
    GROUPING,
    HISTOGRAM,
    PARAMETERS,
    REPORT,
    SEPARATOR,
    TagIndex,
    check_prefix,
    extra_tag,
    group_names,
    prefixed,
    tag,
)
from lit_decay.tensorboard import custom_scalars_layout, group_values, grouping_markdown, parameter_pages

# Counted at every optimizer step from host floats (lit_decay.diagnostics.DecayProgress), not measured on logging steps.
COUNTED_METRICS = frozenset({"decay_progress"})

NONFINITE_ACTIONS = ("warn", "raise", "ignore")


class WeightDecayMonitor(Callback):
    r"""Log per-group weight norms, gradient norms, update ratios and the effective decay to the Trainer's loggers.

    Tags are ``{prefix}/{metric}/{group}`` (group: the param group's ``"name"``, else ``pg1``, ``pg2``...), logged on
    the batches and at the step values on which Lightning logs the user's own ``self.log`` metrics, from figures taken
    right after the optimizer step. A step that does not log costs nothing; one that does moves its figures to the
    host once. With a ``TensorBoardLogger`` it also writes the grouping as text and, at the first logging step, a
    custom-scalars layout with one chart for each metric the run logs (all groups in it).

    At the end of training (``on_train_end``) it makes the decay report from the figures it logged and its host-side
    counts: per decayed group, the e-folds applied, τ/run, the weight norm first → last, the last ``equilibrium`` and
    whether it held near 1, the last ``sparsity``, and one sentence of advice where decay did not act
    (``lit_decay.diagnostics.decay_report``). It is kept as ``report`` (JSON-safe, keyed by group), shown once on rank
    zero as the grouping summary is, and written to TensorBoard's text under ``{prefix}/report``.

    Args:
        log_every_n_steps: log every this many optimizer steps; None follows ``Trainer(log_every_n_steps=...)``.
        metrics: which of ``weight_norm``, ``grad_norm``, ``update_ratio``, ``effective_decay``,
            ``decay_timescale``, ``sparsity``, ``equilibrium``, ``weight_decay``, ``decay_progress`` to log; None for
            all. The report's fields need the figures they are made of (``weight_norm``, ``equilibrium``, ...).
        prefix: the first part of every tag.
        per_parameter: also log ``{prefix}/{metric}/{group}/{param}`` for weight_norm, grad_norm and update_ratio.
        histograms: with a TensorBoard logger, also write per-group weight histograms (an extra transfer).
        audit: at fit start, warn about defects: a hand-built optimizer that decays norm or bias parameters, asks for
            an L1 mode nobody applies, or misses trainable parameters.
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
        self.per_parameter = check_bool("per_parameter", per_parameter)
        self.histograms = check_bool("histograms", histograms)
        self.audit = check_bool("audit", audit)
        self.on_nonfinite = on_nonfinite
        #: The decay report of the last fit (``lit_decay.diagnostics.decay_report``), None until training ends.
        self.report: dict[str, dict[str, Any]] | None = None
        self._warned_nonfinite: set[str] = set()
        self._statistics: StepStatistics | None = None
        self._logging = False  # the current batch logs
        self._progress = DecayProgress()
        self._record = DecayRecord()
        self._restored = False  # the counts above came from a checkpoint: continue them
        self._progress_handles: list[Any] = []
        self._charted: set[str] = set()  # metrics the TensorBoard layout has a chart for

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
        if not self._restored:
            self._progress, self._record = DecayProgress(), DecayRecord()
        self._restored = False
        self.report = None
        self._charted = set()
        # Counted whatever is logged: the report needs each decoupled group's decay_progress.
        for optimizer in optimizers:
            self._progress_handles.append(optimizer.register_step_post_hook(self._count_progress))
        if self.audit:
            self._audit(trainer, pl_module, optimizers)
        if trainer.is_global_zero:
            self._write_grouping(trainer, optimizers, names)

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
        logged = self._note(figures, step)
        if trainer.is_global_zero:
            self._write_layout(trainer, logged)
        if self.histograms:
            self._write_histograms(trainer, step)
        self._check_finite(figures, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here rather than at on_fit_end: training is over, and the loggers and the optimizers are still set up.
        if self._statistics is None:
            return
        optimizers = self._statistics.optimizers
        modes = {
            name: rule_of(optimizer, group).mode
            for optimizer, names in zip(optimizers, group_names(optimizers))
            for name, group in zip(names, optimizer.param_groups)
        }
        self.report = decay_report(
            self._record,
            modes,
            run_steps=int(trainer.fit_loop.epoch_loop._batches_that_stepped),
            progress=self._progress.figures(),
            last_rates=self._progress.last_rates(),
        )
        if not self.report or not trainer.is_global_zero:
            return
        rank_zero_info(report_text(self.report))
        for logger in self._tensorboard_loggers(trainer):
            text = report_markdown(self.report)
            logger.experiment.add_text(extra_tag(self.prefix, REPORT), text, global_step=trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips the callbacks' teardown when fit raises: without this the hooks stay on the optimizers.
        self._release()
        self._restored = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "warned_nonfinite": sorted(self._warned_nonfinite),
            "decay_progress": self._progress.state_dict(),
            "decay_record": self._record.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned_nonfinite = set(state_dict.get("warned_nonfinite", ()))
        # Lightning restores callbacks before or after on_fit_start (depending on the strategy): either way the
        # restored sums and records are what a resumed run continues from, so its report covers the whole run.
        self._progress = DecayProgress.from_state(state_dict.get("decay_progress", {}))
        self._record = DecayRecord.from_state(state_dict.get("decay_record", {}))
        self._restored = True

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
        """Every optimizer step: add each decoupled group's lr·wd to its decay progress (host floats only; a tensor
        lr is summed on its device)."""
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

    def _note(self, figures: dict[str, float], step: int) -> set[str]:
        """Keep what the report needs of this logging step's figures; return the metrics logged for whole groups."""
        logged: set[str] = set()
        if self._statistics is None:
            return logged
        optimizers = self._statistics.optimizers
        for optimizer, names in zip(optimizers, group_names(optimizers)):
            for name, group in zip(names, optimizer.param_groups):
                own = {m: figures[key] for m in self.metrics if (key := tag(None, m, name)) in figures}
                logged.update(own)
                self._record.add(step, name, own, rule_of(optimizer, group).strength)
        return logged

    def _tensorboard_loggers(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _write_grouping(self, trainer: pl.Trainer, optimizers: Sequence[Optimizer], names: dict[int, str]) -> None:
        """The grouping summary and the per-tensor table's pages, as TensorBoard text at fit start."""
        loggers = self._tensorboard_loggers(trainer)
        if not loggers or self._statistics is None:
            return
        # A WeightDecayScheduler rewrites the coefficients: those at fit start say nothing of the run.
        scheduled = any(isinstance(c, WeightDecayScheduler) for c in getattr(trainer, "callbacks", ()))
        run_steps = None if scheduled else _run_length(trainer)
        texts = {
            extra_tag(self.prefix, GROUPING): grouping_markdown(
                optimizers, self._statistics.names, run_steps=run_steps, scheduled=scheduled
            )
        }
        for page, text in enumerate(parameter_pages(optimizers, self._statistics.names, names), start=1):
            texts[extra_tag(self.prefix, PARAMETERS, str(page))] = text
        for logger in loggers:
            for key, text in texts.items():
                logger.experiment.add_text(key, text, global_step=trainer.global_step)

    def _write_layout(self, trainer: pl.Trainer, logged: set[str]) -> None:
        """Chart what this run logs, once it logs it: a run that logs nothing writes no layout, and a metric the run
        never logs (``sparsity`` without an L1 group) gets no empty chart. Written again only if a later step logs a
        metric without a chart (one a schedule's warm-up kept at 0, say); TensorBoard shows a run's latest layout."""
        loggers = self._tensorboard_loggers(trainer)
        if not loggers or self._statistics is None or logged <= self._charted:
            return
        self._charted |= logged
        groups = [name for names in group_names(self._statistics.optimizers) for name in names]
        # One-segment names get a pattern that holds whatever the groups are, so charts of runs with other groups
        # merge into one per metric; a name with "/" needs the exact list.
        exact = groups if any(SEPARATOR in group for group in groups) else None
        layout = custom_scalars_layout(self.prefix, [m for m in METRICS if m in self._charted], exact)
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)

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
