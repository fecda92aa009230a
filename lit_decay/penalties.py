"""The decay terms torch's Adam does not apply by itself, as hooks around its step.

Where a penalty sits around Adam is what makes it L2 or decoupled (optax's view): ``l2`` and ``decoupled`` are
torch's own group keys, applied inside the fused kernel. The two L1 modes are added here:

- ``l1``, before Adam: ``g ← g + wd·sign(p)``, so the term goes through Adam's moments like an L1 loss would;
- ``decoupled_l1``, after Adam: the proximal step ``p ← sign(p)·max(|p| − lr·wd, 0)``, which leaves exact zeros.

Both read the group's ``"decay_mode"`` and ``"decay_coefficient"`` at every step (so a schedule can move them), and
stay right in the three places a step pre-hook alone gets wrong:

- Lightning's closure-based ``optimizer.step(closure=...)``: the gradients only exist once the closure has run, so
  the hook runs it (once) and hands Adam its loss;
- a ``GradScaler`` with the fused kernel: gradients are still scaled by ``optimizer.grad_scale``, so the L1 term is
  scaled alike, and the proximal step is masked by ``optimizer.found_inf`` on device (no host sync): a skipped step
  changes nothing;
- gradient clipping, which Lightning does inside the closure: the term is added after it, as torch's own weight
  decay is.

Both are elementwise passes over a group's tensors: torch's multi-tensor ops in batches, and on a CPU one compiled
call per run of same-shaped tensors (compiled at the first step, seconds once per process; ``LIT_DECAY_COMPILE=0``
turns it off).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lit_decay._batches import MIN_RUN_NUMEL, RUN_LENGTHS, Plan, batches, local_real, plan
from lit_decay._compile import compiled_form, compiled_numel
from lit_decay.modes import L1_MODES, SPECS, TORCH_APPLIED

_ATTACHED: weakref.WeakKeyDictionary[Optimizer, DecayTerms] = weakref.WeakKeyDictionary()

# On a CPU, tensors this large take one in-place softshrink call each (see `soft_threshold`).
LARGE_NUMEL = 1 << 16

ProximalObserver = Callable[[Optimizer, dict[str, Any], "float | torch.Tensor"], None]


def _add_signs(params: list[torch.Tensor], grads: list[torch.Tensor], coefficient: torch.Tensor) -> None:
    # torch.sign's conventions (no term for ±0 and NaN weights); computed in the coefficient's dtype (float32, or
    # float64 for float64 tensors) and rounded once, as torch's add with alpha does.
    for param, grad in zip(params, grads):
        grad.copy_(grad.to(coefficient.dtype) + torch.sign(param).to(coefficient.dtype) * coefficient)


def _shrink(params: list[torch.Tensor], threshold: torch.Tensor) -> None:
    for param in params:
        wide = param.to(threshold.dtype)
        param.copy_(wide - torch.clamp(wide, -threshold, threshold))


_compiled_add_signs = compiled_form(_add_signs)
_compiled_shrink = compiled_form(_shrink)


def _coefficient_tensor(value: float | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a 0-d tensor in the arithmetic dtype of ``dtype`` tensors (float64 for float64, else float32),
    rounded once. A tensor, not a number: a compiled graph would be specialised on the number (a schedule changes it
    every step)."""
    wide = dtype if dtype == torch.float64 else torch.float32
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), dtype=torch.float64)
    return value.to(device, wide, non_blocking=True)


#: On a CPU, a tensor this large that is in no run of its shape takes a compiled call of its own.
SINGLE_RUN_NUMEL = 1 << 20
#: Run lengths of the L1 modes: one more than the monitor's, as their calls come at every step and are mostly host
#: time (guards per tensor, and a fixed cost per call): 200 tensors of 4,096 elements took 1.60× of an Adam step
#: with runs of 16 and 4, 1.51× with runs of 64 too.
L1_RUN_LENGTHS = (64, *RUN_LENGTHS)


def _plan(params: Sequence[torch.Tensor], max_numel: int | None = None) -> Plan:
    """How the L1 modes go over ``params`` (``lit_decay._batches.plan``): on a CPU with compiling on, runs of
    same-shaped tensors (of at most ``max_numel`` elements) take one compiled call each, a single pass with no
    temporary, where the multi-tensor ops make a pass per op with a temporary between them and start the CPU's
    threads for each tensor. On a GPU the multi-tensor ops are already one kernel per batch of tensors, so they take
    everything there."""
    compiled_from = compiled_numel()
    if compiled_from is None:
        return plan(params, min_numel=None)
    return plan(
        params,
        min_numel=min(compiled_from, MIN_RUN_NUMEL),
        single_numel=max(compiled_from, SINGLE_RUN_NUMEL),
        max_numel=max_numel,
        lengths=L1_RUN_LENGTHS,
    )


def add_l1_gradient(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], coefficient: float | torch.Tensor
) -> None:
    """``g ← g + coefficient·sign(p)`` in place, a batch of tensors at a time.

    On a CPU, runs of same-shaped tensors take one compiled pass each (``_plan``); everything else takes two of
    torch's multi-tensor ops per batch.

    Examples:
        >>> p, g = torch.tensor([2.0, -1.0, 0.0]), torch.zeros(3)
        >>> add_l1_gradient([p], [g], 0.1); g
        tensor([ 0.1000, -0.1000,  0.0000])
    """
    found = _plan(params)
    if not found.plain:
        params, grads = local_real(params), local_real(grads)
    for bucket in found.buckets:
        if bucket.runs:
            c = _coefficient_tensor(coefficient, bucket.device, bucket.dtype)
            for run in bucket.runs:
                _compiled_add_signs([params[i] for i in run], [grads[i] for i in run], c)
        if not bucket.rest:
            continue
        chosen = [params, grads]
        if len(bucket.rest) < len(params):
            chosen = [[params[i] for i in bucket.rest], [grads[i] for i in bucket.rest]]
        scale = coefficient.to(bucket.device, non_blocking=True) if isinstance(coefficient, torch.Tensor) else None
        for batch in batches(chosen):
            batch_params, batch_grads = batch.lists
            signs = torch._foreach_sign(batch_params)
            if scale is None:
                torch._foreach_add_(batch_grads, signs, alpha=float(coefficient))
            else:
                torch._foreach_mul_(signs, scale)
                torch._foreach_add_(batch_grads, signs)


def soft_threshold(params: Sequence[torch.Tensor], threshold: float | torch.Tensor) -> None:
    """The proximal L1 step ``p ← sign(p)·max(|p| − threshold, 0)`` in place: exact zeros where ``|p| ≤ threshold``.

    Written ``p ← p − clamp(p, −threshold, threshold)``. On a CPU with a number for the threshold, tensors of ≥ 2**16
    elements take torch's in-place ``softshrink`` (one pass; one call per tensor costs little next to its work, and
    measured faster than a compiled pass there), and runs of same-shaped smaller ones one compiled pass each
    (``_plan``); with a tensor threshold, runs of any size do. The rest take three multi-tensor ops per batch.

    Examples:
        >>> p = torch.tensor([0.5, -0.05, 0.02, -2.0])
        >>> soft_threshold([p], 0.1); p.abs()
        tensor([0.4000, 0.0000, 0.0000, 1.9000])
    """
    if not isinstance(threshold, torch.Tensor) and threshold <= 0:
        return
    found = _plan(params, None if isinstance(threshold, torch.Tensor) else LARGE_NUMEL - 1)
    if not found.plain:
        params = local_real(params)
    for bucket in found.buckets:
        if bucket.runs:
            t = _coefficient_tensor(threshold, bucket.device, bucket.dtype)
            for run in bucket.runs:
                _compiled_shrink([params[i] for i in run], t)
        group = params if len(bucket.rest) == len(params) else [params[i] for i in bucket.rest]
        if not isinstance(threshold, torch.Tensor) and bucket.device.type == "cpu":
            large = [p for p in group if p.numel() >= LARGE_NUMEL]
            for param in large:
                torch.ops.aten.softshrink.out(param, threshold, out=param)
            group = [p for p in group if p.numel() < LARGE_NUMEL]
        for batch in batches([group]):
            (pieces,) = batch.lists
            if isinstance(threshold, torch.Tensor):
                t = threshold.to(bucket.device, pieces[0].dtype, non_blocking=True)
                clamped = torch._foreach_clamp_max(pieces, [t] * len(pieces))
                torch._foreach_clamp_min_(clamped, [-t] * len(pieces))
            else:
                clamped = torch._foreach_clamp_max(pieces, threshold)
                torch._foreach_clamp_min_(clamped, -threshold)
            torch._foreach_sub_(pieces, clamped)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float64 (float32 on MPS, which has none), so a scaler's float32 scale does not round a float64
    parameter's L1 term; each kernel casts to the parameter's dtype."""
    return tensor.to(torch.float32 if tensor.device.type == "mps" else torch.float64)


def _returning(value: Any) -> Any:
    return value


class DecayTerms:
    """The step hooks that apply ``l1`` and ``decoupled_l1`` groups' penalties on one optimizer.

    Use ``attach`` rather than this class directly.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._handles = [
            optimizer.register_step_pre_hook(self.before_step),
            optimizer.register_step_post_hook(self.after_step),
        ]
        # An OrderedDict, as torch keeps its hooks: RemovableHandle holds it by weak reference.
        self._proximal_observers: OrderedDict[int, ProximalObserver] = OrderedDict()
        # Each lit_decay group's coefficient as last reconciled, to tell which of its two keys was written since.
        self._reconciled: dict[int, tuple[dict[str, Any], float]] = {}
        self._warned: set[str] = set()

    def observe_proximal_step(self, observer: ProximalObserver) -> RemovableHandle:
        """Call ``observer(optimizer, group, threshold)`` for each ``decoupled_l1`` group after Adam's step and just
        before the proximal step (the monitor reads Adam's update there instead of copying the weights)."""
        handle = RemovableHandle(self._proximal_observers)
        self._proximal_observers[handle.id] = observer
        return handle

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()

    @staticmethod
    def _active(optimizer: Optimizer, applied: str) -> list[dict[str, Any]]:
        """The decayed groups whose mode lit_decay applies at ``applied`` (``lit_decay.modes.ModeSpec.applied_by``)."""
        return [
            g
            for g in optimizer.param_groups
            if (spec := SPECS.get(g.get("decay_mode", "none"))) is not None
            and spec.applied_by == applied
            and g.get("decay_coefficient", 0.0) > 0
        ]

    def reconcile(self, optimizer: Optimizer) -> None:
        """Make each lit_decay group's ``"decay_coefficient"`` and torch's ``"weight_decay"`` agree before the step.

        Torch's key is what a training loop sets directly (timm- and DINO-style schedules do), so it wins: an ``l2`` or
        ``decoupled`` group's coefficient follows it, unless only the coefficient changed since the last step (then
        torch's key follows the coefficient). An L1 group's torch key must stay 0 (torch would add its own L2 term),
        so a value found there becomes the group's L1 coefficient; a ``"none"`` group given one becomes the mode
        torch applies (``l2``, or ``decoupled`` with ``decoupled_weight_decay``). Both of these warn once per group.
        """
        for index, group in enumerate(optimizer.param_groups):
            mode = group.get("decay_mode")
            torch_key = group.get("weight_decay", 0.0)
            if mode is None or isinstance(torch_key, torch.Tensor):
                continue
            coefficient = group.get("decay_coefficient", 0.0)
            seen = self._reconciled.get(id(group))
            last = seen[1] if seen is not None and seen[0] is group else None
            if mode in TORCH_APPLIED:
                if torch_key != coefficient:
                    if last is not None and torch_key == last:
                        group["weight_decay"] = coefficient
                    else:
                        group["decay_coefficient"] = float(torch_key)
            elif torch_key:
                name = str(group.get("name", f"pg{index + 1}"))
                if mode in L1_MODES:
                    group["decay_coefficient"] = float(torch_key)
                    group["weight_decay"] = 0.0
                    what = f"is taken as its {mode} coefficient (torch's key stays 0, or torch would add an L2 term)"
                else:
                    group["decay_mode"] = "decoupled" if group.get("decoupled_weight_decay") else "l2"
                    group["decay_coefficient"] = float(torch_key)
                    what = f"makes it a {group['decay_mode']!r} group, which torch applies"
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"param group {name!r} (decay_mode={mode!r}) was given torch's weight_decay={torch_key!r}; "
                        f"lit_decay {what}. lit_decay.modes.set_decay_coefficient(group, value) changes a group's "
                        "strength in the keys its mode uses.",
                        UserWarning,
                        stacklevel=4,
                    )
            self._reconciled[id(group)] = (group, float(group["decay_coefficient"]))

    def before_step(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self.reconcile(optimizer)
        groups = self._active(optimizer, "before_step")
        if not groups:
            return None
        # torch passes step's own arguments, the optimizer first: (self, closure) or (self,) with closure in kwargs.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            # The gradients do not exist before the closure's backward: run it here, once, and give Adam its loss.
            with torch.enable_grad():
                loss = closure()
            args = args[:1]
            kwargs = {**kwargs, "closure": functools.partial(_returning, loss)}
        grad_scale = getattr(optimizer, "grad_scale", None)
        with torch.no_grad():
            for group in groups:
                stepped = [p for p in group["params"] if p.grad is not None]
                if not stepped:
                    continue
                coefficient: float | torch.Tensor = float(group["decay_coefficient"])
                if grad_scale is not None:
                    # The fused kernel unscales gradients itself; the term must be in the same (scaled) units.
                    coefficient = _wide(grad_scale) * coefficient
                add_l1_gradient(stepped, [p.grad for p in stepped], coefficient)
        return args, kwargs

    def after_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        groups = self._active(optimizer, "after_step")
        if not groups:
            return
        found_inf = getattr(optimizer, "found_inf", None)
        with torch.no_grad():
            for group in groups:
                stepped = [p for p in group["params"] if p.grad is not None]
                if not stepped:
                    continue
                lr = group["lr"]
                threshold: float | torch.Tensor = lr * float(group["decay_coefficient"])
                if found_inf is not None:
                    # A step the scaler skipped must change nothing; decided on device, without a host sync.
                    threshold = (1.0 - _wide(found_inf)) * threshold
                for observer in list(self._proximal_observers.values()):
                    observer(optimizer, group, threshold)
                soft_threshold(stepped, threshold)


# Marks an optimizer whose L1 hooks were attached. Torch copies ``defaults`` with the optimizer (deepcopy, pickle: its
# __getstate__ keeps defaults, state and param_groups) but not its step hooks, so a copy carries the mark without the
# hooks; the process-wide pre-hook below attaches them to it at its first step.
ATTACHED_MARK = "lit_decay_l1_hooks"


def _attach_to_copies(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if optimizer.defaults.get(ATTACHED_MARK) and optimizer not in _ATTACHED:
        # Torch runs the process-wide pre-hooks first and reads the optimizer's own hooks after them, so the hooks
        # attached here already apply to this step.
        attach(optimizer)


register_optimizer_step_pre_hook(_attach_to_copies)


def attach(optimizer: Optimizer) -> DecayTerms:
    """Attach the L1 step hooks to ``optimizer`` (once; a second call returns the same hooks).

    A copy of ``optimizer`` (``copy.deepcopy``, pickling) keeps the penalty: torch copies no step hooks, so lit_decay
    attaches them to the copy at its first step (in any process that has imported lit_decay).

    Examples:
        >>> layer = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.Adam([{"params": list(layer.parameters()), "decay_mode": "l1", "decay_coefficient": 0.1}])
        >>> terms = attach(opt); is_attached(opt)
        True
    """
    terms = _ATTACHED.get(optimizer)
    if terms is None:
        terms = _ATTACHED[optimizer] = DecayTerms(optimizer)
        optimizer.defaults[ATTACHED_MARK] = True
    return terms


def is_attached(optimizer: Optimizer) -> bool:
    """Whether the L1 hooks are attached to ``optimizer`` (if not, torch applies no L1 penalty at all)."""
    return optimizer in _ATTACHED


def observe_proximal_step(optimizer: Optimizer, observer: ProximalObserver) -> RemovableHandle | None:
    """Have ``observer(optimizer, group, threshold)`` called just before each proximal L1 step of ``optimizer``;
    None if no L1 hooks are attached to it (then it takes no proximal step)."""
    terms = _ATTACHED.get(optimizer)
    return None if terms is None else terms.observe_proximal_step(observer)
