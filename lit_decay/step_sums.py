"""The sums behind the monitor's figures, for one param group right after its step, computed on device.

Split the way torch splits Adam: ``gather`` collects a group's tensors and Adam's state (local shards, complex
tensors as real pairs); ``adam_update`` rebuilds the step Adam just took from that state (so no copy of the weights
is needed); ``group_sums`` reduces each tensor to one row of ``COLUMNS``:

- ``w2`` Σw² of the weights after the whole step, ``g2`` Σg² of the unscaled gradient Adam used,
- ``d2`` Σ(Δw)² of the step's change,
- ``penalty`` the numerator of the effective decay d = −⟨Δw_reg, w⟩/‖w‖² of the group's ``Penalty``
  (``lit_decay.modes``), ``penalised_w2`` its denominator: Σw² of the weights the penalty acted on,
- ``nonzeros`` the number of weights that are not exactly zero after the step (L1 groups' sparsity).

Small tensors go through torch's multi-tensor (foreach) ops, a few calls for all of them; large tensors through one
compiled pass that reads their weights, gradients and moments once, one call per run of same-shaped tensors
(``lit_decay._batches.same_shape_runs``, ``lit_decay._compile``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lit_decay._batches import batches, by_device_and_dtype, plan, real
from lit_decay._compile import COMPILED_DEVICES, compiled_form, compiled_numel, compiled_or_eager, wants_compiled
from lit_decay._tensors import local
from lit_decay.modes import Penalty, Rule

TensorList = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what torch's foreach ops take and return

COLUMNS: tuple[str, ...] = ("w2", "g2", "d2", "penalty", "nonzeros", "penalised_w2")


def update_from_state(
    optimizer: Optimizer, group: Mapping[str, Any], rule: Rule, *, sees_proximal_step: bool = False
) -> bool:
    """Whether the step's update of ``group`` can be read from Adam's state (else a snapshot is needed).

    True for torch's Adam/AdamW with float32/float64 (or complex) weights (lower precision rounds the applied update
    away from Adam's) in every mode; for ``decoupled_l1`` only when the figures are taken just before lit_decay's
    proximal step (``sees_proximal_step``), since the weights after it no longer tell what they were.
    """
    if not isinstance(optimizer, torch.optim.Adam) or rule.penalty is Penalty.UNKNOWN:
        return False
    if rule.penalty is Penalty.PROXIMAL_L1 and not sees_proximal_step:
        return False
    if rule.penalty is Penalty.DECOUPLED:
        # Rebuilding AdamW's w_old divides by 1 − lr·wd; a tensor lr would have to be read on the host to check it.
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) or lr * rule.coefficient >= 0.5:
            return False
    exact = (torch.float32, torch.float64, torch.complex64, torch.complex128)
    return all(p.dtype in exact for p in group["params"])


@dataclass
class StepContext:
    """What a group's sums need besides its tensors: the step's scalars, all on device or host floats."""

    rule: Rule
    decay: float | torch.Tensor  # lr·wd
    eps: float
    keep: torch.Tensor | None  # 0 on a step the grad scaler skipped, else 1 (None without a scaler)
    grad_factor: torch.Tensor | None  # unscales gradients the fused kernel left scaled (a skipped step)
    threshold: float | torch.Tensor | None  # the proximal step about to be applied (figures taken just before it)
    count_zeros: bool
    per_tensor: bool = True  # a row for every tensor (per-parameter figures, sharded tensors); else group totals


@dataclass
class GroupTensors:
    """A group's tensors after its step: all weights, and for those that had a gradient, what Adam used."""

    weights: list[torch.Tensor]
    stepped: list[int]  # indices into ``weights`` of the tensors that had a gradient (the others were not stepped)
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor] | None  # when the update is read from Adam's state
    exp_avg_sqs: list[torch.Tensor] | None  # when the update or the penalty needs Adam's denominator
    snapshots: list[torch.Tensor] | None  # weights before the step, when the update cannot be read from the state
    step_sizes: torch.Tensor | None  # lr/(1 − β₁ᵗ) per stepped tensor
    inv_sqrt_bias2: torch.Tensor | None  # 1/√(1 − β₂ᵗ) per stepped tensor
    plain: bool = False  # every tensor a real, non-sharded torch.nn.Parameter


def bias_corrections(
    steps: Sequence[torch.Tensor], lr: float | torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's ``lr/(1 − β₁ᵗ)`` and ``1/√(1 − β₂ᵗ)`` for each step count, in a few device ops for the whole group.

    A count of 0 (a grad scaler skipped every step so far and rolled the count back) is read as 1: that step made
    no update, and its figures must stay finite.

    Examples:
        >>> step_size, inv_sqrt = bias_corrections([torch.tensor(1.0), torch.tensor(0.0)], 0.1, 0.9, 0.999)
        >>> [round(x, 4) for x in step_size.tolist()]
        [1.0, 1.0]
    """
    wide = torch.float64 if steps[0].device.type != "mps" else torch.float32
    t = torch.stack(list(steps)).detach().to(wide).clamp(min=1.0)
    if isinstance(lr, torch.Tensor):
        lr = lr.detach().to(t.device, t.dtype, non_blocking=True)
    return lr / (1 - beta1**t), (1 - beta2**t).rsqrt()


def gather(
    optimizer: Optimizer,
    group: Mapping[str, Any],
    *,
    from_state: bool,
    wants_denominator: bool,
    snapshots: list[torch.Tensor] | None,
) -> GroupTensors:
    """Collect ``group``'s tensors and Adam's state after the step (local shards; complex tensors as real pairs)."""
    params = group["params"]
    stepped = [i for i, p in enumerate(params) if p.grad is not None]
    states = [optimizer.state.get(params[i], {}) for i in stepped]
    has_state = bool(stepped) and all("exp_avg_sq" in s for s in states)
    from_state = from_state and has_state
    wants_denominator = (wants_denominator or from_state) and has_state
    # Host time per tensor is what a GPU cannot hide: plain real tensors (the usual case) are taken as they are.
    plain = all(type(p) is torch.nn.Parameter and not p.is_complex() for p in params)
    view = _as_is if plain else _local_real
    # Read under torch.no_grad (the step hooks and group_stats run there), so parameters need no detach.
    weights = list(params) if plain else [view(p.detach()) for p in params]
    grads = [view(params[i].grad) for i in stepped]
    exp_avgs = [view(s["exp_avg"]) for s in states] if from_state else None
    exp_avg_sqs = None
    step_sizes = inv_sqrt_bias2 = None
    if wants_denominator:
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        exp_avg_sqs = [view(s[key]) for s in states]
        beta1, beta2 = (float(b) for b in group["betas"])
        steps = [s["step"] for s in states] if plain else [local(s["step"]) for s in states]
        step_sizes, inv_sqrt_bias2 = bias_corrections(steps, group["lr"], beta1, beta2)
    kept = None if snapshots is None else [real(snapshots[i]) for i in stepped]
    return GroupTensors(weights, stepped, grads, exp_avgs, exp_avg_sqs, kept, step_sizes, inv_sqrt_bias2, plain)


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _local_real(tensor: torch.Tensor) -> torch.Tensor:
    return real(local(tensor))


# ---- one large tensor: a single elementwise pass, compiled --------------------------------------------------------


def _tensor_sums(
    w: torch.Tensor,
    g: torch.Tensor | None,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    w_old: torch.Tensor | None,
    step_size: torch.Tensor | None,
    inv_sqrt_bias2: torch.Tensor | None,
    keep: torch.Tensor | None,
    grad_factor: torch.Tensor | None,
    eps: float,
    decay: float | torch.Tensor,
    penalty: Penalty,
    threshold: float | torch.Tensor | None,
    count_zeros: bool,
) -> torch.Tensor:
    """The row of ``COLUMNS`` for one (local) tensor, in one pass over its weights, gradient and moments (all of one
    shape).

    Flat arguments, many of them, on purpose: this is what ``torch.compile`` specialises on (which are None, dtypes,
    the penalty), and a container would add guards on its fields to every call.

    With ``threshold``, ``w`` holds the weights after Adam's step and before the proximal step, which this pass
    applies to its own copy: the figures are those of the weights after the whole step, the penalty's are those of
    the weights it acts on.
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    penalised = w.to(acc)
    shrink = None
    wf = penalised
    if threshold is not None:
        shrink = torch.clamp(penalised, -threshold, threshold)  # type: ignore[arg-type]
        wf = penalised - shrink
    zero = torch.zeros((), dtype=acc, device=w.device)
    w2 = (wf * wf).sum()
    # Only sparsity needs the count, and only L1 groups log it: a reduction less (about a tenth of the pass).
    nonzeros = (wf != 0).to(acc).sum() if count_zeros else zero
    g2 = zero
    if g is not None:
        gf = g.to(acc) if grad_factor is None else g.to(acc) * grad_factor
        squares = gf * gf
        # Both branches are g², so this is Σg² exactly; reading w puts it in the compiled pass over w, where alone it
        # would get a loop of its own, and on a CPU a start of the threads per tensor (measured: 1.55× of an Adam
        # step for a run's sums, against 1.2× this way).
        g2 = torch.where(w == w, squares, squares).sum()
    denom = None
    if v is not None and inv_sqrt_bias2 is not None:
        denom = torch.sqrt(v.to(acc)) * inv_sqrt_bias2 + eps
    d2 = zero
    if w_old is not None:
        delta = wf - w_old.to(acc)
        d2 = (delta * delta).sum()
    elif m is not None and denom is not None and step_size is not None:
        update = adam_update(m.to(acc), denom, step_size, keep)
        if penalty is Penalty.DECOUPLED:
            # AdamW: w = w_old·(1 − lr·wd) − update, so w_old = (w + update)/(1 − lr·wd).
            delta = -update - (decay / (1.0 - decay)) * (wf + update)
            if keep is not None:
                delta = delta * keep
        elif shrink is not None:
            delta = -shrink - update
        else:
            delta = -update
        d2 = (delta * delta).sum()
    reg = zero
    if penalty is Penalty.ADAM_L2 and denom is not None:
        reg = (wf * wf / denom).sum()
    elif penalty is Penalty.ADAM_L1 and denom is not None:
        reg = (wf.abs() / denom).sum()
    elif penalty is Penalty.PROXIMAL_L1:
        reg = (shrink * penalised).sum() if shrink is not None else (wf.abs() * torch.clamp(wf.abs(), max=decay)).sum()
    penalised_w2 = (penalised * penalised).sum() if shrink is not None else w2
    return torch.stack([w2, g2, d2, reg, nonzeros, penalised_w2])


def adam_update(
    exp_avg: torch.Tensor, denominator: torch.Tensor, step_size: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """The step Adam took, read back from its state: ``step_size·m/D`` (subtracted from the weights), with
    ``D = √v/√(1 − β₂ᵗ) + eps``; zero on a step the grad scaler skipped (``keep`` = 0)."""
    update = step_size * exp_avg / denominator
    return update if keep is None else update * keep


_compiled_tensor_sums = compiled_or_eager(_tensor_sums)


def _run_sums(
    ws: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor] | None,
    vs: list[torch.Tensor] | None,
    olds: list[torch.Tensor] | None,
    step_sizes: torch.Tensor | None,
    inv_sqrt_bias2: torch.Tensor | None,
    keep: torch.Tensor | None,
    grad_factor: torch.Tensor | None,
    eps: float,
    decay: float | torch.Tensor,
    penalty: Penalty,
    threshold: float | torch.Tensor | None,
    count_zeros: bool,
) -> torch.Tensor:
    """``_tensor_sums`` of each stepped tensor of a run of same-shaped ones (``lit_decay._batches.same_shape_runs``),
    as rows ``[len(ws), len(COLUMNS)]``: compiled, one call and one fused pass for the whole run."""
    rows = [
        _tensor_sums(
            ws[i],
            gs[i],
            None if ms is None else ms[i],
            None if vs is None else vs[i],
            None if olds is None else olds[i],
            None if step_sizes is None else step_sizes[i],
            None if inv_sqrt_bias2 is None else inv_sqrt_bias2[i],
            keep,
            grad_factor,
            eps,
            decay,
            penalty,
            threshold,
            count_zeros,
        )
        for i in range(len(ws))
    ]
    return torch.stack(rows)


_compiled_run_sums = compiled_form(_run_sums)


# ---- many small tensors: torch's multi-tensor ops -----------------------------------------------------------------


def _squared_norms(tensors: TensorList, acc: torch.dtype) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).square()


def _abs_sums(tensors: TensorList, acc: torch.dtype) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, 1, dtype=acc))


def _foreach_sums(t: GroupTensors, context: StepContext) -> torch.Tensor:
    """The rows of ``COLUMNS`` for tensors on one device and of one dtype, all stepped (``t.stepped`` covers every
    weight) or none: ``_tensor_sums``'s formula with one multi-tensor call per operation for the whole list.

    Each op is a pass over every tensor, so the formula is arranged for few of them: Adam's denominator is taken as
    D = b·D' with D' = √v + eps/b (b = 1/√(1 − β₂ᵗ), one per tensor), and every per-tensor factor is applied to the
    tensor's sums rather than to its elements.
    """
    w = t.weights
    n, device, dtype = len(w), w[0].device, w[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    zero = torch.zeros(n, dtype=acc, device=device)
    shrink = None if context.threshold is None or not t.stepped else _clamped(w, context.threshold)
    after = w if shrink is None else torch._foreach_sub(w, shrink)
    w2 = _squared_norms(after, acc)
    nonzeros = torch.stack(torch._foreach_norm(after, 0, dtype=acc)) if context.count_zeros else zero
    g2 = zero
    if t.stepped:
        g2 = _squared_norms(t.grads, acc)
        if context.grad_factor is not None:
            g2 = g2 * context.grad_factor.to(acc).square()
    reduced = None  # D' = √v + eps/b, so that Adam's D = b·D'
    if t.exp_avg_sqs is not None and t.inv_sqrt_bias2 is not None:
        reduced = torch._foreach_sqrt(t.exp_avg_sqs)
        torch._foreach_add_(reduced, _scalars(context.eps / t.inv_sqrt_bias2, dtype))
    d2 = zero
    if t.snapshots is not None:
        d2 = _snapshot_update_squares(after, t.snapshots, acc)
    elif t.exp_avgs is not None and reduced is not None:
        d2 = _adam_update_squares(t, context, reduced, shrink, acc)
    reg = zero
    if t.stepped:
        reg = _penalty_sums(t, context, after, shrink, reduced, acc)
    penalised_w2 = _squared_norms(w, acc) if shrink is not None else w2
    return torch.stack([w2, g2, d2, reg, nonzeros, penalised_w2], dim=1)


def _scalars(values: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """One 0-d tensor per tensor of a list, for a foreach op's per-tensor factor (no host transfer)."""
    return list(values.to(dtype).unbind())


def _clamped(w: TensorList, threshold: float | torch.Tensor) -> TensorList:
    """clamp(w, −threshold, threshold): what the proximal step subtracts."""
    if isinstance(threshold, torch.Tensor):
        t = threshold.to(w[0].device, w[0].dtype, non_blocking=True)
        shrink = torch._foreach_clamp_max(w, [t] * len(w))
        torch._foreach_clamp_min_(shrink, [-t] * len(w))
    else:
        shrink = torch._foreach_clamp_max(w, threshold)
        torch._foreach_clamp_min_(shrink, -threshold)
    return shrink


def _snapshot_update_squares(after: TensorList, before: TensorList, acc: torch.dtype) -> torch.Tensor:
    if after[0].dtype != acc:
        # Low-precision weights (their update comes from a snapshot): subtract in float32, as the old and new
        # weights of a bfloat16 tensor can differ by more than bfloat16 can hold exactly.
        after, before = [x.to(acc) for x in after], [x.to(acc) for x in before]
    return _squared_norms(torch._foreach_sub(after, before), acc)


def _adam_update_squares(
    t: GroupTensors, context: StepContext, reduced: TensorList, shrink: TensorList | None, acc: torch.dtype
) -> torch.Tensor:
    """Σ(Δw)² per tensor, with Adam's update u = σ·m/D' (σ = step_size/b) read back from its state."""
    assert t.exp_avgs is not None and t.step_sizes is not None and t.inv_sqrt_bias2 is not None
    dtype = t.weights[0].dtype
    sigma = t.step_sizes / t.inv_sqrt_bias2
    keep = None if context.keep is None else context.keep.to(sigma.dtype)
    ratio = torch._foreach_div(t.exp_avgs, reduced)
    if shrink is not None:
        # Δw = −shrink − u (a skipped step's threshold is already 0)
        torch._foreach_mul_(ratio, _scalars(sigma if keep is None else sigma * keep, dtype))
        torch._foreach_add_(ratio, shrink)
        return _squared_norms(ratio, acc)
    if context.rule.penalty is Penalty.DECOUPLED:
        # AdamW: Δw = −u − k·(w + u) = −(1 + k)σ·(m/D' + c·w), k = lr·wd/(1 − lr·wd), c = k/((1 + k)σ).
        k = float(context.decay) / (1.0 - float(context.decay))
        scale = (1.0 + k) * sigma
        c = torch.where(scale > 0, k / scale, torch.zeros_like(scale))
        torch._foreach_addcmul_(ratio, t.weights, _scalars(c, dtype))
    else:
        scale = sigma
    d2 = _squared_norms(ratio, acc) * scale.to(acc).square()
    return d2 if keep is None else d2 * keep.to(acc)


def _penalty_sums(
    t: GroupTensors,
    context: StepContext,
    after: TensorList,
    shrink: TensorList | None,
    reduced: TensorList | None,
    acc: torch.dtype,
) -> torch.Tensor:
    """The effective decay's numerator per tensor (``lit_decay.modes``' table), for the group's ``Penalty``."""
    penalty = context.rule.penalty
    if penalty in (Penalty.ADAM_L2, Penalty.ADAM_L1) and reduced is not None and t.inv_sqrt_bias2 is not None:
        if penalty is Penalty.ADAM_L2:
            terms = torch._foreach_mul(after, after)
            torch._foreach_div_(terms, reduced)
        else:
            terms = torch._foreach_div(after, reduced)
        return _abs_sums(terms, acc) / t.inv_sqrt_bias2.to(acc)
    if penalty is Penalty.PROXIMAL_L1:
        if shrink is not None:
            return _abs_sums(torch._foreach_mul(shrink, t.weights), acc)  # shrink and w share their signs
        magnitudes = torch._foreach_abs(after)
        capped = _clamped(magnitudes, context.decay)  # min(|w|, lr·wd), as |w| ≥ 0
        torch._foreach_mul_(capped, magnitudes)
        return _abs_sums(capped, acc)
    return torch.zeros(len(after), dtype=acc, device=after[0].device)


# ---- a whole group --------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """Sums of some of a group's tensors: one row per tensor of ``indices`` (``per_tensor``), or a single row of
    their totals."""

    indices: list[int]
    rows: torch.Tensor  # [len(indices) or 1, len(COLUMNS)]
    per_tensor: bool = True


#: Small tensors flattened together for one compiled pass: at most this many elements per buffer.
FLAT_NUMEL = 1 << 22


def group_sums(tensors: GroupTensors, context: StepContext) -> list[Block]:
    """The sums of every weight tensor of the group, on device, in a few blocks.

    Stepped tensors in runs of one shape (``lit_decay._batches.same_shape_runs``) take one compiled call per run, and
    a large tensor in no run one of its own. Small tensors take torch's multi-tensor ops; on a CPU, where those ops
    run one kernel per tensor, the stepped ones are instead flattened into one buffer per input and take the same
    compiled pass together, when the group's totals are all that is needed (``context.per_tensor`` False) and their
    Adam step counts agree (read on the host, where a CPU's step counts live).
    """
    blocks: list[Block] = []
    position = {index: k for k, index in enumerate(tensors.stepped)}
    threshold = compiled_numel()
    covered: set[int] = set()
    if threshold is not None and tensors.stepped:
        stepped_weights = [tensors.weights[i] for i in tensors.stepped]
        found = plan(stepped_weights, min_numel=threshold, single_numel=threshold, devices=COMPILED_DEVICES)
        for bucket in found.buckets:
            for run in bucket.runs:
                indices = [tensors.stepped[k] for k in run]
                blocks.append(Block(indices, _run_pass(tensors, context, run)))
                covered.update(indices)
    small: list[int] = []
    for index, weight in enumerate(tensors.weights):
        if index in covered:
            continue
        if not wants_compiled(weight, threshold):
            small.append(index)
            continue
        k = position.get(index)
        parts = [None if k is None or values is None else values[k] for values in _stepped_lists(tensors)]
        if not all(t is None or t.is_contiguous() for t in parts):
            small.append(index)
            continue
        row = _one_pass(tensors, context, (weight, *parts), k=k)
        blocks.append(Block([index], row.unsqueeze(0)))
    if not small:
        return blocks
    if len(small) == len(tensors.weights) and len({(t.device, t.dtype) for t in tensors.weights}) == 1:
        buckets = [small]  # the usual case, without a pass to sort tensors
    else:
        by_kind = by_device_and_dtype([tensors.weights[i] for i in small])
        buckets = [[small[i] for i in bucket] for bucket in by_kind.values()]
    for members in buckets:
        stepped = [i for i in members if i in position]
        unstepped = [i for i in members if i not in position] if len(stepped) < len(members) else []
        if stepped and _flattens(tensors, context, stepped, threshold):
            blocks += _flat_blocks(tensors, context, stepped, position)
        elif stepped:
            blocks.append(Block(stepped, _foreach_block(tensors, stepped, [position[i] for i in stepped], context)))
        if unstepped:
            blocks.append(Block(unstepped, _foreach_block(tensors, unstepped, [], context)))
    return blocks


def _run_pass(tensors: GroupTensors, context: StepContext, run: list[int]) -> torch.Tensor:
    """``_run_sums`` compiled, for the stepped tensors at positions ``run`` (among the stepped ones)."""

    def pick(values: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        return None if values is None else [values[k] for k in run]

    def pick_scalars(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        if values.device.type == "cpu":
            return values[run]
        # Stacked from host-indexed elements: an index tensor would be a host-to-device copy.
        return torch.stack([values[k] for k in run])

    return _compiled_run_sums(
        [tensors.weights[tensors.stepped[k]] for k in run],
        [tensors.grads[k] for k in run],
        pick(tensors.exp_avgs),
        pick(tensors.exp_avg_sqs),
        pick(tensors.snapshots),
        step_sizes=pick_scalars(tensors.step_sizes),
        inv_sqrt_bias2=pick_scalars(tensors.inv_sqrt_bias2),
        keep=context.keep if tensors.exp_avgs is not None else None,
        grad_factor=context.grad_factor,
        eps=context.eps,
        decay=context.decay,
        penalty=context.rule.penalty,
        threshold=context.threshold,
        count_zeros=context.count_zeros,
    )


def _one_pass(
    tensors: GroupTensors, context: StepContext, inputs: tuple[torch.Tensor | None, ...], *, k: int | None
) -> torch.Tensor:
    """``_tensor_sums`` compiled, for one tensor (or flattened tensors) whose step scalars are those of ``k``:
    ``inputs`` are its weights, gradient, Adam's two moments and the snapshot, each as it is (a view made for the call
    would cost dynamo more than the pass) or None."""
    w, g, m, v, w_old = inputs
    assert w is not None
    return _compiled_tensor_sums(
        w,
        g,
        m,
        v,
        w_old,
        step_size=None if k is None or tensors.step_sizes is None else tensors.step_sizes[k],
        inv_sqrt_bias2=None if k is None or tensors.inv_sqrt_bias2 is None else tensors.inv_sqrt_bias2[k],
        keep=context.keep if m is not None else None,
        grad_factor=context.grad_factor if g is not None else None,
        eps=context.eps,
        decay=context.decay,
        penalty=context.rule.penalty if k is not None else Penalty.NONE,
        threshold=context.threshold if k is not None else None,
        count_zeros=context.count_zeros,
    )


def _flattens(tensors: GroupTensors, context: StepContext, stepped: list[int], threshold: int | None) -> bool:
    if context.per_tensor or not tensors.plain or threshold is None or tensors.weights[stepped[0]].device.type != "cpu":
        return False
    if sum(tensors.weights[i].numel() for i in stepped) < max(threshold, 1):
        return False  # too little work to pay for a compiled call (and, in tiny models, for compiling at all)
    for scalars in (tensors.step_sizes, tensors.inv_sqrt_bias2):
        if scalars is not None and not bool((scalars == scalars[0]).all()):  # host tensors: no synchronisation
            return False
    return True


def _flat_blocks(
    tensors: GroupTensors, context: StepContext, stepped: list[int], position: dict[int, int]
) -> list[Block]:
    blocks = []
    for batch in batches([[tensors.weights[i] for i in stepped]], limit=FLAT_NUMEL):
        chosen = [stepped[j] for j in batch.owner]  # small tensors are never cut: one entry each
        ks = [position[i] for i in chosen]
        g, m, v, w_old = (
            None if values is None else _flatten([values[k] for k in ks]) for values in _stepped_lists(tensors)
        )
        row = _one_pass(tensors, context, (_flatten([tensors.weights[i] for i in chosen]), g, m, v, w_old), k=ks[0])
        blocks.append(Block(chosen, row.unsqueeze(0), per_tensor=False))
    return blocks


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    # One C++ call (what DDP's bucketing uses), rather than a view per tensor from Python.
    return torch._utils._flatten_dense_tensors(tensors)


def _stepped_lists(tensors: GroupTensors) -> tuple[list[torch.Tensor] | None, ...]:
    return (tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.snapshots)


def _foreach_block(tensors: GroupTensors, chosen: list[int], ks: list[int], context: StepContext) -> torch.Tensor:
    """``_foreach_sums`` of the tensors ``chosen`` (their positions among the stepped ones: ``ks``, empty when they
    were not stepped: no gradient, no update and no penalty this step)."""

    def pick(values: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        return None if values is None or not ks else [values[k] for k in ks]

    def pick_scalars(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None or not ks:
            return None
        # Indexing by host ints and stacking: no index tensor to copy to the device.
        return values if len(ks) == len(values) else torch.stack([values[k] for k in ks])

    subset = GroupTensors(
        weights=[tensors.weights[i] for i in chosen],
        stepped=list(range(len(chosen))) if ks else [],
        grads=pick(tensors.grads) or [],
        exp_avgs=pick(tensors.exp_avgs),
        exp_avg_sqs=pick(tensors.exp_avg_sqs),
        snapshots=pick(tensors.snapshots),
        step_sizes=pick_scalars(tensors.step_sizes),
        inv_sqrt_bias2=pick_scalars(tensors.inv_sqrt_bias2),
        plain=tensors.plain,
    )
    return _foreach_sums(subset, context)
