"""lit_decay.stats without Lightning (plus the monitor's sync behaviour): every figure is checked against an
independent float64 computation made here from the weights, the gradients and the optimizer's state."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
import lit_decay.stats
from lit_decay.modes import rule_of
from lit_decay.stats import METRICS, StepStatistics, group_stats
from lit_decay.tags import group_names

SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal"})


# ---- independent reference ---------------------------------------------------------------------------------------


def norm64(tensors: Iterable[torch.Tensor]) -> float:
    parts = [torch.linalg.vector_norm(t.detach().double()) for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(parts))) if parts else 0.0


def adam_denominator(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor:
    """Adam's current denominator D = sqrt(v / (1 - beta2^t)) + eps, from the optimizer's own state."""
    state = optimizer.state[p]
    t = float(state["step"])
    beta2 = group["betas"][1]
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (v.double() / (1 - beta2**t)).sqrt() + group["eps"]


def adam_update(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor:
    """The step Adam just took, lr/(1 − β1^t)·m/D, from the optimizer's own state after the step."""
    state = optimizer.state[p]
    beta1 = group["betas"][0]
    return (
        float(group["lr"])
        / (1 - beta1 ** float(state["step"]))
        * state["exp_avg"].double()
        / adam_denominator(optimizer, group, p)
    )


def before_shrink(
    optimizer: torch.optim.Optimizer, group: Mapping[str, Any], before: Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """A decoupled_l1 group's weights after Adam's arithmetic and before the soft threshold: w_before − update."""
    return {id(p): before[id(p)].double() - adam_update(optimizer, group, p) for p in group["params"]}


def expected_effective_decay(
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, Any],
    mode: str,
    wd: float,
    stepped: set[int] | None = None,
    acted: Mapping[int, torch.Tensor] | None = None,
) -> float:
    """DESIGN.md's effective_decay recomputed; ``stepped`` (ids) limits the penalty term to tensors that stepped,
    ``acted`` gives decoupled_l1's weights the shrink acted on (by id)."""
    lr = float(group["lr"])
    params = group["params"]
    w2 = sum(float((p.detach().double() ** 2).sum()) for p in params)
    if mode == "none" or wd == 0:
        return 0.0
    if mode in ("decoupled", "sgd"):
        return lr * wd
    active = [p for p in params if stepped is None or id(p) in stepped]
    if mode == "l2":
        num = sum(float((p.detach().double() ** 2 / adam_denominator(optimizer, group, p)).sum()) for p in active)
        return lr * wd * num / w2
    if mode == "l1":
        num = sum(float((p.detach().double().abs() / adam_denominator(optimizer, group, p)).sum()) for p in active)
        return lr * wd * num / w2
    if mode == "decoupled_l1":
        assert acted is not None
        weights = [acted[id(p)] for p in params]
        num = sum(float((w.abs() * w.abs().clamp(max=lr * wd)).sum()) for w in weights)
        return num / sum(float(w.square().sum()) for w in weights)
    raise AssertionError(mode)


def expected_group(
    name: str,
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, Any],
    *,
    mode: str,
    wd: float,
    before: Mapping[int, torch.Tensor] | None,
    used_grads: Mapping[int, torch.Tensor],
    stepped: set[int] | None = None,
) -> dict[str, float]:
    """All figures of one group. ``before``: weights before the step (None: no update_ratio expected);
    ``used_grads``: the (unscaled) gradient the optimizer used per parameter id, missing where the grad was None."""
    params = group["params"]
    figures = {
        f"weight_norm/{name}": norm64(params),
        f"grad_norm/{name}": norm64(used_grads[id(p)] for p in params if id(p) in used_grads),
        f"weight_decay/{name}": float(group["weight_decay"]),
    }
    if before is not None:
        delta = norm64(p.detach().double() - before[id(p)].double() for p in params)
        figures[f"update_ratio/{name}"] = delta / norm64(before[id(p)] for p in params)
        lr = float(group["lr"])
        # rotational equilibrium (Kosson, Messmer & Jaggi, 2024): AdamW's and plain-momentum SGD's predictions
        if mode == "decoupled" and isinstance(optimizer, torch.optim.Adam) and wd > 0:
            beta1 = group["betas"][0]
            predicted = math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))
            figures[f"equilibrium/{name}"] = figures[f"update_ratio/{name}"] / predicted
        if mode == "sgd" and wd > 0 and not group["nesterov"] and not group["dampening"]:
            predicted = math.sqrt(2 * lr * wd / (1 + group["momentum"]))
            figures[f"equilibrium/{name}"] = figures[f"update_ratio/{name}"] / predicted
    acted = before_shrink(optimizer, group, before) if mode == "decoupled_l1" and before is not None else None
    effective = expected_effective_decay(optimizer, group, mode, wd, stepped, acted)
    figures[f"effective_decay/{name}"] = effective
    if effective != 0:
        figures[f"decay_timescale/{name}"] = 1 / effective
    if mode in ("l1", "decoupled_l1"):
        zeros = sum(int((p == 0).sum()) for p in params)
        figures[f"sparsity/{name}"] = zeros / sum(p.numel() for p in params)
    return figures


def assert_figures(actual: Mapping[str, float], expected: Mapping[str, float], rel: float = 1e-4) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=1e-9), key


# ---- small models and steps --------------------------------------------------------------------------------------


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 4)).to(dtype)


def backward(model: nn.Module, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> None:
    x = torch.randn(16, 6, dtype=dtype)
    y = torch.randn(16, 4, dtype=dtype)
    loss = scale * nn.functional.mse_loss(model(x), y)
    loss.backward()


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2, scale: float = 1.0) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        backward(model, scale)
        optimizer.step()


def measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    statistics: StepStatistics | None,
    *,
    extra_grad: Callable[[Mapping[str, Any], torch.Tensor], torch.Tensor | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One step with the statistics hooked around it; returns the weights before it and the gradients it used."""
    optimizer.zero_grad()
    backward(model, dtype=dtype)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    used = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.detach().double().clone()
            if extra_grad is not None:
                term = extra_grad(group, p)
                if term is not None:
                    g = g + term
            used[id(p)] = g
    if statistics is not None:
        statistics.before_step(optimizer)
    optimizer.step()
    if statistics is not None:
        statistics.after_step(optimizer)
    return before, used


def l1_term(group: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """What lit_decay.Adam adds to an l1 group's gradient: wd * sign(w) (of the weights before the step)."""
    if group.get("decay_mode") == "l1":
        return group["weight_decay"] * torch.sign(p.detach().double())
    return None


# ---- every mode on configure_adam --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decoupled", "l2", "l1", "decoupled_l1", "none"])
def test_every_mode_matches_independent_computation(mode: str) -> None:
    model = make_model()
    # decoupled_l1's threshold lr*wd = 0.025 is large enough against the init to leave exact zeros
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.5, mode=mode)
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics, extra_grad=l1_term)
    # group_stats is called after the same step: no snapshot, so update_ratio only where Adam's state has it
    without_snapshot = group_stats(optimizer)
    figures = statistics.collect()

    decay, no_decay = optimizer.param_groups
    expected = expected_group("decay", optimizer, decay, mode=mode, wd=0.5, before=before, used_grads=used)
    expected |= expected_group("no_decay", optimizer, no_decay, mode="none", wd=0.0, before=before, used_grads=used)
    assert_figures(figures, expected)
    if mode == "decoupled":
        assert figures["effective_decay/decay"] == pytest.approx(0.05 * 0.5, rel=1e-12)
    if mode == "decoupled_l1":
        assert figures["sparsity/decay"] > 0
    if mode == "none":
        assert "decay_timescale/decay" not in figures
    assert "decay_timescale/no_decay" not in figures
    assert "sparsity/no_decay" not in figures

    expected_without = dict(expected)
    if mode == "decoupled_l1":
        # after the step, the proximal step has left no trace: what needs it is absent, never another number
        for metric in ("update_ratio", "effective_decay", "decay_timescale"):
            expected_without.pop(f"{metric}/decay")
    assert_figures(without_snapshot, expected_without)
    # a second collect without a new step has nothing left
    assert statistics.collect() == {}


def test_amsgrad_uses_max_exp_avg_sq() -> None:
    model = make_model()
    # large gradients first, then small ones; with a short beta2 memory the running max of v stays well above v
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.3, mode="l2", amsgrad=True, betas=(0.9, 0.5))
    warm_up(model, optimizer, steps=1, scale=1000.0)
    warm_up(model, optimizer, steps=2, scale=1.0)
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    decay = optimizer.param_groups[0]
    p = decay["params"][0]
    state = optimizer.state[p]
    assert not torch.allclose(state["max_exp_avg_sq"], state["exp_avg_sq"], rtol=0.5)
    expected = expected_group("decay", optimizer, decay, mode="l2", wd=0.3, before=before, used_grads=used)
    expected |= expected_group(
        "no_decay", optimizer, optimizer.param_groups[1], mode="none", wd=0.0, before=before, used_grads=used
    )
    assert_figures(figures, expected)


# ---- optimizers the user built -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "mode"),
    [
        (lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.2), "decoupled"),
        (lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.2, decoupled_weight_decay=True), "decoupled"),
        (lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.2), "l2"),
        (lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.2, amsgrad=True), "l2"),
        (lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.0), "none"),
    ],
    ids=["AdamW", "Adam-decoupled_weight_decay", "Adam-weight_decay", "Adam-amsgrad", "Adam-no-decay"],
)
def test_user_built_adam_modes_read_from_torch_keys(build: Callable[..., torch.optim.Optimizer], mode: str) -> None:
    model = make_model()
    optimizer = build(model.parameters())
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    group = optimizer.param_groups[0]
    expected = expected_group(
        "pg1", optimizer, group, mode=mode, wd=group["weight_decay"], before=before, used_grads=used
    )
    assert_figures(figures, expected)
    assert_figures(group_stats(optimizer), expected)
    # torch's keys alone decide the mode (wd=0 on Adam is still read as l2, with a zero strength)
    assert rule_of(optimizer, group).mode.name == {"none": "l2"}.get(mode, mode)


def test_sgd_with_weight_decay() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01, momentum=0.9)
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    group = optimizer.param_groups[0]
    expected = expected_group("pg1", optimizer, group, mode="sgd", wd=0.01, before=before, used_grads=used)
    assert_figures(figures, expected)
    assert figures["effective_decay/pg1"] == pytest.approx(0.1 * 0.01, rel=1e-12)
    assert figures["update_ratio/pg1"] > 0
    # without a snapshot there is no update to read from SGD's state
    plain = group_stats(optimizer)
    expected.pop("update_ratio/pg1")
    expected.pop("equilibrium/pg1")
    assert_figures(plain, expected)


# ---- names, per-parameter keys, metric subsets -------------------------------------------------------------------


def test_unnamed_groups_are_pg1_pg2() -> None:
    model = make_model()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], lr=0.01, weight_decay=0.0
    )
    warm_up(model, optimizer, steps=1)
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    g1, g2 = optimizer.param_groups
    expected = expected_group("pg1", optimizer, g1, mode="l2", wd=0.1, before=before, used_grads=used)
    expected |= expected_group("pg2", optimizer, g2, mode="none", wd=0.0, before=before, used_grads=used)
    assert_figures(figures, expected)


def test_duplicate_names_across_optimizers_get_suffixes() -> None:
    encoder, head = make_model(), make_model()
    opt_a = lit_decay.configure_adam(encoder, lr=0.01, weight_decay=0.1, mode="decoupled")
    opt_b = lit_decay.configure_adam(head, lr=0.02, weight_decay=0.3, mode="l2")
    assert group_names([opt_a, opt_b]) == [["decay", "no_decay"], ["decay-1", "no_decay-1"]]
    statistics = StepStatistics([opt_a, opt_b])
    before_a, used_a = measured_step(encoder, opt_a, statistics)
    before_b, used_b = measured_step(head, opt_b, statistics)
    figures = statistics.collect()
    (da, na), (db, nb) = opt_a.param_groups, opt_b.param_groups
    expected = expected_group("decay", opt_a, da, mode="decoupled", wd=0.1, before=before_a, used_grads=used_a)
    expected |= expected_group("no_decay", opt_a, na, mode="none", wd=0.0, before=before_a, used_grads=used_a)
    expected |= expected_group("decay-1", opt_b, db, mode="l2", wd=0.3, before=before_b, used_grads=used_b)
    expected |= expected_group("no_decay-1", opt_b, nb, mode="none", wd=0.0, before=before_b, used_grads=used_b)
    assert_figures(figures, expected)
    with pytest.raises(ValueError, match="not given"):
        StepStatistics([opt_a]).after_step(opt_b)


def test_suffixed_names_never_collide_with_given_ones() -> None:
    def named(*names: str) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": n} for n in names], lr=0.1)

    # "decay-1" is a name of its own: the second optimizer's "decay" must not take it
    assert group_names([named("decay", "decay-1"), named("decay")]) == [["decay", "decay-1"], ["decay-2"]]
    # ... even when the given "decay-1" comes after the duplicate
    assert group_names([named("decay", "decay"), named("decay-1")]) == [["decay", "decay-2"], ["decay-1"]]
    names = group_names([named("a", "a", "a-1", "a-2"), named("a", "pg1"), torch.optim.SGD([torch.zeros(1)], lr=1)])
    flat = [n for current in names for n in current]
    assert len(flat) == len(set(flat))


def test_per_parameter_keys_and_values() -> None:
    model = make_model()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.1, mode="l2")
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer], per_parameter=True)
    before, used = measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    names = dict(model.named_parameters())
    expected_names = {"decay": ["0.weight", "2.weight"], "no_decay": ["0.bias", "1.weight", "1.bias", "2.bias"]}
    per_param = {k for k in figures if k.count("/") == 2}
    assert per_param == {
        f"{metric}/{group}/{name}"
        for group, params in expected_names.items()
        for name in params
        for metric in ("weight_norm", "grad_norm", "update_ratio")
    }
    for group, params in expected_names.items():
        for name in params:
            p = names[name]
            w = norm64([p])
            assert figures[f"weight_norm/{group}/{name}"] == pytest.approx(w, rel=1e-5)
            assert figures[f"grad_norm/{group}/{name}"] == pytest.approx(norm64([used[id(p)]]), rel=1e-5)
            delta = norm64([p.detach().double() - before[id(p)].double()])
            assert figures[f"update_ratio/{group}/{name}"] == pytest.approx(delta / norm64([before[id(p)]]), rel=1e-4)


def test_per_parameter_names_without_param_names_come_from_mapping() -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    statistics = StepStatistics([optimizer], metrics=["weight_norm"], per_parameter=True, parameter_names=names)
    measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    assert set(figures) == {"weight_norm/pg1"} | {f"weight_norm/pg1/{n}" for n, _ in model.named_parameters()}
    assert figures["weight_norm/pg1/2.weight"] == pytest.approx(norm64([model[2].weight]), rel=1e-5)


def test_metrics_subset_and_unknown_metric() -> None:
    model = make_model()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.5, mode="decoupled_l1")
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer], metrics=["sparsity", "weight_norm"])
    measured_step(model, optimizer, statistics)
    figures = statistics.collect()
    assert set(figures) == {"weight_norm/decay", "weight_norm/no_decay", "sparsity/decay"}
    # each metric alone, whatever it needs (equilibrium and the timescale exist for decoupled groups only)
    decoupled_model = make_model()
    decoupled = lit_decay.configure_adam(decoupled_model, lr=0.05, weight_decay=0.5, mode="decoupled", verbose=False)
    for metric in METRICS:
        if metric == "decay_progress":  # counted by the monitor across steps, not by a step's statistics
            continue
        for net, opt in ((model, optimizer), (decoupled_model, decoupled)):
            alone = StepStatistics([opt], metrics=[metric])
            measured_step(net, opt, alone)
            logged = {key.split("/")[0] for key in alone.collect()}
            assert logged == {metric} or (metric, opt) in {("equilibrium", optimizer), ("sparsity", decoupled)}
    # after the step, decoupled_l1's shrink has left no trace of the weights it acted on: no figure, not another one
    assert set(group_stats(optimizer, metrics=["effective_decay"])) == {"effective_decay/no_decay"}

    with pytest.raises(ValueError, match="'nope'") as error:
        group_stats(optimizer, metrics=["weight_norm", "nope"])
    for metric in METRICS:
        assert metric in str(error.value)
    with pytest.raises(ValueError, match="'bogus'"):
        StepStatistics([optimizer], metrics=["bogus"])


# ---- precision, missing gradients, grad scaler --------------------------------------------------------------------


def test_bf16_parameters_update_from_snapshot() -> None:
    model = make_model(torch.bfloat16)
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.2, mode="decoupled")
    for _ in range(2):
        optimizer.zero_grad()
        backward(model, dtype=torch.bfloat16)
        optimizer.step()
    statistics = StepStatistics([optimizer])
    before, used = measured_step(model, optimizer, statistics, dtype=torch.bfloat16)
    figures = statistics.collect()
    decay, no_decay = optimizer.param_groups
    expected = expected_group("decay", optimizer, decay, mode="decoupled", wd=0.2, before=before, used_grads=used)
    expected |= expected_group("no_decay", optimizer, no_decay, mode="none", wd=0.0, before=before, used_grads=used)
    assert_figures(figures, expected)
    assert figures["update_ratio/decay"] > 0


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.never = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        return self.a(x) + (self.b(x) if use_b else 0)


def _grads_none_step(steps_with_b: int) -> tuple[TwoHeads, torch.optim.Optimizer, dict[str, float], dict[str, float]]:
    model = TwoHeads()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.3, mode="l2")
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x, use_b=step < steps_with_b), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x, use_b=False), y).backward()
    assert model.b.weight.grad is None and model.never.weight.grad is None
    before = {id(p): p.detach().clone() for p in model.parameters()}
    used = {id(p): p.grad.double() for p in model.parameters() if p.grad is not None}
    statistics = StepStatistics([optimizer])
    statistics.before_step(optimizer)
    optimizer.step()
    statistics.after_step(optimizer)
    figures = statistics.collect()
    # torch's step leaves tensors without a gradient untouched
    assert torch.equal(model.b.weight, before[id(model.b.weight)])
    decay, no_decay = optimizer.param_groups
    expected = expected_group(
        "decay", optimizer, decay, mode="l2", wd=0.3, before=before, used_grads=used, stepped=set(used)
    )
    expected |= expected_group("no_decay", optimizer, no_decay, mode="none", wd=0.0, before=before, used_grads=used)
    # weight_norm covers every tensor of the group, stepped or not
    assert expected["weight_norm/decay"] == pytest.approx(
        norm64([model.a.weight, model.b.weight, model.never.weight]), rel=1e-12
    )
    return model, optimizer, figures, expected


def test_step_with_some_grads_none() -> None:
    # neither b nor `never` ever had a gradient: no Adam state, no update, no penalty
    model, optimizer, figures, expected = _grads_none_step(steps_with_b=0)
    assert model.b.weight not in optimizer.state
    assert_figures(figures, expected)


def test_tensor_with_adam_state_but_no_grad_adds_no_penalty() -> None:
    # b stepped before (it has exp_avg_sq) but has no gradient now: torch skips it, so its share of the penalty
    # term -<dw_reg, w> is zero this step; its weights still count in ||w||^2
    model, optimizer, figures, expected = _grads_none_step(steps_with_b=2)
    assert "exp_avg_sq" in optimizer.state[model.b.weight]
    assert_figures(figures, expected)


def _scaled_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, poison: bool):
    optimizer.zero_grad()
    torch.manual_seed(123)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = math.inf


@pytest.mark.parametrize("mode", ["decoupled", "l1", "decoupled_l1"])
def test_grad_scaler_unscaled_grad_norm_and_skipped_step(mode: str) -> None:
    model = make_model()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.2, mode=mode)
    assert optimizer.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer])

    # the reference gradient, without any scaling
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(123)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    nn.functional.mse_loss(reference(x), y).backward()
    unscaled = {id(p): q.grad.double() for p, q in zip(model.parameters(), reference.parameters())}
    for group in optimizer.param_groups:
        for p in group["params"]:
            term = l1_term(group, p)
            if term is not None:
                unscaled[id(p)] = unscaled[id(p)] + term

    _scaled_step(model, optimizer, scaler, poison=False)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    # GradScaler.step runs the fused step with optimizer.grad_scale/found_inf set; the hooks must run inside it
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: statistics.before_step(opt))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: statistics.after_step(opt))
    scaler.step(optimizer)
    scaler.update()
    figures = statistics.collect()
    decay, no_decay = optimizer.param_groups
    expected = expected_group("decay", optimizer, decay, mode=mode, wd=0.2, before=before, used_grads=unscaled)
    expected |= expected_group("no_decay", optimizer, no_decay, mode="none", wd=0.0, before=before, used_grads=unscaled)
    assert_figures(figures, expected)

    # a step the scaler skips changes nothing, and the update (derived from Adam's state, or from the snapshot for
    # decoupled_l1) is zero
    _scaled_step(model, optimizer, scaler, poison=True)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    scaler.step(optimizer)
    figures = statistics.collect()
    for p in model.parameters():
        assert torch.equal(p, before[id(p)])
    assert figures["update_ratio/decay"] == 0.0
    assert figures["update_ratio/no_decay"] == 0.0
    assert figures["weight_norm/decay"] == pytest.approx(norm64(decay["params"]), rel=1e-6)
    assert math.isinf(figures["grad_norm/decay"])


@pytest.mark.parametrize("mode", ["l2", "decoupled", "l1", "decoupled_l1"])
def test_scaler_skipping_the_first_step_gives_finite_figures(mode: str) -> None:
    """fp16 training's usual first step: the scaler's initial scale overflows, the step is skipped and Adam's step
    count rolled back to 0. Nothing was updated: update_ratio and effective_decay are 0, every figure but the
    (infinite) gradient norm is finite, and ``skipped`` names the groups; the next step is measured normally."""
    model = make_model()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.2, mode=mode)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    statistics = StepStatistics([optimizer])
    statistics.attach()
    statistics.arm()
    _scaled_step(model, optimizer, scaler, poison=True)
    scaler.step(optimizer)
    scaler.update()
    figures = statistics.collect()
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())
    assert statistics.skipped == {"decay", "no_decay"}
    for key, value in figures.items():
        assert math.isfinite(value) or key.startswith("grad_norm/"), (key, value)
    assert figures["update_ratio/decay"] == 0.0 and figures["effective_decay/decay"] == 0.0
    assert "decay_timescale/decay" not in figures

    statistics.arm()
    _scaled_step(model, optimizer, scaler, poison=False)
    scaler.step(optimizer)
    figures = statistics.collect()
    statistics.detach()
    assert statistics.skipped == frozenset()
    assert all(math.isfinite(v) for v in figures.values()), figures
    assert figures["update_ratio/decay"] > 0 and figures["effective_decay/decay"] > 0


def _proximal_step(weights: list[float], lr: float, coefficient: float) -> tuple[dict[str, float], torch.Tensor]:
    """One decoupled_l1 step of a hand-built Adam with zero gradients (so Adam itself moves nothing), measured the
    way the monitor measures it: hooked, just before the proximal step."""
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    group = {"params": [w], "decay_mode": "decoupled_l1", "weight_decay": coefficient, "name": "gate"}
    optimizer = lit_decay.Adam([group], lr=lr)
    statistics = StepStatistics([optimizer])
    statistics.attach()
    statistics.arm()
    w.grad = torch.zeros_like(w)
    optimizer.step()
    statistics.detach()
    return statistics.collect(), w.detach()


def test_decoupled_l1_effective_decay_is_measured_on_the_weights_it_acts_on() -> None:
    """d = −⟨Δw_reg, w⟩/‖w‖² with w the weights before the shrink. One weight of 0.15 and lr·wd = 0.1: the
    shrink removes 0.1 of 0.15, d = 0.015/0.0225 = 2/3 (read on the weights after the shrink it would be 1)."""
    figures, after = _proximal_step([0.15], lr=0.1, coefficient=1.0)
    assert after.tolist() == pytest.approx([0.05])
    assert figures["effective_decay/gate"] == pytest.approx(2 / 3, rel=1e-12)
    figures, _ = _proximal_step([0.15, -2.0], lr=0.1, coefficient=1.0)
    assert figures["effective_decay/gate"] == pytest.approx((0.15 * 0.1 + 2.0 * 0.1) / (0.15**2 + 2.0**2), rel=1e-12)
    # many weights near the threshold: the three readings (before, after, after with the old formula) differ a lot
    weights = [0.09, 0.11, -0.12, 0.2, -0.05]
    figures, _ = _proximal_step(weights, lr=0.1, coefficient=1.0)
    before = torch.tensor(weights, dtype=torch.float64)
    expected = float((before.abs() * before.abs().clamp(max=0.1)).sum() / before.square().sum())
    assert figures["effective_decay/gate"] == pytest.approx(expected, rel=1e-12)


def test_every_path_gives_the_definitions_value_or_none() -> None:
    """The monitor's hooks, StepStatistics by hand and group_stats agree, or a path that cannot know says nothing:
    after the step, decoupled_l1's shrink has left no trace of the weights it acted on."""
    hooked, _ = _proximal_step([0.15], lr=0.1, coefficient=1.0)
    w = torch.tensor([0.15], dtype=torch.float64, requires_grad=True)
    optimizer = lit_decay.Adam(
        [{"params": [w], "decay_mode": "decoupled_l1", "weight_decay": 1.0, "name": "gate"}], lr=0.1
    )
    statistics = StepStatistics([optimizer])
    w.grad = torch.zeros_like(w)
    statistics.before_step(optimizer)
    optimizer.step()
    statistics.after_step(optimizer)
    by_hand = statistics.collect()
    after = group_stats(optimizer)
    for figures in (hooked, by_hand):
        assert figures["effective_decay/gate"] == pytest.approx(2 / 3, rel=1e-12)
        assert figures["update_ratio/gate"] == pytest.approx(0.1 / 0.15, rel=1e-12)
    assert "effective_decay/gate" not in after and "update_ratio/gate" not in after
    assert after["weight_norm/gate"] == pytest.approx(0.05) and after["sparsity/gate"] == 0.0


@pytest.mark.parametrize(("start", "end"), [(0.15, 0.05), (0.1001, 0.0001), (0.100001, 1e-6), (0.1, 0.0), (-0.3, -0.2)])
def test_update_ratio_is_continuous_as_a_proximal_step_drives_a_weight_to_zero(start: float, end: float) -> None:
    """‖Δw‖/‖w‖ with w the weights before the step: 0.15 → 0.05 gives 2/3, 0.1001 → 0.0001 gives 0.999, and the
    ratio never exceeds 1 as the weight reaches zero (against the weights after the step it would jump to 1000)."""
    figures, after = _proximal_step([start], lr=0.1, coefficient=1.0)  # a threshold of 0.1
    assert after.tolist() == pytest.approx([end], abs=1e-12)
    assert figures["update_ratio/gate"] == pytest.approx(abs(start - end) / abs(start), rel=1e-9)
    assert figures["update_ratio/gate"] <= 1.0 + 1e-12


def test_proximal_step_zeroing_a_whole_group_keeps_every_figure_finite() -> None:
    """The purpose of L1 on a gate: the proximal step zeroes it. The update ratio is then measured against the
    weights the step acted on (‖Δw‖/0 would be a false non-finite alarm)."""
    figures, after = _proximal_step([0.03, -0.04], lr=0.1, coefficient=1.0)
    assert torch.equal(after, torch.zeros(2, dtype=torch.float64))
    assert all(math.isfinite(v) for v in figures.values()), figures
    assert figures["weight_norm/gate"] == 0.0 and figures["sparsity/gate"] == 1.0
    assert figures["update_ratio/gate"] == pytest.approx(1.0, rel=1e-12)  # ‖Δw‖ = ‖w before‖
    assert figures["effective_decay/gate"] == pytest.approx(1.0, rel=1e-12)  # the whole norm removed


def test_complex_parameters_are_measured_as_real_pairs() -> None:
    """A complex tensor's norm is √Σ|z|² (real and imaginary parts), and its update is read from Adam's state,
    which torch's Adam keeps as real pairs."""
    torch.manual_seed(3)
    z = torch.randn(5, 3, dtype=torch.complex128, requires_grad=True)
    optimizer = torch.optim.AdamW([z], lr=0.05, weight_decay=0.1)
    for _ in range(2):
        z.grad = torch.randn_like(z)
        before = z.detach().clone()
        optimizer.step()
    figures = group_stats(optimizer)
    assert figures["weight_norm/pg1"] == pytest.approx(float(torch.linalg.vector_norm(z.detach())), rel=1e-12)
    assert figures["grad_norm/pg1"] == pytest.approx(float(torch.linalg.vector_norm(z.grad)), rel=1e-12)
    expected_ratio = float(torch.linalg.vector_norm(z.detach() - before) / torch.linalg.vector_norm(before))
    assert figures["update_ratio/pg1"] == pytest.approx(expected_ratio, rel=1e-9)


# ---- the compiled form of the statistics (on a CPU) ---------------------------------------------------------------


def _figures_with(setting: str, monkeypatch: pytest.MonkeyPatch, mode: str, dtype: torch.dtype) -> dict[str, float]:
    monkeypatch.setenv("LIT_DECAY_COMPILE", setting)
    torch.manual_seed(7)
    model = make_model(dtype)
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.3, mode=mode, amsgrad=mode == "l2")
    statistics = StepStatistics([optimizer], per_parameter=True)
    for _ in range(3):
        optimizer.zero_grad()
        backward(model, dtype=dtype)
        optimizer.step()
    statistics.attach()
    optimizer.zero_grad()
    backward(model, dtype=dtype)
    statistics.arm()
    optimizer.step()
    figures = statistics.collect()
    statistics.detach()
    assert not statistics._kernel.failed, "compiling the statistics fell back to eager"
    assert (statistics._kernel.compiled is not None) is (setting != "0")
    return figures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["decoupled", "l2", "l1", "decoupled_l1"])
def test_compiled_statistics_equal_eager(mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled form (LIT_DECAY_COMPILE=1: every tensor; by default a CPU compiles tensors of 2**16 elements and
    more) gives the figures of the eager one (=0, what other devices run), which the tests above check against the
    float64 reference."""
    eager = _figures_with("0", monkeypatch, mode, dtype)
    compiled = _figures_with("1", monkeypatch, mode, dtype)
    assert set(compiled) == set(eager) and len(eager) > 20
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-5 if dtype == torch.float32 else 1e-12, abs=1e-9), key


def test_changing_set_of_stepped_tensors_compiles_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """A branch used only on some steps changes which tensors have a gradient from step to step, and tensors have
    every rank and size: the one compiled pass takes each tensor flat (no view) with dynamic sizes, and modes without
    a penalty or after transform (decoupled, none) share its graph, so after the first steps nothing compiles again:
    two graphs in all (stepped tensors, and sizes 1 that dynamic shapes specialise)."""
    import torch._dynamo.utils

    monkeypatch.setenv("LIT_DECAY_COMPILE", "1")
    torch.manual_seed(5)
    trunk = nn.ParameterList(
        [nn.Parameter(torch.randn(*shape) * 0.05) for shape in [(64, 64), (8, 3, 3, 3), (70,)] * 4]
    )
    branch = nn.ParameterList([nn.Parameter(torch.randn(256, 512) * 0.05), nn.Parameter(torch.randn(64, 64) * 0.05)])
    model = nn.ModuleDict({"trunk": trunk, "branch": branch})
    optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.1, mode="decoupled", verbose=False)
    statistics = StepStatistics([optimizer])
    statistics.attach()
    graphs, start = [], torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        used = list(trunk) + (list(branch) if step % 3 == 0 else [])
        for index, p in enumerate(used):
            if index % 5 != step % 5:  # and a different few trunk tensors sit out each step
                p.grad = torch.randn_like(p)
        statistics.arm()
        optimizer.step()
        figures = statistics.collect()
        assert all(math.isfinite(v) for v in figures.values())
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    statistics.detach()
    assert graphs[3:] == [graphs[3]] * 5, graphs  # steps 0-2 saw every case; later steps compiled nothing
    assert graphs[-1] - start <= 2, graphs
    assert not statistics._kernel.failed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hooked_decoupled_l1_reads_the_update_without_a_snapshot(dtype: torch.dtype) -> None:
    """A lit_decay.Adam is measured between torch's arithmetic and the soft threshold, so the update of a
    decoupled_l1 group is rebuilt from Adam's state (exact, without copying the weights), hooked or by hand."""
    torch.manual_seed(2)
    model = make_model(dtype)
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.3, mode="decoupled_l1", verbose=False)
    statistics = StepStatistics([optimizer])
    decay = optimizer.param_groups[0]
    for hooked in (True, False, True, False):
        optimizer.zero_grad()
        backward(model, dtype=dtype)
        before = [p.detach().double().clone() for p in decay["params"]]
        if hooked:
            statistics.attach()
            statistics.arm()
            optimizer.step()
            statistics.detach()
        else:
            statistics.before_step(optimizer)
            assert not statistics._snapshots
            optimizer.step()
            statistics.after_step(optimizer)
        figures = statistics.collect()
        after = [p.detach().double() for p in decay["params"]]
        delta = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, before)))
        assert figures["update_ratio/decay"] == pytest.approx(
            delta / norm64(before), rel=1e-5 if dtype == torch.float32 else 1e-10
        )
        assert figures["weight_norm/decay"] == pytest.approx(norm64(after), rel=1e-6)
        zeros = sum(int((a == 0).sum()) for a in after) / sum(a.numel() for a in after)
        assert figures["sparsity/decay"] == zeros
    assert zeros > 0  # the proximal step did make zeros, so the check above is not vacuous
    assert not optimizer._update_observers  # the by-hand observer went with its step


# ---- no host sync, no work on non-logging steps ------------------------------------------------------------------


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["decoupled", "l2", "l1", "decoupled_l1"])
def test_after_step_and_collect_never_sync(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.5, mode=mode, amsgrad=mode == "l2")
    warm_up(model, optimizer)
    transfers = []
    real_to_host = lit_decay.stats.to_host
    monkeypatch.setattr(lit_decay.stats, "to_host", lambda table: transfers.append(1) or real_to_host(table))
    statistics = StepStatistics([optimizer], per_parameter=True)
    optimizer.zero_grad()
    backward(model)
    with OpRecorder() as recorder:
        statistics.before_step(optimizer)
    optimizer.step()
    with OpRecorder() as after:
        statistics.after_step(optimizer)
        figures = statistics.collect()
    assert figures
    assert after.ops, "the recorder saw no tensor work at all"
    assert not SYNC_OPS & set(recorder.ops + after.ops)
    assert transfers == [1]


def test_tensor_lr_causes_no_extra_sync() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), weight_decay=0.1, fused=True)
    warm_up(model, optimizer)
    statistics = StepStatistics([optimizer])
    optimizer.zero_grad()
    backward(model)
    optimizer.step()
    with OpRecorder() as recorder:
        statistics.after_step(optimizer)
    assert not SYNC_OPS & set(recorder.ops), "after_step reads a tensor lr on the host before the logging transfer"


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, lr=0.05, weight_decay=0.3, mode="decoupled_l1")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(40, 6, generator=g), torch.randn(40, 4, generator=g))
        return DataLoader(data, batch_size=4)


class _Counts(L.Callback):
    """Reads the counters after the monitor's on_train_batch_end, keyed by global step."""

    def __init__(self, counters: dict[str, list[int]]) -> None:
        self.counters = counters
        self.by_step: dict[int, dict[str, int]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.by_step[trainer.global_step] = {k: len(v) for k, v in self.counters.items()}


def test_one_transfer_per_logging_step_in_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    counters: dict[str, list[int]] = {"to_host": [], "before_step": [], "after_step": []}
    real_to_host = lit_decay.stats.to_host
    real_before, real_after = StepStatistics.before_step, StepStatistics.after_step

    def counting_to_host(table: torch.Tensor) -> list[list[float]]:
        counters["to_host"].append(1)
        return real_to_host(table)

    def counting_before(self: StepStatistics, optimizer: torch.optim.Optimizer) -> None:
        counters["before_step"].append(1)
        real_before(self, optimizer)

    def counting_after(self: StepStatistics, optimizer: torch.optim.Optimizer) -> None:
        counters["after_step"].append(1)
        real_after(self, optimizer)

    monkeypatch.setattr(lit_decay.stats, "to_host", counting_to_host)
    monkeypatch.setattr(StepStatistics, "before_step", counting_before)
    monkeypatch.setattr(StepStatistics, "after_step", counting_after)
    counts = _Counts(counters)
    trainer = L.Trainer(
        max_steps=9,
        logger=CSVLogger(tmp_path),
        callbacks=[lit_decay.WeightDecayMonitor(log_every_n_steps=3), counts],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor())
    seen = {step: c["to_host"] for step, c in counts.by_step.items()}
    assert seen == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2, 9: 3}
    # the statistics are not even touched on a step that does not log
    assert {step: c["after_step"] for step, c in counts.by_step.items()} == seen
    assert {step: c["before_step"] for step, c in counts.by_step.items()} == seen


def test_monitor_hooks_dispatch_nothing_when_not_logging() -> None:
    def twin() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        model = make_model()
        optimizer = lit_decay.configure_adam(model, lr=0.05, weight_decay=0.3, mode="decoupled_l1")
        return model, optimizer

    model, optimizer = twin()
    plain_model, plain_optimizer = twin()
    monitor = lit_decay.WeightDecayMonitor(log_every_n_steps=2, audit=False)
    trainer = SimpleNamespace(optimizers=[optimizer], loggers=[], is_global_zero=False)
    monitor.on_fit_start(trainer, model)  # type: ignore[arg-type]
    assert monitor._statistics is not None and not monitor._statistics.armed

    statistics = monitor._statistics
    with OpRecorder() as direct:
        statistics._pre_hook(optimizer, (optimizer,), {})
        statistics._post_hook(optimizer, (optimizer,), {})
        statistics._observe(optimizer, optimizer.param_groups[0])
    assert direct.ops == []

    def step_ops(m: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
        torch.manual_seed(5)
        opt.zero_grad()
        backward(m)
        with OpRecorder() as recorder:
            opt.step()
        return recorder.ops

    assert step_ops(model, optimizer) == step_ops(plain_model, plain_optimizer)
    # armed, the same hooks do real work: the comparison above can fail
    statistics.arm()
    assert len(step_ops(model, optimizer)) > len(step_ops(plain_model, plain_optimizer))
    assert monitor._statistics.collect()
    monitor.teardown(trainer, model, "fit")  # type: ignore[arg-type]
