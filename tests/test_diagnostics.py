"""lit_decay.diagnostics: the equilibrium prediction against a simulated random walk, the decay timescale against
the run, and the progress counter; figures computed here from the formulas of the two papers, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lit_decay import StepStatistics
from lit_decay.diagnostics import (
    DecayProgress,
    decay_timescale,
    equilibrium_update_ratio,
    peak_lr,
    removable_fraction,
    timescale_advice,
    timescale_cells,
)


def orthogonal_noise(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random gradient orthogonal to the weights: the gradient of a loss that does not see the weights' scale."""
    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    w = weight.detach()
    return noise - (noise * w).sum() / (w * w).sum() * w


def random_walk(optimizer: torch.optim.Optimizer, weight: torch.nn.Parameter, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        weight.grad = orthogonal_noise(weight, generator)
        optimizer.step()


def logged_equilibrium(optimizer: torch.optim.Optimizer, weight: torch.nn.Parameter, steps: int) -> list[float]:
    """The monitor's ``equilibrium`` figure on ``steps`` further steps of the walk."""
    statistics = StepStatistics([optimizer], metrics=["update_ratio", "equilibrium"])
    generator = torch.Generator().manual_seed(1)
    values = []
    for _ in range(steps):
        weight.grad = orthogonal_noise(weight, generator)
        statistics.before_step(optimizer)
        optimizer.step()
        statistics.after_step(optimizer)
        values.append(statistics.collect()["equilibrium/pg1"])
    return values


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize(("lr", "weight_decay"), [(1e-2, 1.0), (3e-3, 2.0)])
def test_adamw_random_walk_reaches_equilibrium(beta1: float, lr: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay, betas=(beta1, 0.999))
    tau = 1 / (lr * weight_decay)
    random_walk(optimizer, weight, round(8 * tau))
    values = logged_equilibrium(optimizer, weight, 10)
    assert sum(values) / len(values) == pytest.approx(1.0, abs=0.05)
    # the figure is the measured ratio over the paper's prediction, and it is far from 1 before equilibrium
    fresh = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    early = torch.optim.AdamW([fresh], lr=lr, weight_decay=weight_decay, betas=(beta1, 0.999))
    random_walk(early, fresh, 5)
    assert logged_equilibrium(early, fresh, 1)[0] < 0.5


def test_sgd_momentum_random_walk_reaches_equilibrium() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    lr, weight_decay, momentum = 0.05, 0.5, 0.9
    optimizer = torch.optim.SGD([weight], lr=lr, weight_decay=weight_decay, momentum=momentum)
    random_walk(optimizer, weight, round(8 / (lr * weight_decay)))
    values = logged_equilibrium(optimizer, weight, 10)
    assert sum(values) / len(values) == pytest.approx(1.0, abs=0.05)


def test_equilibrium_prediction_formulas() -> None:
    assert equilibrium_update_ratio(1e-3, 0.1, beta1=0.0) == pytest.approx(math.sqrt(2e-4))
    assert equilibrium_update_ratio(1e-3, 0.1, beta1=0.9) == pytest.approx(math.sqrt(2e-4 * 0.1 / 1.9))
    assert equilibrium_update_ratio(0.1, 1e-3, momentum=0.9) == pytest.approx(math.sqrt(2e-4 / 1.9))
    with pytest.raises(ValueError, match="exactly one of beta1"):
        equilibrium_update_ratio(1e-3, 0.1)


def test_timescale_against_the_run() -> None:
    assert decay_timescale(3e-3, 0.05) == pytest.approx(1 / 1.5e-4)
    assert decay_timescale(3e-3, 0.0) == math.inf
    assert removable_fraction(440, 1 / 1.5e-4) == pytest.approx(1 - math.exp(-440 * 1.5e-4))
    assert removable_fraction(440, math.inf) == 0.0
    assert timescale_cells(1e-2, 1.0, 400) == ("100", "0.25")
    assert timescale_cells(1e-2, 1.0, None) == ("100", "–")


def test_timescale_advice_says_how_far_and_the_way_out() -> None:
    advice = timescale_advice(3e-3, 0.05, 440)
    assert advice is not None
    for part in ("6,667 steps", "15× the run of 440 steps", "at most 6% of the weight norm",
                 "WeightDecayScheduler(timescale_fraction=0.1)"):  # fmt: skip
        assert part in advice
    assert timescale_advice(3e-3, 0.05, 10_000) is None  # τ = 6,667 < run
    assert timescale_advice(3e-3, 0.0, 440) is None


def test_peak_lr_never_a_warmups_zero() -> None:
    assert peak_lr({"lr": 1e-3}) == 1e-3
    w = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.AdamW([w], lr=3e-4)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 100)  # linear warmup from 0
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert peak_lr(optimizer.param_groups[0]) == pytest.approx(3e-4)
    one_cycle = torch.optim.AdamW([w], lr=1.0)
    torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=0.1, total_steps=100)
    assert peak_lr(one_cycle.param_groups[0]) == pytest.approx(0.1)


def test_decay_progress_sums_lr_times_wd_and_restores() -> None:
    progress = DecayProgress()
    lrs = [0.1 * 0.9**t for t in range(20)]
    for t, lr in enumerate(lrs):
        progress.add("decay", lr, 0.01 * (t + 1))
    expected = sum(lr * 0.01 * (t + 1) for t, lr in enumerate(lrs))
    assert progress.figures() == {"decay": pytest.approx(expected, rel=1e-12)}
    state = progress.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = DecayProgress.from_state(state)
    resumed.add("decay", 0.5, 0.1)
    assert resumed.figures()["decay"] == pytest.approx(expected + 0.05, rel=1e-12)


def test_decay_progress_with_a_tensor_lr_sums_on_the_device() -> None:
    progress = DecayProgress()
    lr = torch.tensor(0.01)
    for _ in range(5):
        progress.add("decay", lr, 0.1)
        lr.mul_(2.0)  # a scheduler moving the tensor lr in place: each step's value must be counted
    assert progress.figures()["decay"] == pytest.approx(0.001 * (1 + 2 + 4 + 8 + 16), rel=1e-6)
