"""lit_decay.modes: each mode's transforms by hand, how any optimizer's groups are read, and the recipe for adding a
mode followed to the letter: a mode defined in this file alone, stepped against a float64 reference written here from
its update rule, and measured by the statistics and the monitor with no edit anywhere else."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay.modes import DECAY_MODES, MODES, SGD, UNKNOWN, DecayMode, add_sign, rule_of, soft_threshold
from tests.test_monitor import csv_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_five_modes_of_the_contract() -> None:
    assert MODES == ("l2", "decoupled", "l1", "decoupled_l1", "none")
    assert [m for m in MODES if DECAY_MODES[m].needs_lit_decay] == ["l1", "decoupled_l1"]
    assert [m for m in MODES if DECAY_MODES[m].timescale] == ["decoupled"]
    assert [m for m in MODES if DECAY_MODES[m].sparsity] == ["l1", "decoupled_l1"]
    assert {m: DECAY_MODES[m].torch_term for m in MODES} == {
        "l2": "l2",
        "decoupled": "decoupled",
        "l1": "none",
        "decoupled_l1": "none",
        "none": "none",
    }
    assert not DECAY_MODES["none"].decays and all(DECAY_MODES[m].decays for m in MODES if m != "none")


# --------------------------------------------------------------------------------------------------------------------
# The L1 transforms, by hand, in both forms (multi-tensor ops on CUDA/XPU, a per-tensor loop elsewhere)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "0-d tensor"])
def test_add_sign_by_hand(dtype: torch.dtype, as_tensor: bool, foreach: bool) -> None:
    p1 = torch.tensor([2.0, -1.0, 0.0, -0.0, 3e-30, -5.0], dtype=dtype)
    g1 = torch.tensor([0.5, 0.5, 0.5, -0.25, 0.0, 1.0], dtype=dtype)
    p2 = torch.tensor([[-3.0, 0.0], [4.0, -1e-3]], dtype=dtype)
    g2 = torch.zeros(2, 2, dtype=dtype)
    strength = torch.tensor(0.25, dtype=dtype) if as_tensor else 0.25
    before = (p1.clone(), p2.clone())
    add_sign([p1, p2], [g1, g2], strength, foreach)
    # sign(0) = 0: zero weights (of either sign) get no term; tiny weights get the full term.
    assert torch.equal(g1, torch.tensor([0.75, 0.25, 0.5, -0.25, 0.25, 0.75], dtype=dtype)) and g1.dtype == dtype
    assert torch.equal(g2, torch.tensor([[-0.25, 0.0], [0.25, -0.25]], dtype=dtype))
    assert torch.equal(p1, before[0]) and torch.equal(p2, before[1])  # the weights are read, never written


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "0-d tensor"])
def test_add_sign_on_large_tensors_in_pieces_and_non_contiguous(as_tensor: bool) -> None:
    """On a CPU the term is added 2**20 elements at a time: every piece, the last short one included, and a
    non-contiguous tensor (taken whole) get exactly what one pass over the whole tensor gives."""
    generator = torch.Generator().manual_seed(0)
    p = torch.randn((1 << 20) + 77, generator=generator)
    p[::1000] = 0.0
    t = torch.randn(1100, 1000, generator=generator).t()  # large and non-contiguous
    grads = [torch.randn(p.shape, generator=generator), torch.randn(t.shape, generator=generator)]
    expected = [g + 0.25 * torch.sign(w) for g, w in zip(grads, (p, t))]
    add_sign([p, t], grads, torch.tensor(0.25) if as_tensor else 0.25, foreach=False)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_add_sign_with_a_scale_tensor(foreach: bool) -> None:
    # The GradScaler form: a 0-d scale times the strength, applied to already scaled gradients.
    p = torch.tensor([1.0, -2.0, 0.0])
    g = torch.tensor([1024.0, 2048.0, -512.0])
    add_sign([p], [g], torch.tensor(1024.0) * 0.5, foreach)
    assert torch.equal(g, torch.tensor([1536.0, 1536.0, -512.0]))


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "0-d tensor"])
def test_soft_threshold_by_hand(dtype: torch.dtype, as_tensor: bool, foreach: bool) -> None:
    p = torch.tensor([0.5, -0.05, 0.02, -2.0, 0.0, 0.125, -0.125, 0.1250001, 3.0], dtype=dtype)
    threshold = torch.tensor(0.125, dtype=dtype) if as_tensor else 0.125
    soft_threshold([p], threshold, foreach)
    expected = torch.tensor([0.375, 0.0, 0.0, -1.875, 0.0, 0.0, 0.0, 0.0000001, 2.875], dtype=dtype)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
    # |p| <= threshold gives exact zeros, everything else keeps its sign.
    assert torch.equal(p == 0, expected == 0) and torch.equal(torch.sign(p), torch.sign(expected))
    assert p.dtype == dtype


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_soft_threshold_zero_threshold_and_non_contiguous(foreach: bool) -> None:
    p = torch.randn(4, 6)
    before = p.clone()
    soft_threshold([p], 0.0, foreach)
    soft_threshold([p], torch.tensor(0.0), foreach)
    assert torch.equal(p, before)
    view = p.t()  # a transposed (non-contiguous) view is shrunk in place, in its own layout
    soft_threshold([view], torch.tensor(0.5), foreach)
    expected = torch.sign(before) * torch.clamp(before.abs() - 0.5, min=0.0)
    torch.testing.assert_close(p, expected)
    assert torch.equal(p == 0, expected == 0)
    q = torch.randn(4, 6)
    q_before = q.clone()
    soft_threshold([q.t()], 0.5, foreach)
    torch.testing.assert_close(q, torch.sign(q_before) * torch.clamp(q_before.abs() - 0.5, min=0.0))


def test_both_forms_and_both_thresholds_agree() -> None:
    a = torch.randn(1000, dtype=torch.float64)
    copies = [a.clone() for _ in range(4)]
    exact = torch.tensor(0.3, dtype=torch.float64)
    for x, (threshold, foreach) in zip(copies, [(0.3, False), (0.3, True), (exact, False), (exact, True)]):
        soft_threshold([x], threshold, foreach)
    assert all(torch.equal(copies[0], x) for x in copies) and int((copies[0] == 0).sum()) > 100


# --------------------------------------------------------------------------------------------------------------------
# How any optimizer's groups are read
# --------------------------------------------------------------------------------------------------------------------


def test_rule_of_torch_optimizers_and_equilibrium_factors() -> None:
    w = torch.zeros(2, requires_grad=True)
    adamw = torch.optim.AdamW([w], betas=(0.8, 0.99), weight_decay=0.1)
    rule = rule_of(adamw, adamw.param_groups[0])
    assert rule.mode is DECAY_MODES["decoupled"] and rule.strength == 0.1 and rule.active and not rule.lit_decay
    assert rule.mode.equilibrium(adamw.param_groups[0]) == pytest.approx(2 * 0.2 / 1.8)
    assert all(DECAY_MODES[m].equilibrium is None for m in MODES if m != "decoupled")
    assert rule_of(torch.optim.Adam([w]), {"weight_decay": 0.0}).active is False
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.5, weight_decay=0.1)
    assert rule_of(sgd, sgd.param_groups[0]).mode is SGD
    assert SGD.equilibrium(sgd.param_groups[0]) == pytest.approx(2 / 1.5)
    for options in ({"nesterov": True}, {"dampening": 0.1}):
        other = torch.optim.SGD([w], lr=0.1, momentum=0.5, **options)
        assert SGD.equilibrium(other.param_groups[0]) is None
    rms = torch.optim.RMSprop([w], weight_decay=0.1)
    assert rule_of(rms, rms.param_groups[0]).mode is UNKNOWN
    assert UNKNOWN.effective_decay(1.0, 1.0, 0.1) is None  # no number rather than a wrong one


# --------------------------------------------------------------------------------------------------------------------
# The recipe of docs/modes.md ("Adding a mode"), followed with modes that exist only in this file
# --------------------------------------------------------------------------------------------------------------------


def elastic_term(params: list[torch.Tensor], grads: list[torch.Tensor], strength: Any, foreach: bool) -> None:
    """Elastic net through Adam's moments: g ← g + wd·(p + sign(p))."""
    for param, grad in zip(params, grads):
        grad.add_((param + torch.sign(param)) * strength)


def shrink_after(params: list[torch.Tensor], decay: Any, foreach: bool) -> None:
    """AdamW's shrink applied after the Adam step instead of before it: p ← p·(1 − lr·wd)."""
    for param in params:
        param.mul_(1 - decay)


ELASTIC = DecayMode(
    "elastic",
    before=elastic_term,
    penalty=lambda w, denominator, decay: (w * w + w.abs()) / denominator,
    effective_decay=lambda penalty_sum, w2, decay: 0.0 if w2 == 0 else decay * penalty_sum / w2,
)
SHRINK_AFTER = DecayMode(
    "shrink_after",
    after=shrink_after,
    penalty=lambda w, denominator, decay: decay * w * w,
    effective_decay=lambda penalty_sum, w2, decay: 0.0 if w2 == 0 else penalty_sum / w2,
)


class RecipeAdam(lit_decay.Adam):
    modes: ClassVar[Mapping[str, DecayMode]] = {
        **lit_decay.Adam.modes,
        "elastic": ELASTIC,
        "shrink_after": SHRINK_AFTER,
    }


def reference_step(weights: dict[str, torch.Tensor], state: dict[str, Any], grads: dict[str, torch.Tensor], *,
                   mode: str, lr: float, wd: float, t: int, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> None:  # fmt: skip
    """One float64 Adam step of each weight, with the two recipe modes written from their update rules."""
    for name, w in weights.items():
        g = grads[name].double()
        if mode == "elastic":
            g = g + wd * (w + torch.sign(w))
        m, v = state.setdefault(name, (torch.zeros_like(w), torch.zeros_like(w)))
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        state[name] = (m, v)
        w = w - lr / (1 - betas[0] ** t) * m / (v.sqrt() / math.sqrt(1 - betas[1] ** t) + eps)
        if mode == "shrink_after":
            w = w * (1 - lr * wd)
        weights[name] = w


@pytest.mark.parametrize("mode", ["elastic", "shrink_after"])
def test_a_mode_defined_here_steps_and_is_measured(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    lr, wd = 0.02, 0.3
    groups = lit_decay.param_groups(model, weight_decay=0.0)  # grouping knows nothing of the mode...
    groups[0].update(decay_mode=mode, weight_decay=wd)  # ...a group names it
    optimizer = RecipeAdam(groups, lr=lr)
    decayed = dict(groups[0]["params"])
    weights = {name: p.detach().clone() for name, p in decayed.items()}
    state: dict[str, Any] = {}
    statistics = lit_decay.StepStatistics([optimizer])
    for t in range(1, 6):
        optimizer.zero_grad()
        F.mse_loss(model(torch.randn(8, 5, dtype=torch.float64)), torch.randn(8, 3, dtype=torch.float64)).backward()
        grads = {name: p.grad.clone() for name, p in decayed.items()}
        before = {name: p.detach().clone() for name, p in decayed.items()}
        statistics.before_step(optimizer)
        optimizer.step()
        statistics.after_step(optimizer)
        figures = statistics.collect()
        reference_step(weights, state, grads, mode=mode, lr=lr, wd=wd, t=t)
        for name, p in decayed.items():
            torch.testing.assert_close(p.detach(), weights[name], rtol=1e-10, atol=1e-12)
        # The figures, from the definition: d = −⟨Δw_reg, w⟩/‖w‖² with the weights the term acted on.
        w = {name: p.detach() for name, p in decayed.items()}
        w2 = sum(float((x * x).sum()) for x in w.values())
        if mode == "elastic":
            denominators = {name: state[name][1].sqrt() / math.sqrt(1 - 0.999**t) + 1e-8 for name in w}
            numerator = sum(float(((x * x + x.abs()) / denominators[n]).sum()) for n, x in w.items())
            assert figures["effective_decay/decay"] == pytest.approx(lr * wd * numerator / w2, rel=1e-9)
        else:
            assert figures["effective_decay/decay"] == pytest.approx(lr * wd, rel=1e-9)
        change = math.sqrt(sum(float(((w[n] - before[n]) ** 2).sum()) for n in w))
        start = math.sqrt(sum(float((before[n] ** 2).sum()) for n in w))
        assert figures["update_ratio/decay"] == pytest.approx(change / start, rel=1e-9)
        assert figures["weight_decay/decay"] == wd
    assert lit_decay.group_stats(optimizer)["weight_norm/decay"] == pytest.approx(math.sqrt(w2), rel=1e-12)


class RecipeNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = lit_decay.param_groups(self, weight_decay=0.0)
        groups[0].update(decay_mode="shrink_after", weight_decay=0.5)
        return RecipeAdam(groups, lr=0.01)


def test_a_mode_defined_here_is_logged_and_scheduled_by_the_callbacks(tmp_path) -> None:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = L.Trainer(
        max_steps=6,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        callbacks=[lit_decay.WeightDecayMonitor(), lit_decay.WeightDecayScheduler("linear", end_factor=0.0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(RecipeNet(), DataLoader(data, batch_size=4))
    columns = csv_metrics(trainer.logger.log_dir)
    strengths, effective = columns["decay/weight_decay/decay"], columns["decay/effective_decay/decay"]
    assert sorted(strengths) == [1, 3, 5]
    for step, wd in strengths.items():
        assert wd == pytest.approx(0.5 * (1 - step / 5))  # the linear schedule, 0-based step of the 6-step run
        assert effective[step] == pytest.approx(0.01 * wd)
    assert copy.deepcopy(trainer.optimizers[0]).modes["shrink_after"] is SHRINK_AFTER
