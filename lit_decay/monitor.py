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
from lit_decay.optim import report_of
from lit_decay.penalties import is_attached
from lit_decay.rules import RULE_BIAS, RULE_NORMALIZATION, clean_name, place_parameters
from lit_decay.stats import L1_MODES, METRICS, StepStatistics, check_metrics, group_rule
from lit_decay.tensorboard import custom_scalars_layout, group_values, grouping_markdown

NONFINITE_ACTIONS = ("warn", "raise", "ignore")


class WeightDecayMonitor(Callback):
    r"""Log per-group weight norms, gradient norms, update ratios and the effective decay to the Trainer's loggers.

    Tags are ``{prefix}/{metric}/{group}`` (group: the param group's ``"name"``, else ``pg1``, ``pg2``...), logged at
    ``trainer.global_step`` on logging steps, from figures taken right after the optimizer step. A step that does not
    log costs nothing; one that does moves its figures to the host once. With a ``TensorBoardLogger`` it also writes a
    custom-scalars layout (one chart per metric, all groups in it) and the grouping table as text.

    Args:
        log_every_n_steps: log every this many optimizer steps; None follows ``Trainer(log_every_n_steps=...)``.
        metrics: which of ``weight_norm``, ``grad_norm``, ``update_ratio``, ``effective_decay``,
            ``decay_timescale``, ``sparsity`` to log; None for all.
        prefix: the first part of every tag.
        per_parameter: also log ``{prefix}/{metric}/{group}/{param}`` for weight_norm, grad_norm and update_ratio.
        histograms: with a TensorBoard logger, also write per-group weight histograms (an extra transfer).
        audit: at fit start, warn when a hand-built optimizer decays norm or bias parameters, asks for an L1 mode
            nobody applies, or misses trainable parameters.
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
        names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
        self._statistics = StepStatistics(
            optimizers, metrics=self.metrics, per_parameter=self.per_parameter, parameter_names=names
        )
        self._statistics.attach()
        if self.audit:
            self._audit(pl_module, optimizers)
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
        step = trainer.global_step
        tagged = {f"{self.prefix}/{key}": value for key, value in figures.items()}
        for logger in trainer.loggers:
            logger.log_metrics(tagged, step=step)
        if self.histograms:
            self._write_histograms(trainer, step)
        self._check_finite(figures, step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._statistics is not None:
            self._statistics.detach()
        self._statistics = None

    def state_dict(self) -> dict[str, Any]:
        return {"warned_nonfinite": sorted(self._warned_nonfinite)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned_nonfinite = set(state_dict.get("warned_nonfinite", ()))

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def _is_logging_batch(self, trainer: pl.Trainer) -> bool:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50)
        if not every:
            return False
        # The same count Lightning's own logging uses, so our figures land on the steps the user's metrics do.
        stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        return (stepped + 1) % every == 0

    def _audit(self, pl_module: pl.LightningModule, optimizers: Sequence[Optimizer]) -> None:
        in_optimizers = {id(p) for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
        missing = [
            clean_name(n) for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizers
        ]
        if missing:
            rank_zero_warn(
                f"WeightDecayMonitor audit: {len(missing)} trainable parameter(s) are in no optimizer and will not be "
                f"trained: {_listing(missing)}. Freeze them (requires_grad=False) or add them to an optimizer."
            )
        placements = {id(p.tensor): p for p in place_parameters(pl_module)[0]}
        for index, optimizer in enumerate(optimizers):
            label = f"optimizer {index} ({type(optimizer).__name__})"
            if report_of(optimizer) is None:
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

    def _tensorboard_loggers(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _write_tensorboard_extras(self, trainer: pl.Trainer, optimizers: Sequence[Optimizer]) -> None:
        loggers = self._tensorboard_loggers(trainer)
        if not loggers or self._statistics is None:
            return
        layout = custom_scalars_layout(self.prefix, [m for m in METRICS if m in self.metrics])
        text = grouping_markdown(optimizers, self._statistics.names)
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
        if self.on_nonfinite == "ignore":
            return
        for key, value in figures.items():
            if math.isfinite(value):
                continue
            metric, group = key.split("/")[:2]
            message = f"WeightDecayMonitor: {metric} of group {group!r} is {value} at step {step}"
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message + " (on_nonfinite='raise')")
            if group not in self._warned_nonfinite:
                self._warned_nonfinite.add(group)
                rank_zero_warn(message + "; further non-finite figures of this group are logged without a warning.")


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
