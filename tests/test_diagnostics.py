"""lit_decay.diagnostics: the equilibrium prediction against a simulated random walk, the decay timescale against
the run, the progress counter, and the decay report's arithmetic; figures computed here from the formulas of the two
papers, in float64."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lit_decay import StepStatistics
from lit_decay.diagnostics import (
    REPORT_FIELDS,
    DecayProgress,
    DecayRecord,
    decay_report,
    decay_timescale,
    equilibrium_update_ratio,
    peak_lr,
    removable_fraction,
    report_markdown,
    report_text,
    timescale_advice,
    timescale_cells,
)
from lit_decay.modes import DECAY_MODES


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


def test_decay_progress_keeps_the_last_steps_rate() -> None:
    progress = DecayProgress()
    progress.add("decay", 0.1, 0.5)
    progress.add("decay", torch.tensor(0.02), 0.5)
    progress.add("head", 0.3, 0.0)
    assert progress.last_rates() == {"decay": pytest.approx(0.01), "head": 0.0}
    assert DecayProgress.from_state(progress.state_dict()).last_rates() == {}  # set again by the next step


# ---- the decay report ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 13, 100])
def test_record_keeps_exactly_the_last_quarter_of_equilibrium_values(count: int) -> None:
    values = [random.Random(count).uniform(0, 2) for _ in range(count)]
    record = DecayRecord()
    for step, value in enumerate(values):
        record.add(step, "decay", {"equilibrium": value}, weight_decay=0.1)
        # never more than the quarter that can still be the last one (⌈n/4⌉ of n, n only grows)
        assert len(record.state_dict()["decay"]["equilibrium"]) == math.ceil((step + 1) / 4)
    assert record.equilibrium_window("decay") == values[len(values) - math.ceil(count / 4) :]


def entry(report: dict, name: str = "decay") -> dict:
    assert set(report[name]) == set(REPORT_FIELDS)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    return report[name]


def test_report_of_a_decoupled_group_that_acted_and_held() -> None:
    record = DecayRecord()
    for step, (norm, eq) in enumerate([(10.0, 0.3), (8.0, 0.7), (6.0, 0.9), (5.5, 1.1), (5.4, 0.95)]):
        record.add(step * 10 + 9, "decay", {"weight_norm": norm, "equilibrium": eq, "decay_progress": 9.0}, 0.5)
    report = decay_report(
        record, {"decay": DECAY_MODES["decoupled"]}, run_steps=50, progress={"decay": 10.0}, last_rates={"decay": 0.2}
    )
    got = entry(report)
    assert got == {
        "mode": "decoupled",
        "run_steps": 50,
        "decay_progress": 10.0,
        "timescale_over_run": pytest.approx(0.1),  # τ = 1/0.2 = 5 steps of 50
        "weight_norm_first": 10.0,
        "weight_norm_last": 5.4,
        "first_step": 9,
        "last_step": 49,
        "equilibrium_last": 0.95,
        "equilibrium_mean_last_quarter": pytest.approx((1.1 + 0.95) / 2),  # ⌈5/4⌉ = 2 values
        "equilibrium_held": True,
        "sparsity_last": None,
        "acted": True,
        "advice": None,
    }


def test_report_says_why_equilibrium_did_not_hold_in_a_mixed_group() -> None:
    record = DecayRecord()
    for step in range(8):
        record.add(step, "decay", {"equilibrium": 0.5}, 0.5)
    modes = {"decay": DECAY_MODES["decoupled"]}
    got = entry(decay_report(record, modes, run_steps=8, progress={"decay": 2.6}, last_rates={"decay": 0.5}))
    assert got["acted"] is True and got["equilibrium_held"] is False and got["timescale_over_run"] == 0.25
    assert got["advice"].startswith("equilibrium averaged 0.50 over the last quarter of the run, not 1:")
    assert "followed by a normalization" in got["advice"] and "override" in got["advice"]
    # τ at the end longer than the last quarter (an lr annealed towards 0): no time to settle, nothing to explain
    slow = entry(decay_report(record, modes, run_steps=8, progress={"decay": 2.6}, last_rates={"decay": 0.1}))
    assert slow["equilibrium_held"] is False and slow["advice"] is None
    unknown = entry(decay_report(record, modes, run_steps=8, progress={"decay": 2.6}))
    assert unknown["timescale_over_run"] is None and unknown["advice"] is None


@pytest.mark.parametrize(("progress", "removed"), [(1 / 12, "8%"), (0.003, "0.3%"), (0.0, None)])
def test_report_advice_when_decoupled_decay_did_not_act(progress: float, removed: str | None) -> None:
    record = DecayRecord()
    record.add(0, "decay", {"weight_norm": 3.0}, 0.01)
    got = entry(decay_report(record, {"decay": DECAY_MODES["decoupled"]}, run_steps=100, progress={"decay": progress}))
    assert got["acted"] is False
    if removed is None:
        assert got["advice"].startswith("decay applied no e-fold (lr·wd was 0 at every step)")
    else:
        times = f"{1 / progress:,.0f}"
        assert got["advice"].startswith(f"τ is {times}× the run: decay removed {removed} of the weight norm;")
    assert got["advice"].endswith("WeightDecayScheduler(timescale_fraction=0.1) would make it act.")


def test_report_of_l2_and_l1_groups_reads_the_last_logged_timescale() -> None:
    record = DecayRecord()
    record.add(4, "decay", {"effective_decay": 0.5, "decay_timescale": 2.0}, 0.1)
    record.add(9, "decay", {"effective_decay": 0.001, "decay_timescale": 1000.0}, 0.1)
    record.add(9, "sparse", {"decay_timescale": 4.0, "sparsity": 0.25, "weight_norm": 1.0}, 0.1)
    modes = {"decay": DECAY_MODES["l2"], "sparse": DECAY_MODES["decoupled_l1"], "no_decay": DECAY_MODES["none"]}
    report = decay_report(record, modes, run_steps=10)
    assert list(report) == ["decay", "sparse"]  # mode none: not decayed, not reported
    l2 = entry(report)
    assert l2["decay_progress"] is None and l2["timescale_over_run"] == pytest.approx(100.0)
    assert l2["acted"] is False and l2["sparsity_last"] is None
    assert l2["advice"].startswith("τ = 1/effective_decay is 100× the run at the last logging step: the l2 penalty")
    assert "about 1,000× its weight_decay would bring τ to a tenth of the run" in l2["advice"]
    sparse = entry(report, "sparse")
    assert sparse["timescale_over_run"] == pytest.approx(0.4) and sparse["acted"] is True
    assert sparse["sparsity_last"] == 0.25 and sparse["advice"] is None


def test_report_leaves_out_what_was_not_logged_and_groups_never_decayed() -> None:
    record = DecayRecord()
    record.add(0, "decay", {"weight_norm": math.nan, "equilibrium": math.inf}, 0.0)
    record.add(0, "frozen_decay", {}, 0.0)  # a decoupled group kept at wd = 0 all run
    modes = {"decay": DECAY_MODES["decoupled"], "frozen_decay": DECAY_MODES["decoupled"]}
    report = decay_report(record, modes, run_steps=5, progress={"decay": 0.01})
    assert list(report) == ["decay"]  # it applied some decay: a scheduler set it after the logging step
    got = entry(report)  # non-finite figures become None: JSON-safe
    assert got["weight_norm_first"] is None and got["equilibrium_last"] is None and got["equilibrium_held"] is None
    assert decay_report(DecayRecord(), {"d": DECAY_MODES["l2"]}, run_steps=5) == {}


def test_report_text_and_markdown_show_the_same_table_and_advice() -> None:
    record = DecayRecord()
    record.add(0, "decay", {"weight_norm": 2.0}, 0.01)
    record.add(99, "decay", {"weight_norm": 2.5}, 0.01)
    report = decay_report(
        record, {"decay": DECAY_MODES["decoupled"]}, run_steps=100, progress={"decay": 0.05}, last_rates={"decay": 5e-4}
    )
    text, markdown = report_text(report), report_markdown(report)
    assert text.splitlines()[0] == (
        "lit_decay: decay report after 100 optimizer steps (e-folds = decay_progress, Σ lr·wd; τ/run at the last step)"
    )
    assert text.splitlines()[2].split() == ["decay", "decoupled", "0.05", "20", "2", "→", "2.5", "–", "–", "no"]
    assert "| decay | decoupled | 0.05 | 20 | 2 → 2.5 | – | – | no |" in markdown
    advice = report["decay"]["advice"]
    assert f"group 'decay': {advice}" in text and f"group `decay`: {advice}" in markdown
    assert report_text({}).startswith("lit_decay: no param group was decayed")
