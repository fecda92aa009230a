"""WeightDecayScheduler: hand-computed schedules through real fits, resume mid-schedule, and bad input."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay.modes import rule_of
from lit_decay.schedule import ScheduleSettings, batches_in_run, schedule_factor, timescale_coefficient

BATCHES_PER_EPOCH = 8


class Recorder(L.Callback):
    """Records, at every batch end, each group's strength: its "weight_decay", whatever its mode (recorded twice, as a
    pair, so that the tests read as before the key became the one home of a group's strength)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, tuple[float, float]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        groups = trainer.optimizers[0].param_groups
        self.seen.append(
            {g.get("name", f"pg{i + 1}"): (float(g["weight_decay"]), g["weight_decay"]) for i, g in enumerate(groups)}
        )


class Net(L.LightningModule):
    def __init__(self, mode: str = "decoupled", weight_decay: float = 0.04, lr: float = 0.01, scheduler: Any = None):
        super().__init__()
        self.mode, self.weight_decay, self.lr, self.lr_scheduler = mode, weight_decay, lr, scheduler
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(
            self, lr=self.lr, weight_decay=self.weight_decay, mode=self.mode, scheduler=self.lr_scheduler
        )


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(4 * BATCHES_PER_EPOCH, 4, generator=generator), torch.arange(32) % 2)
    return DataLoader(data, batch_size=4, shuffle=False)


def fit(
    tmp_path: Path, scheduler: lit_decay.WeightDecayScheduler, model: Net | None = None, **trainer: Any
) -> Recorder:
    recorder = Recorder()
    options = {"max_epochs": 2, "log_every_n_steps": 1, **trainer}
    L.Trainer(
        callbacks=[scheduler, recorder],
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **options,
    ).fit(model or Net(), loader())
    return recorder


def test_factor_shapes_by_hand() -> None:
    total = 11
    cosine = [schedule_factor("cosine", s, total, start_factor=2.0, end_factor=0.5) for s in range(total)]
    assert cosine[0] == pytest.approx(2.0) and cosine[-1] == pytest.approx(0.5)
    assert cosine[5] == pytest.approx((2.0 + 0.5) / 2)
    linear = [schedule_factor("linear", s, total, start_factor=1.0, end_factor=3.0) for s in range(total)]
    assert linear == pytest.approx([1.0 + 0.2 * s for s in range(total)])
    warm = [schedule_factor("constant", s, total, start_factor=1.0, warmup_steps=4) for s in range(6)]
    assert warm == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    # Past the end the factor stays at end_factor.
    assert schedule_factor("linear", 50, total, end_factor=0.0) == 0.0


def test_cosine_ramp_through_fit_matches_hand_computed(tmp_path: Path) -> None:
    recorder = fit(tmp_path, lit_decay.WeightDecayScheduler("cosine", start_factor=1.0, end_factor=10.0))
    total = 2 * BATCHES_PER_EPOCH
    expected = [0.04 * (10.0 + (1.0 - 10.0) * 0.5 * (1 + math.cos(math.pi * s / (total - 1)))) for s in range(total)]
    decay = [seen["decay"] for seen in recorder.seen]
    assert [c for c, _ in decay] == pytest.approx(expected)
    # The fused kernel reads torch's key, so it must carry the same value; the no_decay group is untouched.
    assert [w for _, w in decay] == pytest.approx(expected)
    assert all(seen["no_decay"] == (0.0, 0.0) for seen in recorder.seen)


def test_callable_schedule_with_l1_writes_the_groups_strength(tmp_path: Path) -> None:
    recorder = fit(
        tmp_path, lit_decay.WeightDecayScheduler(lambda step: 1.0 / (1 + step)), Net(mode="l1"), max_epochs=1
    )
    decay = [seen["decay"] for seen in recorder.seen]
    assert [c for c, _ in decay] == pytest.approx([0.04 / (1 + s) for s in range(BATCHES_PER_EPOCH)])


def test_schedule_is_what_the_monitor_reports(tmp_path: Path) -> None:
    scheduler = lit_decay.WeightDecayScheduler("linear", end_factor=0.0, warmup_steps=2)
    monitor = lit_decay.WeightDecayMonitor(log_every_n_steps=1, metrics=["effective_decay"])
    L.Trainer(
        callbacks=[scheduler, monitor],
        logger=CSVLogger(tmp_path, name="m"),
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(Net(), loader())
    rows = (tmp_path / "m" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column, step_column = header.index("decay/effective_decay/decay"), header.index("step")
    logged = {int(r.split(",")[step_column]): float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]}
    total = BATCHES_PER_EPOCH
    # The figure logged at step s (Lightning's step value for the metrics of batch s) describes optimizer step s:
    # effective decay of decoupled = lr·wd.
    expected = {
        s: 0.01 * 0.04 * schedule_factor("linear", s, total, end_factor=0.0, warmup_steps=2) for s in range(total)
    }
    assert logged == pytest.approx(expected)


def test_timescale_epochs_derives_weight_decay(tmp_path: Path) -> None:
    recorder = fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_epochs=2.0), Net(weight_decay=0.0), max_epochs=1)
    tau_steps = 2.0 * BATCHES_PER_EPOCH
    assert all(seen["decay"][0] == pytest.approx(1.0 / (0.01 * tau_steps)) for seen in recorder.seen)
    # With explicit dataset and batch sizes: τ_steps = τ_epochs · N / B.
    recorder = fit(
        tmp_path, lit_decay.WeightDecayScheduler(timescale_epochs=2.0, steps_per_epoch=1000 / 10), max_epochs=1
    )
    assert recorder.seen[0]["decay"][0] == pytest.approx(1.0 / (0.01 * 2.0 * 100))


def test_hold_timescale_follows_the_lr_scheduler(tmp_path: Path) -> None:
    def halve_every_step(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5), "interval": "step"}

    held = fit(
        tmp_path,
        lit_decay.WeightDecayScheduler(timescale_steps=50.0, hold_timescale=True),
        Net(scheduler=halve_every_step),
        max_epochs=1,
    )
    fixed = fit(
        tmp_path, lit_decay.WeightDecayScheduler(timescale_steps=50.0), Net(scheduler=halve_every_step), max_epochs=1
    )
    lrs = [0.01 * 0.5**s for s in range(BATCHES_PER_EPOCH)]
    assert [seen["decay"][0] for seen in held.seen] == pytest.approx([1.0 / (lr * 50.0) for lr in lrs])
    assert all(seen["decay"][0] == pytest.approx(1.0 / (0.01 * 50.0)) for seen in fixed.seen)


def test_resume_mid_schedule_continues_exactly(tmp_path: Path) -> None:
    def scheduler() -> lit_decay.WeightDecayScheduler:
        return lit_decay.WeightDecayScheduler("cosine", end_factor=0.0, total_steps=2 * BATCHES_PER_EPOCH)

    straight = fit(tmp_path / "straight", scheduler())

    first = Recorder()
    trainer = L.Trainer(
        callbacks=[scheduler(), first],
        logger=False,
        max_epochs=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(), loader())
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)  # plain data only
    assert any("WeightDecayScheduler" in key for key in state["callbacks"])

    second = Recorder()
    L.Trainer(
        callbacks=[scheduler(), second],
        logger=False,
        max_epochs=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(Net(), loader(), ckpt_path=checkpoint)
    resumed = [s["decay"] for s in first.seen + second.seen]
    assert len(resumed) == len(straight.seen) == 2 * BATCHES_PER_EPOCH
    # The checkpoint holds the coefficient of step 7; the schedule must continue from the saved base, not from it.
    for (coefficient, torch_key), (expected, _) in zip(resumed, (s["decay"] for s in straight.seen)):
        assert coefficient == pytest.approx(expected) and torch_key == pytest.approx(expected)


class WithHead(Net):
    def configure_optimizers(self) -> Any:
        head = {"pattern": "net.2.*", "name": "head", "weight_decay": 0.5}
        return lit_decay.configure_adam(self, lr=self.lr, weight_decay=self.weight_decay, overrides=[head])


def test_two_schedulers_in_one_trainer_each_keep_their_state(tmp_path: Path) -> None:
    """Lightning refuses two stateful callbacks with one state_key; each scheduler's key comes from its arguments."""
    body = lit_decay.WeightDecayScheduler("cosine", end_factor=0.0, groups=["decay"])
    head = lit_decay.WeightDecayScheduler("linear", end_factor=2.0, groups=["head"])
    assert body.state_key != head.state_key
    assert body.state_key == lit_decay.WeightDecayScheduler("cosine", end_factor=0.0, groups=["decay"]).state_key
    assert lit_decay.WeightDecayScheduler(math.sqrt).state_key == lit_decay.WeightDecayScheduler(math.sqrt).state_key
    recorder = Recorder()
    trainer = L.Trainer(
        callbacks=[body, head, recorder],
        logger=False,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(WithHead(), loader())
    total = BATCHES_PER_EPOCH
    expected_body = [0.04 * schedule_factor("cosine", s, total, end_factor=0.0) for s in range(total)]
    expected_head = [0.5 * schedule_factor("linear", s, total, end_factor=2.0) for s in range(total)]
    assert [seen["decay"][0] for seen in recorder.seen] == pytest.approx(expected_body)
    assert [seen["head"][0] for seen in recorder.seen] == pytest.approx(expected_head)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert states[body.state_key] == {"base": {"0/decay": 0.04}}
    assert states[head.state_key] == {"base": {"0/head": 0.5}}


def test_hand_built_optimizer_uses_torch_key() -> None:
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.2)
    written = lit_decay.WeightDecayScheduler("linear", end_factor=0.0, total_steps=3).apply([optimizer], 1)
    assert written == {"0/pg1": pytest.approx(0.1)}
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def test_apply_outside_lightning_timescale_epochs_and_run_length() -> None:
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.3)
    # τ = 2 epochs of 50 steps: wd = 1 / (lr · τ_steps), not the optimizer's own 0.3.
    written = lit_decay.WeightDecayScheduler(timescale_epochs=2.0, steps_per_epoch=50).apply([optimizer], 0)
    assert written == {"0/pg1": pytest.approx(1.0 / (0.01 * 100))}
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"timescale_epochs=2\.0 needs the optimizer steps per epoch.*steps_per_epoch"):
        lit_decay.WeightDecayScheduler(timescale_epochs=2.0).apply([optimizer], 0)
    for shape in ("linear", "cosine"):
        with pytest.raises(ValueError, match=rf"schedule='{shape}' needs the run's length: pass total_steps="):
            lit_decay.WeightDecayScheduler(shape, end_factor=0.0).apply([optimizer], 0)
    # A constant shape (with warmup) needs no length.
    warm = lit_decay.WeightDecayScheduler(warmup_steps=4)
    assert warm.apply([optimizer], 1) == {"0/pg1": pytest.approx(1.0 * 0.25)}


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers, each stepped once per batch (a GAN's generator and critic)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(self.second(self.first(x)), y))
            optimizer.step()

    def configure_optimizers(self) -> Any:
        return [
            lit_decay.configure_adam(self.first, lr=0.01, weight_decay=0.04),
            lit_decay.configure_adam(self.second, lr=0.01, weight_decay=0.04),
        ]


@pytest.mark.parametrize("limit", ["max_epochs", "max_steps"])
def test_two_optimizers_in_manual_optimization_schedule_per_batch(tmp_path: Path, limit: str) -> None:
    """global_step advances once per optimizer step, twice per batch here; the schedule must follow batches."""
    recorder = Recorder()
    length = {"max_epochs": 1} if limit == "max_epochs" else {"max_epochs": 5, "max_steps": 2 * BATCHES_PER_EPOCH}
    trainer = L.Trainer(
        callbacks=[lit_decay.WeightDecayScheduler("linear", end_factor=0.0), recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **length,
    )
    trainer.fit(TwoOptimizers(), loader())
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH
    total = BATCHES_PER_EPOCH
    expected = [0.04 * schedule_factor("linear", s, total, end_factor=0.0) for s in range(total)]
    assert [seen["decay"][0] for seen in recorder.seen] == pytest.approx(expected)
    assert trainer.optimizers[1].param_groups[0]["weight_decay"] == pytest.approx(expected[-1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "exponential"}, "'exponential'.*constant, linear, cosine"),
        ({"start_factor": -1.0}, "start_factor.*-1.0"),
        ({"end_factor": float("nan")}, "end_factor.*nan"),
        ({"warmup_steps": -2}, "warmup_steps.*-2"),
        ({"total_steps": 0}, "total_steps.*0"),
        ({"timescale_steps": 0.0}, "timescale_steps must be > 0"),
        ({"timescale_epochs": float("inf")}, "timescale_epochs.*inf"),
        ({"timescale_steps": 10.0, "timescale_epochs": 1.0}, "timescale_steps=10.0 and timescale_epochs=1.0"),
        ({"hold_timescale": True}, "hold_timescale=True needs a timescale"),
        ({"steps_per_epoch": 10.0}, "steps_per_epoch=10.0 is only used with timescale_epochs"),
        ({"timescale_fraction": 0.0}, "timescale_fraction must be > 0; got 0.0"),
        ({"timescale_fraction": -0.1}, "timescale_fraction must be a finite number >= 0; got -0.1"),
        ({"timescale_fraction": float("nan")}, "timescale_fraction.*nan"),
        ({"timescale_fraction": 0.1, "timescale_steps": 100.0}, "timescale_fraction=0.1 and timescale_steps=100.0"),
        ({"timescale_fraction": 0.1, "timescale_epochs": 2.0}, "timescale_fraction=0.1 and timescale_epochs=2.0"),
        ({"timescale_fraction": 0.1, "steps_per_epoch": 10.0}, "steps_per_epoch=10.0 is only used with timescale_ep"),
        ({"groups": []}, r"groups=\[\] names no param group"),
        ({"warmup_steps": 10, "total_steps": 5}, "warmup_steps=10 is longer than the run of 5 optimizer steps"),
        (
            {"timescale_steps": 0.5},
            r"timescale_steps=0\.5 is a decay timescale of 0\.5 optimizer steps: lr·wd = 1/τ = 2",
        ),
        ({"timescale_fraction": 0.1, "total_steps": 5}, "timescale_fraction=0.1 of a run of 5 steps is a decay timesc"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lit_decay.WeightDecayScheduler(**kwargs)


def test_numbers_from_numpy_and_non_booleans() -> None:
    scheduler = lit_decay.WeightDecayScheduler(lambda step: np.float32(0.5), timescale_steps=np.float64(10.0))
    assert scheduler.factor(3) == 0.5 and scheduler.timescale_steps == 10.0
    with pytest.raises(TypeError, match=r"hold_timescale must be True or False; got 'yes'"):
        lit_decay.WeightDecayScheduler(timescale_steps=10.0, hold_timescale="yes")


def test_inconsistent_options_fail_at_fit_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"groups \['encoder'\].*valid group names are \['decay', 'no_decay'\]"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(groups=["encoder"]))
    with pytest.raises(ValueError, match="group 'decay' has mode 'l2'"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_steps=100.0), Net(mode="l2"))
    with pytest.raises(ValueError, match="group 'decay' has mode 'l2'"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_fraction=0.1), Net(mode="l2"))
    # nothing to schedule: silently doing nothing would leave the user believing the schedule runs
    with pytest.raises(ValueError, match=r"covers no param group.*decay \(decoupled, weight_decay=0\), no_decay"):
        fit(tmp_path, lit_decay.WeightDecayScheduler("cosine", end_factor=0.0), Net(weight_decay=0.0))
    with pytest.raises(ValueError, match="covers no param group: it schedules 'decoupled' groups"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_fraction=0.1), Net(mode="none"))
    # the Trainer's run is 16 steps: a warm-up of 20 never ends, and 0.05 of it is τ = 0.8 steps
    with pytest.raises(ValueError, match="warmup_steps=20 is longer than the run of 16 optimizer steps"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(warmup_steps=20))
    with pytest.raises(ValueError, match=r"timescale_fraction=0\.05 of a run of 16 steps is a decay timescale of 0\.8"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_fraction=0.05))
    with pytest.raises(ValueError, match="timescale_fraction needs the run's length"):
        no_length = {"max_epochs": -1, "max_steps": -1, "max_time": {"seconds": 5}}
        fit(tmp_path, lit_decay.WeightDecayScheduler(timescale_fraction=0.1), **no_length)
    with pytest.raises(ValueError, match=r"returned -1\.0 at step 0"):
        fit(tmp_path, lit_decay.WeightDecayScheduler(lambda step: -1.0))
    with pytest.raises(ValueError, match="needs the run's length"):
        fit(tmp_path, lit_decay.WeightDecayScheduler("cosine"), max_epochs=-1, max_steps=-1, max_time={"seconds": 5})


# ---- ScheduleSettings and the plain functions: no Lightning ---------------------------------------------------------


def test_settings_normalize_and_answer_without_lightning() -> None:
    settings = ScheduleSettings("cosine", end_factor=np.float32(0.0), total_steps=5, groups="decay")
    assert settings.groups == ("decay",) and type(settings.end_factor) is float
    assert settings.needs_run_length and not settings.uses_timescale
    assert settings.factor(2) == pytest.approx(0.5)
    assert settings.factor(2, total_steps=3) == 0.0  # a run length found later (the Trainer's) wins
    assert ScheduleSettings().factor(7) == 1.0 and not ScheduleSettings().needs_run_length
    assert ScheduleSettings(timescale_steps=40.0).timescale() == 40.0
    assert ScheduleSettings(timescale_epochs=2.0).timescale() is None  # steps per epoch unknown yet
    assert ScheduleSettings(timescale_epochs=2.0).timescale(steps_per_epoch=8) == 16.0
    assert ScheduleSettings(timescale_epochs=2.0, steps_per_epoch=5).timescale(steps_per_epoch=8) == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.total_steps = 3  # type: ignore[misc]


def test_settings_select_and_check_groups() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer = lit_decay.configure_adam(model, weight_decay=0.1, mode="l2")
    decay, no_decay = (rule_of(optimizer, g) for g in optimizer.param_groups)
    assert ScheduleSettings().selects("decay", decay) and not ScheduleSettings().selects("no_decay", no_decay)
    assert ScheduleSettings(groups=["no_decay"]).selects("no_decay", no_decay)
    ScheduleSettings().check_groups([optimizer])
    with pytest.raises(ValueError, match=r"groups \['head'\] are not param groups.*\['decay', 'no_decay'\]"):
        ScheduleSettings(groups=["head"]).check_groups([optimizer])
    with pytest.raises(ValueError, match="group 'decay' has mode 'l2'"):
        ScheduleSettings(timescale_steps=10.0).check_groups([optimizer])
    with pytest.raises(ValueError, match="group 'no_decay' has mode 'none'"):
        ScheduleSettings(timescale_steps=10.0, groups=["no_decay"]).check_groups([optimizer])


def test_timescale_coefficient_and_batches_in_run() -> None:
    assert timescale_coefficient(0.01, 50.0) == pytest.approx(2.0)
    assert timescale_coefficient(0.0, 50.0) == 0.0  # no lr, no decoupled decay
    assert batches_in_run(80.0) == 80.0
    assert batches_in_run(80.0, max_steps=100, optimizers=2) == 50
    assert batches_in_run(80.0, max_steps=-1, optimizers=2) == 80.0


def test_timescale_fraction_settings_without_lightning() -> None:
    settings = ScheduleSettings(timescale_fraction=0.1)
    assert settings.uses_timescale and settings.holds_timescale and settings.needs_run_length
    assert settings.timescale() is None and settings.timescale(total_steps=500) == pytest.approx(50.0)
    assert ScheduleSettings(timescale_fraction=0.1, total_steps=200).timescale(total_steps=500) == pytest.approx(20.0)
    assert not ScheduleSettings(timescale_steps=50.0).holds_timescale
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.3)
    # τ = 0.1 · 200 = 20 steps at lr 0.01: wd = 1 / (0.01 · 20)
    held = lit_decay.WeightDecayScheduler(timescale_fraction=0.1, total_steps=200)
    assert held.apply([optimizer], 0) == {"0/pg1": pytest.approx(5.0)}
    optimizer.param_groups[0]["lr"] = 0.002  # an lr schedule's decay: wd follows, τ stays
    assert held.apply([optimizer], 1) == {"0/pg1": pytest.approx(25.0)}
    with pytest.raises(ValueError, match=r"timescale_fraction=0\.1 needs the run's length: pass total_steps="):
        lit_decay.WeightDecayScheduler(timescale_fraction=0.1).apply([optimizer], 0)
    # its checkpoint key has the fraction; the keys of schedulers without one are what they were
    assert "timescale_fraction" in lit_decay.WeightDecayScheduler(timescale_fraction=0.1).state_key
    assert "timescale_fraction" not in lit_decay.WeightDecayScheduler(timescale_steps=10.0).state_key


def test_timescale_fraction_holds_tau_under_warmup_and_cosine_lr(tmp_path: Path) -> None:
    """wd·lr·(0.1·T) = 1 at every step, read from the figures the run logged: the lr LearningRateMonitor logs, the
    group's weight_decay and effective decay the WeightDecayMonitor logs."""
    epochs = 10
    total = epochs * BATCHES_PER_EPOCH

    def warmup_cosine(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        def factor(k: int) -> float:
            return min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * k / total))

        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}

    monitor = lit_decay.WeightDecayMonitor(log_every_n_steps=1, metrics=["weight_decay", "effective_decay"])
    trainer = L.Trainer(
        callbacks=[LearningRateMonitor("step"), lit_decay.WeightDecayScheduler(timescale_fraction=0.1), monitor],
        logger=CSVLogger(tmp_path, name="held"),
        max_epochs=epochs,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(scheduler=warmup_cosine), loader())
    columns: dict[str, dict[int, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    columns.setdefault(key, {})[int(row["step"])] = float(value)
    lr, wd, effective = (
        columns[k] for k in ("lr-Adam/decay", "decay/weight_decay/decay", "decay/effective_decay/decay")
    )
    assert sorted(lr) == sorted(wd) == sorted(effective) == list(range(total))
    tau = 0.1 * total
    for step in range(total):
        assert wd[step] * lr[step] * tau == pytest.approx(1.0, rel=1e-9), step
        assert effective[step] * tau == pytest.approx(1.0, rel=1e-9), step
    # the lr warmed up ninefold and decayed far more: wd followed it, the other way
    assert max(lr.values()) > 9 * lr[0] and max(lr.values()) > 100 * lr[total - 1]
    assert wd[0] > 9 * min(wd.values()) and wd[total - 1] > 100 * min(wd.values())
    # ten e-folds, τ a tenth of the run: what the report says of it
    report = monitor.report["decay"]
    assert report["decay_progress"] == pytest.approx(10.0, rel=1e-9)
    assert report["timescale_over_run"] == pytest.approx(0.1, rel=1e-9)
    assert report["acted"] is True


def test_from_timescale_is_the_timescale_form() -> None:
    """The timescale's own constructor gives the scheduler the keyword form gives, and refuses what it refuses."""
    a = lit_decay.WeightDecayScheduler.from_timescale(steps=200.0, groups=["decay"], hold=True)
    b = lit_decay.WeightDecayScheduler(timescale_steps=200.0, groups=["decay"], hold_timescale=True)
    assert a.settings == b.settings and a.state_key == b.state_key
    with pytest.raises(ValueError, match="timescale"):
        lit_decay.WeightDecayScheduler.from_timescale(steps=10.0, epochs=1.0)
    with pytest.raises(ValueError, match="timescale"):
        lit_decay.WeightDecayScheduler.from_timescale(steps=-1.0)


def test_a_timescale_fraction_computed_once_from_the_starting_lr(tmp_path: Path) -> None:
    """hold_timescale=False: wd = 1/(lr₀·f·T) once, from the lr the run starts from; τ then follows the lr."""

    def halve_every_step(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5), "interval": "step"}

    scheduler = lit_decay.WeightDecayScheduler(timescale_fraction=0.5, hold_timescale=False)
    assert not scheduler.hold_timescale and lit_decay.WeightDecayScheduler(timescale_fraction=0.5).hold_timescale
    assert scheduler.state_key != lit_decay.WeightDecayScheduler(timescale_fraction=0.5).state_key
    recorder = fit(tmp_path, scheduler, Net(scheduler=halve_every_step), max_epochs=1)
    tau = 0.5 * BATCHES_PER_EPOCH
    assert all(seen["decay"][0] == pytest.approx(1.0 / (0.01 * tau)) for seen in recorder.seen)
