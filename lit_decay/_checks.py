"""Argument checks shared by the public entry points: each error names the bad value and the valid ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lit_decay.modes import MODES, Mode


def check_mode(mode: Any, *, what: str = "mode") -> Mode:
    """Return ``mode`` if it is one of ``lit_decay.modes.MODES``, else raise ``ValueError`` naming it."""
    if not isinstance(mode, str) or mode not in MODES:
        valid = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"{what}={mode!r} is not a decay mode; valid modes are {valid}")
    return mode


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number >= 0, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number >= 0; got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_betas(betas: Any) -> tuple[float, float]:
    """Return ``betas`` as two floats in [0, 1), else raise naming the bad pair."""
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1); got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
            raise ValueError(f"betas[{i}]={beta!r} is outside [0, 1); betas must be a pair with each in [0, 1)")
    return float(betas[0]), float(betas[1])
