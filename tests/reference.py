"""A float64 reference for Adam with the five decay modes, written from the update rules (not from lit_decay).

It keeps its own copy of every parameter and Adam's moments, so a test can run a model through lit_decay's optimizer
and this reference side by side and compare weights and state. The Adam arithmetic follows torch's ``F.adam``:

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  v_max ← max(v_max, v) (amsgrad)
    denom = √(v or v_max) / √(1−β2ᵗ) + eps;  p ← p − lr/(1−β1ᵗ) · m/denom

and the modes wrap it as the table of modes in docs/modes.md says:

    l2:            g ← g + wd·p, then Adam
    decoupled:     p ← p·(1 − lr·wd), then Adam with the raw g
    l1:            g ← g + wd·sign(p), then Adam
    decoupled_l1:  Adam, then p ← sign(p)·max(|p| − lr·wd, 0)
    none:          Adam
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

MODES = ("l2", "decoupled", "l1", "decoupled_l1", "none")


@dataclass
class ReferenceGroup:
    """Settings shared by some parameters: names, learning rate, decay coefficient and mode."""

    names: list[str]
    lr: float
    weight_decay: float = 0.0
    mode: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")


@dataclass
class ReferenceState:
    """Adam's per-parameter state in float64."""

    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    max_exp_avg_sq: torch.Tensor | None = None


@dataclass
class ReferenceAdam:
    """Float64 Adam over named parameters with per-group lr, weight decay and decay mode.

    ``params`` maps names to the initial values (copied to float64); ``step(grads)`` applies one step with the given
    gradients (a missing or None gradient leaves that parameter and its state untouched, as torch's Adam does).
    """

    params: dict[str, torch.Tensor]
    groups: list[ReferenceGroup]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    state: dict[str, ReferenceState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = {name: p.detach().to(torch.float64).clone() for name, p in self.params.items()}
        listed = [name for g in self.groups for name in g.names]
        if sorted(listed) != sorted(self.params) or len(set(listed)) != len(listed):
            raise ValueError(f"groups {listed} must list every parameter {sorted(self.params)} exactly once")

    @classmethod
    def from_named(
        cls,
        named: Iterable[tuple[str, torch.Tensor]],
        settings: Mapping[str, tuple[float, float, str]],
        **adam: object,
    ) -> ReferenceAdam:
        """Build from ``(name, tensor)`` pairs and ``{name: (lr, weight_decay, mode)}``: names sharing settings share
        a group."""
        params = {name: tensor for name, tensor in named}
        by_setting: dict[tuple[float, float, str], list[str]] = {}
        for name in params:
            by_setting.setdefault(tuple(settings[name]), []).append(name)  # type: ignore[arg-type]
        groups = [ReferenceGroup(names, lr, wd, mode) for (lr, wd, mode), names in by_setting.items()]
        return cls(params, groups, **adam)  # type: ignore[arg-type]

    def group_of(self, name: str) -> ReferenceGroup:
        for group in self.groups:
            if name in group.names:
                return group
        raise KeyError(name)

    def step(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        beta1, beta2 = self.betas
        for group in self.groups:
            lr, wd, mode = group.lr, group.weight_decay, group.mode
            for name in group.names:
                raw = grads.get(name)
                if raw is None:
                    continue
                p = self.params[name]
                g = raw.detach().to(torch.float64).clone()
                state = self.state.setdefault(name, ReferenceState())
                if state.exp_avg is None:
                    state.exp_avg = torch.zeros_like(p)
                    state.exp_avg_sq = torch.zeros_like(p)
                    state.max_exp_avg_sq = torch.zeros_like(p)
                assert state.exp_avg_sq is not None and state.max_exp_avg_sq is not None

                if mode == "l2" and wd != 0:
                    g = g + wd * p
                elif mode == "l1" and wd != 0:
                    g = g + wd * torch.sign(p)
                elif mode == "decoupled" and wd != 0:
                    p = p * (1.0 - lr * wd)

                state.step += 1
                t = state.step
                state.exp_avg = beta1 * state.exp_avg + (1.0 - beta1) * g
                state.exp_avg_sq = beta2 * state.exp_avg_sq + (1.0 - beta2) * g * g
                if self.amsgrad:
                    state.max_exp_avg_sq = torch.maximum(state.max_exp_avg_sq, state.exp_avg_sq)
                    second = state.max_exp_avg_sq
                else:
                    second = state.exp_avg_sq
                denom = second.sqrt() / math.sqrt(1.0 - beta2**t) + self.eps
                p = p - (lr / (1.0 - beta1**t)) * state.exp_avg / denom

                if mode == "decoupled_l1" and wd != 0:
                    p = torch.sign(p) * torch.clamp(p.abs() - lr * wd, min=0.0)
                self.params[name] = p


def clip_grad_norm(grads: Mapping[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Clip gradients by their global 2-norm, as ``torch.nn.utils.clip_grad_norm_`` does (coefficient
    ``max_norm / (norm + 1e-6)`` capped at 1). Returns the clipped gradients and the norm before clipping."""
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    coefficient = min(1.0, max_norm / (total + 1e-6))
    return {name: g.double() * coefficient for name, g in grads.items()}, total


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and every Adam state tensor, copied: what a step the grad scaler skipped must leave unchanged."""
    taken = {}
    for name, p in model.named_parameters():
        taken[name] = p.detach().clone()
        for key, value in optimizer.state[p].items():
            taken[f"{name}/{key}"] = value.clone()
    return taken


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Two ``snapshot``s are equal bit for bit, Adam's step counts included: a skipped step changed nothing."""
    assert before.keys() == after.keys() and any(key.endswith("/step") for key in after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
