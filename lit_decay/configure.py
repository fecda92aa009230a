"""``configure_adam``: the helper a LightningModule returns from ``configure_optimizers``.

It groups the module's parameters (``lit_decay.grouping``), refuses what Adam or a mode cannot take, builds a
``lit_decay.Adam`` on torch's fused kernel where the parameters allow it, and adapts it to Lightning's mixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lit_decay._checks import check_betas, check_bool, check_fused, check_non_negative
from lit_decay.diagnostics import timescale_findings
from lit_decay.grouping import GroupingOptions, GroupingReport, plan
from lit_decay.modes import DecayMode
from lit_decay.optim import Adam, describe_implementation


def check_parameters(module: nn.Module, groups: Iterable[Mapping[str, Any]], modes: Mapping[str, DecayMode]) -> None:
    """Raise ``ValueError`` naming a parameter that Adam or its group's decay mode cannot take, before any step.

    Torch's Adam takes no sparse gradients (an ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` gives them).
    The L1 terms are defined for real numbers: a complex parameter has no sign(p), so it cannot be in a group whose
    mode lit_decay applies itself.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> model.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        >>> from lit_decay.modes import DECAY_MODES
        >>> check_parameters(model, [{"decay_mode": "l1", "params": [("phase", model.phase)]}], DECAY_MODES)
        Traceback (most recent call last):
        ...
        ValueError: parameter 'phase' is in an 'l1' group but is complex (torch.complex64); ...
    """
    sparse = {
        id(owner.weight): type(owner).__name__
        for owner in module.modules()
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and owner.sparse
    }
    for group in groups:
        mode = str(group.get("decay_mode"))
        for name, tensor in group["params"]:
            if id(tensor) in sparse:
                raise ValueError(
                    f"parameter {name!r} gets sparse gradients ({sparse[id(tensor)]}(sparse=True)), which torch's Adam "
                    "does not take: build the layer with sparse=False, or optimize it apart with torch.optim.SparseAdam"
                )
            if mode in modes and modes[mode].needs_lit_decay and torch.is_complex(tensor):
                raise ValueError(
                    f"parameter {name!r} is in an {mode!r} group but is complex ({tensor.dtype}); the L1 modes are "
                    "defined for real parameters only: give it another mode with an override, e.g. "
                    f"overrides=[{{'pattern': {name!r}, 'mode': 'decoupled'}}]"
                )


def lightning_amp_note(module: nn.Module) -> str | None:
    """If the fused Adam of ``module`` must leave gradient unscaling to Lightning, why (a note for the summary).

    Returns None where the module is not attached to a Trainer, or its precision and clipping need no change.
    Lightning's ``MixedPrecision`` plugin refuses to clip the gradients of an optimizer whose
    ``_step_supports_amp_scaling`` is set (torch sets it on every fused Adam), bf16 included. Under ``"bf16-mixed"``
    there is no scaler, so the flag only ever decides that refusal; under ``"16-mixed"`` it also lets the fused kernel
    unscale inside itself without a host sync, which is kept unless the Trainer clips.

    Examples:
        >>> lightning_amp_note(nn.Linear(2, 2)) is None  # not attached to a Trainer: nothing to adapt to
        True
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    from lightning.pytorch import LightningModule
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.utilities.model_helpers import is_overridden

    plugin = getattr(trainer, "precision_plugin", None)
    if not isinstance(plugin, MixedPrecision):
        return None
    if plugin.scaler is None:
        return f"clippable by Lightning under precision={plugin.precision!r}, which has no gradient scaler"
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        clipping = f"gradient_clip_val={clip:g}"
    elif isinstance(module, LightningModule) and is_overridden("configure_gradient_clipping", module, LightningModule):
        clipping = f"{type(module).__name__}.configure_gradient_clipping"
    else:
        return None
    return (
        f"gradients unscaled by Lightning's GradScaler before clipping (precision={plugin.precision!r}, {clipping}); "
        "one host sync per step"
    )


def report_of(optimizer: Optimizer) -> GroupingReport | None:
    """The grouping report ``configure_adam`` made for ``optimizer`` (None for an optimizer built elsewhere)."""
    return getattr(optimizer, "grouping_report", None)


def _check_scheduler(scheduler: Any) -> None:
    if scheduler is None or callable(scheduler):
        return
    if isinstance(scheduler, Mapping) and callable(scheduler.get("scheduler")):
        return
    raise TypeError(
        "scheduler must be a callable taking the optimizer (e.g. lambda opt: CosineAnnealingLR(opt, T_max=100)) or a "
        f"Lightning scheduler config dict with such a callable under 'scheduler'; got {scheduler!r}"
    )


# Many parameters, on purpose: torch.optim.AdamW's own plus the grouping options of param_groups, so that one call
# replaces both (each is checked once, by plan() or by Adam).
def configure_adam(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    mode: str = "decoupled",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    fused: bool | None = None,
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
    layer_decay: float | None = None,
    scheduler: Callable[[Optimizer], Any] | Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> Any:
    """A ``lit_decay.Adam`` over well-grouped parameters: ``configure_adam(self)`` is a correctly grouped
    ``torch.optim.AdamW()`` (same defaults), and ``mode`` picks another decay rule.

    Returns the optimizer itself, or Lightning's ``{"optimizer": ..., "lr_scheduler": ...}`` when ``scheduler`` is
    given (a callable taking the optimizer, or a Lightning scheduler config dict with such a callable under
    ``"scheduler"``). The fused kernel is used whenever the parameters allow it (``fused=None``); the choice is in
    ``optimizer.defaults["fused"]`` and in the grouping summary, shown once on rank zero at the optimizer's first step
    (so once per fit), unless ``verbose=False``.

    Under Lightning's mixed precision (``precision="bf16-mixed"``, or ``"16-mixed"`` with gradient clipping), a
    module attached to its Trainer keeps the fused kernel but leaves gradient unscaling to Lightning, which can then
    clip them; the summary says so. This needs the LightningModule itself (a submodule does not know the Trainer).

    Parameters Adam or their mode cannot take are refused before any step, naming them: sparse-gradient embeddings
    and complex parameters in ``l1``/``decoupled_l1`` groups. A decoupled group with lr·wd ≥ 1 is refused (its weights
    would flip sign every step).

    Examples:
        >>> import lightning as L
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        ...     def configure_optimizers(self):
        ...         return configure_adam(self, lr=3e-4, weight_decay=0.1, mode="decoupled")
        >>> optimizer = Net().configure_optimizers()
        >>> [(g["name"], g["weight_decay"]) for g in optimizer.param_groups], optimizer.defaults["fused"]
        ([('decay', 0.1), ('no_decay', 0.0)], True)
    """
    # Adam's own arguments first, so that a bad one is named whatever the grouping would have said.
    verbose = check_bool("verbose", verbose)
    check_bool("amsgrad", amsgrad)
    check_betas(betas)
    check_non_negative("eps", eps)
    check_fused(fused)
    _check_scheduler(scheduler)
    options = GroupingOptions(weight_decay, mode, exclude_embeddings, exclude_1d, overrides, lr, layer_decay)
    grouping = plan(module, options)
    groups = grouping.groups()
    check_parameters(module, groups, Adam.modes)
    optimizer = Adam(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, mode=mode, fused=fused
    )
    kernel = describe_implementation(optimizer)
    amp_note = lightning_amp_note(module) if optimizer.defaults["fused"] else None
    if amp_note is not None:
        # With the flag off, Lightning's MixedPrecision plugin unscales the gradients (GradScaler.unscale_) before it
        # clips them, and GradScaler.step skips a step with inf gradients itself and otherwise steps the fused kernel
        # on gradients that are already unscaled, without grad_scale/found_inf.
        optimizer._step_supports_amp_scaling = False
        kernel += f" ({amp_note})"
    optimizer.grouping_source = (module, options)
    optimizer.grouping_report = grouping.report().with_implementation(kernel)
    built: Any = optimizer
    if isinstance(scheduler, Mapping):
        built = {"optimizer": optimizer, "lr_scheduler": {**scheduler, "scheduler": scheduler["scheduler"](optimizer)}}
    elif scheduler is not None:
        built = {"optimizer": optimizer, "lr_scheduler": scheduler(optimizer)}
    if verbose:  # after the scheduler: a warmup's first lr of 0 is no peak
        findings = timescale_findings(optimizer, [str(g["name"]) for g in optimizer.param_groups], _run_length(module))
        optimizer._summary = "\n".join([f"lit_decay: {optimizer.grouping_report.summary()}", *findings])
    return built


def _run_length(module: nn.Module) -> float | None:
    """The run's optimizer steps, where the module is attached to a Trainer that knows them (Lightning documents
    ``trainer.estimated_stepping_batches`` for use in ``configure_optimizers``); None when a
    ``WeightDecayScheduler`` will rewrite the coefficients, which makes the ones at fit start moot."""
    trainer = getattr(module, "_trainer", None)
    if any(type(c).__name__ == "WeightDecayScheduler" for c in getattr(trainer, "callbacks", ())):
        return None
    try:
        steps = float(trainer.estimated_stepping_batches)  # type: ignore[union-attr]
    except Exception:  # not attached, no dataloader length yet, an iterable dataset
        return None
    return steps if math.isfinite(steps) and steps > 0 else None
