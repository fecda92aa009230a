"""``configure_adam``: the helper a LightningModule returns from ``configure_optimizers``.

It builds a plain ``torch.optim.Adam`` over ``lit_decay.param_groups``, picks torch's fused kernel where every
parameter allows it, and attaches the L1 hooks of ``lit_decay.penalties`` for the modes torch has no key for.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lit_decay._checks import check_betas, check_bool, check_non_negative
from lit_decay._tensors import local
from lit_decay.grouping import GroupingOptions, GroupingReport, plan
from lit_decay.modes import L1_MODES
from lit_decay.penalties import attach

_REPORTS: weakref.WeakKeyDictionary[Optimizer, GroupingReport] = weakref.WeakKeyDictionary()

# Where torch's multi-tensor (foreach) kernels are real kernels; elsewhere its per-tensor loop is as fast.
_FOREACH_DEVICES = frozenset({"cuda", "xpu"})


def _fused_devices() -> frozenset[str]:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return frozenset(_get_fused_kernels_supported_devices())


def _unfusable(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor] | None:
    """The first parameter torch's fused Adam kernel cannot take, or None."""
    devices = _fused_devices()
    for name, tensor in named:
        if tensor.device.type not in devices or not torch.is_floating_point(tensor) or local(tensor).is_sparse:
            return name, tensor
    return None


def check_parameters(module: nn.Module, groups: Iterable[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming a parameter that Adam or its group's decay mode cannot take, before any step.

    Torch's Adam takes no sparse gradients (an ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` gives them;
    in an L1 group the L1 term would fail first, inside torch). The L1 terms are defined for real numbers: a complex
    parameter has no sign(p) (its sign is a phase), so it cannot be in an ``l1`` or ``decoupled_l1`` group.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> model.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        >>> check_parameters(model, [{"decay_mode": "l1", "params": [("phase", model.phase)]}])
        Traceback (most recent call last):
        ...
        ValueError: parameter 'phase' is in an 'l1' group but is complex (torch.complex64); ...
    """
    sparse: dict[int, str] = {}
    for owner in module.modules():
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and owner.sparse:
            sparse[id(owner.weight)] = type(owner).__name__
    for group in groups:
        mode = group.get("decay_mode")
        for name, tensor in group["params"]:
            if id(tensor) in sparse:
                raise ValueError(
                    f"parameter {name!r} gets sparse gradients ({sparse[id(tensor)]}(sparse=True)), which torch's Adam "
                    "does not take (nor the L1 terms): build the layer with sparse=False, or optimize it apart with "
                    "torch.optim.SparseAdam"
                )
            if mode in L1_MODES and torch.is_complex(tensor):
                raise ValueError(
                    f"parameter {name!r} is in an {mode!r} group but is complex ({tensor.dtype}); the L1 modes are "
                    "defined for real parameters only: give it another mode with an override, e.g. "
                    f"overrides=[{{'pattern': {name!r}, 'mode': 'decoupled'}}]"
                )


def choose_implementation(groups: Iterable[Mapping[str, Any]], fused: bool | None) -> dict[str, Any]:
    """Torch's Adam implementation keywords (``fused``, ``foreach``) for these groups.

    ``fused=None`` takes the fused kernel whenever every parameter's device and dtype allow it, else torch's
    multi-tensor kernels on CUDA/XPU and its per-tensor loop elsewhere. ``fused=True`` raises, naming the first
    parameter that rules the fused kernel out.

    Examples:
        >>> groups = [{"params": [("w", torch.zeros(2, requires_grad=True))]}]
        >>> choose_implementation(groups, None)
        {'fused': True, 'foreach': False}
    """
    if fused not in (None, True, False):
        raise ValueError(f"fused={fused!r} is not valid; use None (fused where possible), True (require it) or False")
    named = [(n, t) for g in groups for n, t in g["params"]]
    if fused is False:
        blocker: tuple[str, torch.Tensor] | None = ("", torch.empty(0))
    else:
        blocker = _unfusable(named)
    if blocker is None:
        return {"fused": True, "foreach": False}
    if fused:
        name, tensor = blocker
        raise ValueError(
            f"fused=True but torch's fused Adam kernel cannot take parameter {name!r} "
            f"(device={tensor.device.type}, dtype={tensor.dtype}, layout={tensor.layout}); "
            "it needs dense floating-point "
            f"tensors on one of {', '.join(sorted(_fused_devices()))}. Use fused=None to fall back where it cannot run."
        )
    foreach = all(t.device.type in _FOREACH_DEVICES for _, t in named)
    return {"fused": False, "foreach": foreach}


def describe_implementation(optimizer: Optimizer) -> str:
    """In words, which Adam kernel ``optimizer`` runs: ``"fused"``, ``"foreach"`` or ``"for-loop"``.

    Examples:
        >>> describe_implementation(torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True))
        'fused'
    """
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "for-loop"


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
    return _REPORTS.get(optimizer)


def _check_scheduler(scheduler: Any) -> None:
    if scheduler is None or callable(scheduler):
        return
    if isinstance(scheduler, Mapping) and callable(scheduler.get("scheduler")):
        return
    raise TypeError(
        "scheduler must be a callable taking the optimizer (e.g. lambda opt: CosineAnnealingLR(opt, T_max=100)) or a "
        f"Lightning scheduler config dict with such a callable under 'scheduler'; got {scheduler!r}"
    )


# Many parameters, on purpose: torch.optim.Adam's own plus the grouping options of param_groups, so that one call
# replaces both (each is checked once, by plan() or here).
def configure_adam(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    mode: str = "decoupled",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    fused: bool | None = None,
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
    scheduler: Callable[[Optimizer], Any] | Mapping[str, Any] | None = None,
) -> Any:
    """A ``torch.optim.Adam`` over well-grouped parameters, with the decay ``mode`` applied where it belongs.

    Returns the optimizer itself, or Lightning's ``{"optimizer": ..., "lr_scheduler": ...}`` when ``scheduler`` is
    given (a callable taking the optimizer, or a Lightning scheduler config dict with such a callable under
    ``"scheduler"``). The fused kernel is used whenever the parameters allow it (``fused=None``); the choice is in
    ``optimizer.defaults["fused"]`` and in the grouping summary logged on rank zero.

    Under Lightning's mixed precision (``precision="bf16-mixed"``, or ``"16-mixed"`` with gradient clipping), a
    module attached to its Trainer keeps the fused kernel but leaves gradient unscaling to Lightning, which can then
    clip them (torch's fused Adam otherwise unscales inside its own step, and Lightning refuses to clip it); the
    grouping summary says so. This needs the LightningModule itself (a submodule does not know the Trainer); with
    a submodule under those settings, pass ``fused=False``.

    Parameters Adam or their mode cannot take are refused before any step, naming them: sparse-gradient embeddings
    (``sparse=True``; torch's Adam takes no sparse gradients) and complex parameters in ``l1``/``decoupled_l1``
    groups (the L1 modes are defined for real numbers). Numbers may be any real numbers, numpy's scalars included;
    ``amsgrad``, ``exclude_embeddings`` and ``exclude_1d`` must be booleans (a string such as ``"no"`` is a
    ``TypeError``, not True).

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
    # The Adam-only arguments first; plan() checks lr and every grouping option, mode included, before it groups.
    eps = check_non_negative("eps", eps)
    betas = check_betas(betas)
    amsgrad = check_bool("amsgrad", amsgrad)
    _check_scheduler(scheduler)
    grouping = plan(module, GroupingOptions(weight_decay, mode, exclude_embeddings, exclude_1d, overrides, lr))
    assert grouping.lr is not None  # plan() returns the lr it was given, as a checked float
    groups = grouping.groups()
    check_parameters(module, groups)
    implementation = choose_implementation(groups, fused)
    optimizer = torch.optim.Adam(groups, lr=grouping.lr, betas=betas, eps=eps, amsgrad=amsgrad, **implementation)
    attach(optimizer)
    kernel = describe_implementation(optimizer)
    amp_note = lightning_amp_note(module) if optimizer.defaults["fused"] else None
    if amp_note is not None:
        # With the flag off, Lightning's MixedPrecision plugin unscales the gradients (GradScaler.unscale_) before it
        # clips them, and GradScaler.step takes its ordinary path: it skips a step with inf gradients itself (reading
        # found_inf on the host) and otherwise steps the fused kernel without grad_scale/found_inf, on gradients that
        # are already unscaled. The L1 hooks then see neither attribute and use the plain coefficient, as they should.
        optimizer._step_supports_amp_scaling = False
        kernel += f" ({amp_note})"
    report = grouping.report().with_implementation(kernel)
    _REPORTS[optimizer] = report
    from lightning.pytorch.utilities import rank_zero_info  # here, so `import lit_decay` does not import Lightning

    rank_zero_info(f"lit_decay: {report.summary()}")
    if scheduler is None:
        return optimizer
    if isinstance(scheduler, Mapping):
        return {"optimizer": optimizer, "lr_scheduler": {**scheduler, "scheduler": scheduler["scheduler"](optimizer)}}
    return {"optimizer": optimizer, "lr_scheduler": scheduler(optimizer)}
