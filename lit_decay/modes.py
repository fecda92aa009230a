"""The five decay modes and how each maps onto torch's own Adam group keys.

Only ``l2`` and ``decoupled`` are something torch's kernel applies by itself; the L1 modes are added around the
kernel by ``lit_decay.penalties``, and ``none`` applies nothing. Every group carries the strength the user asked for in
``"decay_coefficient"`` whatever the mode, so the monitor and schedulers never have to guess.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Literal

Mode = Literal["l2", "decoupled", "l1", "decoupled_l1", "none"]
MODES: tuple[Mode, ...] = ("l2", "decoupled", "l1", "decoupled_l1", "none")

# Modes whose penalty torch's Adam kernel applies from the group's "weight_decay" key.
TORCH_APPLIED: frozenset[str] = frozenset({"l2", "decoupled"})
L1_MODES: frozenset[str] = frozenset({"l1", "decoupled_l1"})


def torch_decay_keys(mode: str, coefficient: float) -> dict[str, Any]:
    """Torch's own group keys for ``mode`` at strength ``coefficient``.

    Examples:
        >>> torch_decay_keys("decoupled", 0.1)
        {'weight_decay': 0.1, 'decoupled_weight_decay': True}
        >>> torch_decay_keys("l1", 0.1)
        {'weight_decay': 0.0, 'decoupled_weight_decay': False}
    """
    return {
        "weight_decay": float(coefficient) if mode in TORCH_APPLIED else 0.0,
        "decoupled_weight_decay": mode == "decoupled",
    }


def set_decay_coefficient(group: MutableMapping[str, Any], coefficient: float) -> None:
    """Change a lit_decay group's decay strength in place, keeping torch's keys consistent with its mode.

    This is what a weight-decay schedule writes each step: the fused kernel reads ``"weight_decay"``, the L1 hooks
    and the monitor read ``"decay_coefficient"``.

    Examples:
        >>> group = {"decay_mode": "l2", "decay_coefficient": 0.1, "weight_decay": 0.1}
        >>> set_decay_coefficient(group, 0.05)
        >>> group["weight_decay"], group["decay_coefficient"]
        (0.05, 0.05)
    """
    group["decay_coefficient"] = float(coefficient)
    group.update(torch_decay_keys(group.get("decay_mode", "none"), coefficient))
