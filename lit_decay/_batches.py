"""Lists of tensors cut into cache-sized batches for torch's multi-tensor (``torch._foreach_*``) ops.

A foreach op does a whole list of tensors in one call, so the host cost per tensor is what torch's own foreach
optimizers pay (one kernel launch for many tensors on CUDA). Two things keep it fast on large models too:

- its outputs are fresh tensors: over a whole 50M-parameter group that is 200 MB per op, which the CPU allocator
  hands back to the OS and page-faults in again at the next step. Batches of at most ``batch_numel`` elements keep
  every temporary small (in cache on a CPU, a bounded extra on a GPU);
- a large tensor is cut into flat views of that size, so a batch never exceeds it.

Every list of a call is cut the same way, so the i-th piece of the weights and the i-th piece of their gradients
cover the same elements, and ``owner`` says which tensor each piece came from (to add per-piece sums back up).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_decay._tensors import local

#: Elements per batch of small tensors: 1 MiB of float32 per temporary on a CPU (in cache); larger on a GPU, where
#: each batch is a kernel launch and memory is not page-faulted in.
CPU_BATCH_NUMEL = 1 << 18
GPU_BATCH_NUMEL = 1 << 24
#: Elements per piece of a large tensor on a CPU. Larger than a batch: each op on a piece is one parallel region of
#: torch's CPU threads, whose start costs tens of microseconds here, so 2**18-element pieces of a 50M-parameter model
#: made the L1 term 0.81× of an Adam step against 0.65× with 2**20 (whole tensors, with their 16 MB temporaries: 0.85×).
CPU_PIECE_NUMEL = 1 << 20


def batch_numel(device: torch.device) -> int:
    """Elements per batch of small tensors on ``device``."""
    return CPU_BATCH_NUMEL if device.type == "cpu" else GPU_BATCH_NUMEL


def piece_numel(device: torch.device) -> int:
    """Elements per piece of a tensor too large for one batch on ``device``."""
    return CPU_PIECE_NUMEL if device.type == "cpu" else GPU_BATCH_NUMEL


@dataclass
class Batch:
    """Aligned pieces of several tensor lists: ``lists[k][i]`` is piece i of list k; ``owner[i]`` its tensor's index."""

    lists: list[list[torch.Tensor]]
    owner: list[int]


def real(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as real numbers: a complex tensor as (real, imaginary) pairs, as torch's Adam steps it."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def batches(
    lists: Sequence[Sequence[torch.Tensor]], *, limit: int | None = None, piece: int | None = None
) -> Iterator[Batch]:
    """Cut aligned lists of same-shaped tensors into batches of at most ``limit`` elements; a tensor larger than
    that is a batch of its own, cut into flat views of ``piece`` elements (whole if it is not contiguous). Tensors
    are not copied.

    Examples:
        >>> a, b = [torch.zeros(5), torch.zeros(2)], [torch.ones(5), torch.ones(2)]
        >>> [(len(batch.lists[0]), batch.owner) for batch in batches([a, b], limit=4, piece=4)]
        [(1, [0]), (1, [0]), (1, [1])]
    """
    if not lists or not lists[0]:
        return
    first = lists[0]
    limit = limit or batch_numel(first[0].device)
    piece = piece or max(limit, piece_numel(first[0].device))
    sizes = [t.numel() for t in first]
    start, filled = 0, 0
    for index, size in enumerate(sizes):
        if size > limit:
            if start < index:
                yield _slice(lists, start, index)
            yield from _cut(lists, index, piece)
            start, filled = index + 1, 0
        elif filled + size > limit:
            yield _slice(lists, start, index)
            start, filled = index, size
        else:
            filled += size
    if start < len(sizes):
        yield _slice(lists, start, len(sizes))


def _slice(lists: Sequence[Sequence[torch.Tensor]], start: int, stop: int) -> Batch:
    # Whole tensors: a slice of each list, no per-tensor work in Python.
    return Batch([list(lst[start:stop]) for lst in lists], list(range(start, stop)))


def _cut(lists: Sequence[Sequence[torch.Tensor]], index: int, limit: int) -> Iterator[Batch]:
    whole = [lst[index] for lst in lists]
    if not all(t.is_contiguous() for t in whole):
        yield Batch([[t] for t in whole], [index])
        return
    flat = [t.view(-1) for t in whole]
    numel = flat[0].numel()
    for start in range(0, numel, limit):
        size = min(limit, numel - start)
        yield Batch([[t.narrow(0, start, size)] for t in flat], [index])


def local_real(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local shard (``lit_decay._tensors.local``) as real numbers (``real``); plain real tensors, the
    usual case, are taken as they are, with one cheap check each rather than two conversions."""
    if all(type(t) in _PLAIN and not t.is_complex() for t in tensors):
        return list(tensors)
    return [real(local(t)) for t in tensors]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): one foreach call per group, as torch's optimizers do."""
    kinds = {(t.device, t.dtype) for t in tensors}
    if len(kinds) == 1:
        return {kinds.pop(): list(range(len(tensors)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return groups


#: Lengths of the runs of same-shaped tensors that one compiled call takes (``same_shape_runs``). Each length is a
#: graph of its own, compiled once per process (seconds on a CPU), so there are few of them; a model's layers repeat
#: their shapes, so most of its tensors fall into such runs.
RUN_LENGTHS = (16, 4)
#: Below this, a tensor stays with the multi-tensor ops: a compiled call's fixed cost would not pay for itself.
MIN_RUN_NUMEL = 1 << 12


def same_shape_runs(
    tensors: Sequence[torch.Tensor],
    *,
    min_numel: int = MIN_RUN_NUMEL,
    single_numel: int | None = None,
    max_numel: int | None = None,
    lengths: Sequence[int] = RUN_LENGTHS,
) -> tuple[list[list[int]], list[int]]:
    """Indices of ``tensors`` in runs of one shape (and dtype and device) and of a length in ``lengths``, and the
    indices left over (smaller than ``min_numel``, larger than ``max_numel``, not contiguous, or too few of their
    shape). A tensor of at least ``single_numel`` elements that is left over makes a run of its own.

    One compiled call over such a run is one graph whatever the shape's sizes (dynamic shapes: the same size symbols
    for every tensor of the run), and inductor fuses the run's equal loops into one pass, so a CPU starts its threads
    once for the run rather than once per tensor. The tensors are passed as they are: views made for the call would
    cost dynamo far more per tensor than the pass itself.

    Examples:
        >>> shapes = [(8, 8)] * 5 + [(4,)] * 3 + [(8, 8), (2, 32), (100,)]
        >>> same_shape_runs([torch.zeros(s) for s in shapes], min_numel=16, single_numel=100, lengths=(4, 2))
        ([[0, 1, 2, 3], [4, 8], [10]], [5, 6, 7, 9])
    """
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    rest: list[int] = []
    for index, tensor in enumerate(tensors):
        # Sizes 0 and 1 are specialised by dynamic shapes: such tensors would compile graphs of their own.
        numel = tensor.numel()
        if numel < max(min_numel, 2) or (max_numel is not None and numel > max_numel) or not tensor.is_contiguous():
            rest.append(index)
        else:
            by_shape.setdefault((*tensor.shape, tensor.dtype, tensor.device), []).append(index)
    runs: list[list[int]] = []
    for members in by_shape.values():
        start = 0
        for length in sorted(lengths, reverse=True):
            while len(members) - start >= length:
                runs.append(members[start : start + length])
                start += length
        for index in members[start:]:
            if single_numel is not None and tensors[index].numel() >= single_numel:
                runs.append([index])
            else:
                rest.append(index)
    rest.sort()
    return runs, rest


@dataclass(frozen=True)
class Bucket:
    """The tensors of one device and dtype in a list: ``runs`` for compiled calls (``same_shape_runs``), ``rest`` for
    the multi-tensor ops; both index the list."""

    device: torch.device
    dtype: torch.dtype
    runs: list[list[int]]
    rest: list[int]


@dataclass(frozen=True)
class Plan:
    """How an elementwise update goes over a list of tensors (``plan``): ``plain`` when every tensor is a real,
    non-sharded tensor, taken as it is (else through ``local_real``)."""

    plain: bool
    buckets: list[Bucket]


# Plans of the last few lists, keyed by their tensors' ids. Each entry holds weak references to its tensors whose
# callbacks drop it when one of them is freed, so a key only ever matches the very tensors it was made for (an id is
# reused only after its tensor is gone).
_PLANS: OrderedDict[tuple[Any, ...], tuple[list[weakref.ref[torch.Tensor]], Plan]] = OrderedDict()
_PLANS_KEPT = 16


def plan(
    tensors: Sequence[torch.Tensor],
    *,
    min_numel: int | None,
    single_numel: int | None = None,
    max_numel: int | None = None,
    devices: tuple[str, ...] = ("cpu",),
    lengths: tuple[int, ...] = RUN_LENGTHS,
) -> Plan:
    """The ``Plan`` for ``tensors``: by device and dtype, and on ``devices`` (unless ``min_numel`` is None) the runs
    of same-shaped tensors of ``min_numel`` to ``max_numel`` elements, lone tensors of at least ``single_numel``
    included, in runs of the ``lengths`` given (``same_shape_runs``).

    A group's tensors are the same objects at every step, so the plan of plain tensors is kept: a step pays one id per
    tensor to find it, not the checks of shape, dtype, device and layout that made it (host time per tensor is what a
    GPU cannot hide).

    Examples:
        >>> weights = [torch.zeros(64, 64) for _ in range(5)] + [torch.zeros(3)]
        >>> found = plan(weights, min_numel=1 << 12)
        >>> [(bucket.runs, bucket.rest) for bucket in found.buckets]
        [([[0, 1, 2, 3]], [4, 5])]
        >>> plan(weights, min_numel=1 << 12) is found
        True
    """
    key = (min_numel, single_numel, max_numel, devices, lengths, *map(id, tensors))
    kept = _PLANS.get(key)
    if kept is not None:
        _PLANS.move_to_end(key)
        return kept[1]
    made = _make_plan(tensors, min_numel, single_numel, max_numel, devices, lengths)
    if made.plain:  # other tensors are views made for this call: no later call passes the same objects

        def forget(_: weakref.ref[torch.Tensor]) -> None:
            _PLANS.pop(key, None)

        _PLANS[key] = ([weakref.ref(t, forget) for t in tensors], made)
        if len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return made


def _make_plan(
    tensors: Sequence[torch.Tensor],
    min_numel: int | None,
    single_numel: int | None,
    max_numel: int | None,
    devices: tuple[str, ...],
    lengths: tuple[int, ...],
) -> Plan:
    plain = all(type(t) in _PLAIN and not t.is_complex() for t in tensors)
    views = list(tensors) if plain else local_real(tensors)
    buckets = []
    for (device, dtype), indices in by_device_and_dtype(views).items():
        runs: list[list[int]] = []
        rest = indices
        if min_numel is not None and device.type in devices:
            members = [views[i] for i in indices]
            found, left = same_shape_runs(
                members, min_numel=min_numel, single_numel=single_numel, max_numel=max_numel, lengths=lengths
            )
            runs = [[indices[j] for j in run] for run in found]
            rest = [indices[j] for j in left]
        buckets.append(Bucket(device, dtype, runs, rest))
    return Plan(plain, buckets)
