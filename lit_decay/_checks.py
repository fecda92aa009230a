"""Argument checks shared by the public entry points: each error names the bad value and the valid ones."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lit_decay.modes import MODES, DecayMode


def check_mode(mode: Any, *, what: str = "mode") -> str:
    """Return ``mode`` if it is one of ``lit_decay.modes.MODES``, else raise ``ValueError`` naming it."""
    if not isinstance(mode, str) or mode not in MODES:
        valid = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"{what}={mode!r} is not a decay mode; valid modes are {valid}")
    return mode


def _is_boolean(value: Any) -> bool:
    # numpy's bool_ is no Python bool, and no number either; it is the only other boolean commonly passed.
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a real number (Python's, numpy's scalars, any ``numbers.Real``), booleans excluded.

    Examples:
        >>> import numpy as np
        >>> [is_real_number(v) for v in (0.1, 3, np.float32(0.9), np.int64(2), True, "0.1")]
        [True, True, True, True, False, False]
    """
    return isinstance(value, numbers.Real) and not _is_boolean(value)


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise naming it."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a finite number >= 0; got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_betas(betas: Any) -> tuple[float, float]:
    """Return ``betas`` as two floats in [0, 1), else raise naming the bad pair."""
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1); got {betas!r}")
    for i, beta in enumerate(betas):
        if not is_real_number(beta) or not (0.0 <= beta < 1.0):
            raise ValueError(f"betas[{i}]={beta!r} is outside [0, 1); betas must be a pair with each in [0, 1)")
    return float(betas[0]), float(betas[1])


def check_fused(fused: Any) -> bool | None:
    """Return ``fused`` if it is None (fused where possible), True (require it) or False, else raise naming it.

    Examples:
        >>> check_fused(None) is None
        True
    """
    if fused is not None and not _is_boolean(fused):
        raise ValueError(f"fused={fused!r} is not valid; use None (fused where possible), True (require it) or False")
    return None if fused is None else bool(fused)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` as a bool if it is one (Python's or numpy's), else raise ``TypeError`` naming it.

    ``bool()`` would turn any non-empty string into True, ``"no"`` and ``"false"`` included.

    Examples:
        >>> check_bool("amsgrad", False)
        False
        >>> check_bool("amsgrad", "no")
        Traceback (most recent call last):
        ...
        TypeError: amsgrad must be True or False; got 'no' of type str
    """
    if not _is_boolean(value):
        raise TypeError(f"{name} must be True or False; got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_group(group: Mapping[str, Any], defaults: Mapping[str, Any], mode: DecayMode) -> None:
    """Raise naming the bad value if a group's name, lr, weight_decay or eps is invalid, or if a decoupled group's
    lr·wd ≥ 1 (each step would flip the sign of its weights).

    Examples:
        >>> from lit_decay.modes import DECAY_MODES
        >>> check_group({"name": "head", "lr": 0.5, "weight_decay": 4.0}, {}, DECAY_MODES["decoupled"])
        Traceback (most recent call last):
        ...
        ValueError: group 'head': lr·weight_decay = 0.5 × 4 = 2 ≥ 1 in decoupled mode multiplies the weights by ...
    """
    name = group.get("name")
    if name is not None and (not isinstance(name, str) or "/" in name or not name):
        raise ValueError(f"group name {name!r} is not valid: a non-empty string without '/' (it is a tag segment)")
    label = f"group {name!r}" if name is not None else "param group"
    values = {key: group.get(key, defaults.get(key)) for key in ("lr", "weight_decay", "eps")}
    for key, value in values.items():
        if value is None or isinstance(value, torch.Tensor):  # a tensor lr (capturable) is torch's to check
            continue
        if not is_real_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{label}: {key} must be a finite number >= 0; got {value!r}")
    lr, wd = values["lr"], values["weight_decay"]
    if mode.torch_term == "decoupled" and is_real_number(lr) and is_real_number(wd) and lr * wd >= 1:
        raise ValueError(
            f"{label}: lr·weight_decay = {lr:g} × {wd:g} = {lr * wd:g} ≥ 1 in {mode.name} mode multiplies the weights "
            f"by 1 − lr·wd = {1 - lr * wd:g} each step (their sign flips); lower lr or weight_decay so that lr·wd < 1"
        )
