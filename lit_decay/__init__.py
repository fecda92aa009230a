"""lit_decay: Adam parameter groups, decay modes and a weight-decay monitor for PyTorch Lightning.

The Lightning callbacks are imported on first use, so ``import lit_decay`` (and ``lit-decay inspect``) costs only
torch's import.

Examples:
    >>> import torch
    >>> import lit_decay
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> [g["name"] for g in lit_decay.param_groups(model, weight_decay=0.1)]
    ['decay', 'no_decay']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lit_decay.configure import configure_adam
from lit_decay.grouping import GroupingReport, explain, param_groups
from lit_decay.modes import MODES, DecayMode
from lit_decay.optim import Adam
from lit_decay.stats import METRICS, StepStatistics, group_stats

if TYPE_CHECKING:
    from lit_decay.finetuning import DecayBackboneFinetuning, add_param_groups
    from lit_decay.monitor import WeightDecayMonitor
    from lit_decay.schedule import WeightDecayScheduler

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "MODES",
    "Adam",
    "DecayBackboneFinetuning",
    "DecayMode",
    "GroupingReport",
    "StepStatistics",
    "WeightDecayMonitor",
    "WeightDecayScheduler",
    "add_param_groups",
    "configure_adam",
    "explain",
    "group_stats",
    "param_groups",
]

_LIGHTNING_NAMES = {
    "WeightDecayMonitor": "lit_decay.monitor",
    "WeightDecayScheduler": "lit_decay.schedule",
    "DecayBackboneFinetuning": "lit_decay.finetuning",
    "add_param_groups": "lit_decay.finetuning",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        return getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
    raise AttributeError(f"module 'lit_decay' has no attribute {name!r}")
