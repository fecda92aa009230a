"""Single-pass kernels through ``torch.compile``, with the eager form everywhere else.

An elementwise formula written with torch ops reads and writes a temporary per op; compiled, it is one pass over
memory. One compiled call also does a whole run of same-shaped tensors (``lit_decay._batches.same_shape_runs``):
inductor fuses their equal loops, so a CPU starts its threads once per run, and dynamo's cost per call (tens of
microseconds) is paid once per run. Tensors are passed as they are: dynamo handles a view input at several times
the cost of a plain tensor. Small tensors (which take torch's multi-tensor ops instead) and anything compile cannot
handle take the eager form.

``LIT_DECAY_COMPILE=0`` turns compilation off; ``LIT_DECAY_COMPILE=always`` compiles whatever the size (tests use
it to check the compiled form against the eager one).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

#: Tensors with at least this many elements go through the compiled kernel (below it, a compiled call's fixed cost,
#: tens of microseconds, outweighs the pass it saves).
MIN_COMPILED_NUMEL = 1 << 17

# Each kernel is specialised on which optional inputs are None, on dtypes and on the mode: more variants than
# dynamo's default of 8 per function, after which fullgraph=True would fail. The limit is raised once, at the first
# compile (never lowered: a user's higher setting stays), rather than entered around every call, which would cost
# host time per tensor.
_RECOMPILE_LIMIT = 64

# Inductor's checks of each input's size, stride and alignment in the generated code repeat what dynamo's guards
# have just checked, at a few hundred nanoseconds per tensor of every call (an L1 step over 200 tensors: 41,000 size
# checks in 200 steps); fbcode builds of torch leave the alignment check off by default.
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"size_asserts": False, "alignment_asserts": False}

_failed: set[str] = set()


def _setting() -> str:
    return os.environ.get("LIT_DECAY_COMPILE", "auto").strip().lower()


def compiled_numel() -> int | None:
    """The size from which tensors go through a compiled kernel now: None when compiling is off (or when already
    inside a compiled region), 0 with ``LIT_DECAY_COMPILE=always``. Read once per group, not per tensor."""
    setting = _setting()
    if setting in ("0", "off", "false", "no") or torch.compiler.is_compiling():
        return None
    return 0 if setting == "always" else MIN_COMPILED_NUMEL


#: Devices ``torch.compile`` makes kernels for here (C++ on a CPU, Triton on a GPU).
COMPILED_DEVICES = ("cpu", "cuda", "xpu")


def wants_compiled(tensor: torch.Tensor, threshold: int | None = -1) -> bool:
    """Whether ``tensor`` should go through a compiled kernel: large, contiguous, on a device compile supports.
    ``threshold`` is ``compiled_numel()`` when the caller has read it already."""
    if threshold == -1:
        threshold = compiled_numel()
    if threshold is None or tensor.numel() < threshold:
        return False
    return tensor.device.type in COMPILED_DEVICES and tensor.is_contiguous()


def compiled_or_eager(eager: F) -> F:
    """Wrap ``eager(first_tensor, ...)``: big tensors call its compiled form, the rest call it as it is.

    If compiling fails (no C++ compiler, an unsupported platform), a warning says so once and the eager form is used
    from then on. The first compiled call of a process pays compile time (seconds); later calls do not.
    """
    compiled = compiled_form(eager)

    @functools.wraps(eager)
    def run(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not wants_compiled(first):
            return eager(first, *args, **kwargs)
        return compiled(first, *args, **kwargs)

    return run  # type: ignore[return-value]


def compiled_form(eager: F) -> F:
    """``eager`` through ``torch.compile`` (dynamic shapes, one graph), made at the first call; the caller decides
    when it is worth calling (``compiled_numel``). If compiling fails, a warning says so once and ``eager`` runs from
    then on: compiling fails while tracing or generating code, before any kernel ran, so an in-place ``eager`` is not
    applied twice."""
    name = eager.__name__
    compiled: list[Callable[..., Any]] = []  # made on first use: importing dynamo costs seconds

    @functools.wraps(eager)
    def run(*args: Any, **kwargs: Any) -> Any:
        if name in _failed:
            return eager(*args, **kwargs)
        try:
            if not compiled:
                config = torch._dynamo.config
                config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
                compiled.append(torch.compile(eager, dynamic=True, fullgraph=True, options=_OPTIONS))
            return compiled[0](*args, **kwargs)
        except Exception as error:
            _failed.add(name)
            warnings.warn(
                f"lit_decay could not compile {name} ({type(error).__name__}: {error}); using the eager form, "
                "which gives the same numbers with more memory traffic. Set LIT_DECAY_COMPILE=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return eager(*args, **kwargs)

    return run  # type: ignore[return-value]
