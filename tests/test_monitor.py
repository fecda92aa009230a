"""WeightDecayMonitor in real ``Trainer.fit`` runs: what lands in TensorBoard's event files and CSVLogger's
metrics.csv, checked against weights, gradients and optimizer state recorded at the same steps."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay import METRICS, WeightDecayMonitor
from lit_decay.tensorboard import chart_title

LR = 0.05
OVERRIDES = [
    {"pattern": "net.3.weight", "name": "sparse", "mode": "decoupled_l1", "weight_decay": 0.5},
    {"pattern": "net.0.weight", "name": "first", "mode": "decoupled", "weight_decay": 0.1},
]
# group -> (mode, coefficient) of Net's default optimizer
GROUPS = {"decay": ("l2", 0.1), "no_decay": ("none", 0.0), "sparse": ("decoupled_l1", 0.5), "first": ("decoupled", 0.1)}
GROUP_PARAMS = {
    "decay": ["net.2.weight"],
    "no_decay": ["net.0.bias", "net.1.weight", "net.1.bias", "net.2.bias", "net.3.bias"],
    "sparse": ["net.3.weight"],
    "first": ["net.0.weight"],
}
PER_PARAMETER = ("weight_norm", "grad_norm", "update_ratio")
# the logging steps of a 6-step run with log_every_n_steps=2: the step values Lightning gives the user's own metrics
LOGGED = [1, 3, 5]


# ---- model, data, recording ---------------------------------------------------------------------------------------


def default_optimizer(module: L.LightningModule) -> Any:
    return lit_decay.configure_adam(module, lr=LR, weight_decay=0.1, mode="l2", overrides=OVERRIDES)


class Net(L.LightningModule):
    def __init__(self, make_optimizer: Callable[[L.LightningModule], Any] = default_optimizer) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 2))
        self.make_optimizer = make_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 2, generator=g))
        return DataLoader(data, batch_size=4)


def logging_step(trainer: L.Trainer) -> int:
    """The step value Lightning gives the user's ``self.log`` metrics of the current batch."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class Recorder(L.Callback):
    """Copies every group's weights, gradients and Adam state at the end of the batch that stepped, keyed by the
    step value Lightning logs that batch's metrics at.

    Placed after the monitor in ``callbacks``, it sees the same post-step weights the monitor measured.
    """

    def __init__(self) -> None:
        self.steps: dict[int, list[dict[str, Any]]] = {}
        self._before_shrink: dict[int, list[torch.Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, lit_decay.Adam):
                optimizer.register_update_observer(self._copy_before_shrink)

    def _copy_before_shrink(self, optimizer: Any, group: dict[str, Any]) -> None:
        # decoupled_l1's effective decay is defined on the weights the proximal step acts on (docs/modes.md).
        self._before_shrink[id(group)] = [p.detach().double().clone() for p in group["params"]]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Accumulating batches share the step value of the batch that steps after them; that last one is kept.
        optimizers = []
        for optimizer in trainer.optimizers:
            groups = []
            for group in optimizer.param_groups:
                params = group["params"]
                groups.append(
                    {
                        "lr": float(group["lr"]),
                        "betas": group.get("betas"),
                        "eps": group.get("eps"),
                        "amsgrad": group.get("amsgrad"),
                        "weights": [p.detach().double().clone() for p in params],
                        "before_shrink": self._before_shrink.pop(id(group), None),
                        "grads": [None if p.grad is None else p.grad.detach().double().clone() for p in params],
                        "state": [
                            {k: v.detach().double().clone() for k, v in optimizer.state.get(p, {}).items()}
                            for p in params
                        ],
                    }
                )
            optimizers.append(groups)
        self.steps[logging_step(trainer)] = optimizers


def fit(
    tmp: Path,
    monitor: WeightDecayMonitor,
    *,
    module: L.LightningModule | None = None,
    loggers: Any = "tb",
    max_steps: int = 6,
    **trainer_kwargs: Any,
) -> tuple[Recorder, L.Trainer, L.LightningModule]:
    if loggers == "tb":
        loggers = [TensorBoardLogger(tmp, name="tb")]
    elif loggers == "csv":
        loggers = [CSVLogger(tmp, name="csv")]
    recorder = Recorder()
    module = module or Net()
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=loggers,
        callbacks=[monitor, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return recorder, trainer, module


def accumulator(log_dir: str | Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, prefix: str = "decay/") -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"] if tag.startswith(prefix)}


def raw_values(log_dir: str | Path) -> Iterator[Any]:
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            yield from event.summary.value


def csv_metrics(log_dir: str | Path) -> dict[str, dict[int, float]]:
    columns: dict[str, dict[int, float]] = {}
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value != "":
                    columns.setdefault(key, {})[step] = float(value)
    return columns


# ---- independent figures from a recorded group --------------------------------------------------------------------


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors])))


def effective_decay(recorded: dict[str, Any], mode: str, wd: float) -> float:
    lr = recorded["lr"]
    weights = recorded["weights"]
    w2 = sum(float((w**2).sum()) for w in weights)
    if mode == "none" or wd == 0:
        return 0.0
    if mode == "decoupled":
        return lr * wd
    if mode == "decoupled_l1":
        acted_on = recorded["before_shrink"]
        num = sum(float((w.abs() * w.abs().clamp(max=lr * wd)).sum()) for w in acted_on)
        return num / sum(float((w**2).sum()) for w in acted_on)
    beta2, eps = recorded["betas"][1], recorded["eps"]
    num = 0.0
    for w, state in zip(weights, recorded["state"]):
        v = state["max_exp_avg_sq"] if recorded["amsgrad"] else state["exp_avg_sq"]
        denominator = (v / (1 - beta2 ** float(state["step"]))).sqrt() + eps
        num += float(((w**2 if mode == "l2" else w.abs()) / denominator).sum())
    return lr * wd * num / w2


def sparsity(recorded: dict[str, Any]) -> float:
    weights = recorded["weights"]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ---- the main run: TensorBoard + CSV, per-parameter, histograms -----------------------------------------------------


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("main_run")
    tb, csv_logger = TensorBoardLogger(tmp, name="tb"), CSVLogger(tmp, name="csv")
    monitor = WeightDecayMonitor(log_every_n_steps=2, per_parameter=True, histograms=True)
    recorder, trainer, module = fit(tmp, monitor, loggers=[tb, csv_logger], max_steps=6)
    names = {id(p): n for n, p in module.named_parameters()}
    optimizer = trainer.optimizers[0]
    assert {g["name"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups} == GROUP_PARAMS
    return {
        "recorder": recorder,
        "tb": accumulator(tb.log_dir),
        "tb_dir": tb.log_dir,
        "csv": csv_metrics(csv_logger.log_dir),
        "groups": [g["name"] for g in optimizer.param_groups],
    }


def expected_group_tags(prefix: str = "decay", metrics: tuple[str, ...] = METRICS) -> set[str]:
    tags = set()
    for group, (mode, wd) in GROUPS.items():
        for metric in metrics:
            if metric == "decay_timescale" and (mode == "none" or wd == 0):
                continue
            if metric == "sparsity" and mode not in ("l1", "decoupled_l1"):
                continue
            if metric in ("equilibrium", "decay_progress") and mode != "decoupled":
                continue
            tags.add(f"{prefix}/{metric}/{group}")
    return tags


def test_every_tag_at_the_logging_steps(main_run: dict[str, Any]) -> None:
    logged = scalars(main_run["tb"])
    group_tags = {t for t in logged if t.count("/") == 2}
    assert group_tags == expected_group_tags()
    for tag in logged:
        assert sorted(logged[tag]) == LOGGED, tag


def test_weight_and_grad_norms_match_recorded(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in LOGGED:
        for name, group in zip(main_run["groups"], recorded[step][0]):
            assert logged[f"decay/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
            grads = [g for g in group["grads"] if g is not None]
            assert logged[f"decay/grad_norm/{name}"][step] == pytest.approx(norm(grads), rel=1e-5)


def test_update_ratio_from_consecutive_steps(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in LOGGED:
        for name, now, previous in zip(main_run["groups"], recorded[step][0], recorded[step - 1][0]):
            delta = norm([a - b for a, b in zip(now["weights"], previous["weights"])])
            assert logged[f"decay/update_ratio/{name}"][step] == pytest.approx(
                delta / norm(previous["weights"]), rel=1e-4
            ), name


def test_effective_decay_and_sparsity_match_formulas(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in LOGGED:
        for name, group in zip(main_run["groups"], recorded[step][0]):
            mode, wd = GROUPS[name]
            expected = effective_decay(group, mode, wd)
            assert logged[f"decay/effective_decay/{name}"][step] == pytest.approx(expected, rel=1e-5, abs=1e-12)
            if expected:
                assert logged[f"decay/decay_timescale/{name}"][step] == pytest.approx(1 / expected, rel=1e-5)
        assert logged["decay/effective_decay/first"][step] == pytest.approx(LR * 0.1, rel=1e-6)
        sparse = recorded[step][0][main_run["groups"].index("sparse")]
        assert logged["decay/sparsity/sparse"][step] == pytest.approx(sparsity(sparse), rel=1e-6)
    # the proximal step has zeroed some weights by the last step, so the sparsity check above is not vacuous
    assert logged["decay/sparsity/sparse"][5] > 0


def test_csv_logger_gets_the_same_figures(main_run: dict[str, Any]) -> None:
    logged, columns = scalars(main_run["tb"]), main_run["csv"]
    decay_columns = {c for c in columns if c.startswith("decay/")}
    assert decay_columns == set(logged)
    for tag, by_step in logged.items():
        assert sorted(columns[tag]) == LOGGED
        for step, value in by_step.items():
            assert columns[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    # CSV keeps float64: compare the l2 group's effective decay to the formula more tightly
    recorded = main_run["recorder"].steps
    for step in LOGGED:
        group = recorded[step][0][main_run["groups"].index("decay")]
        assert columns["decay/effective_decay/decay"][step] == pytest.approx(
            effective_decay(group, "l2", 0.1), rel=1e-6
        )


def test_per_parameter_tags(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    per_param = {t for t in logged if t.count("/") == 3}
    assert per_param == {
        f"decay/{metric}/{group}/{name}"
        for group, names in GROUP_PARAMS.items()
        for name in names
        for metric in PER_PARAMETER
    }
    for group_index, (group, names) in enumerate(GROUP_PARAMS.items()):
        for i, name in enumerate(names):
            w = recorded[3][0][group_index]["weights"][i]
            assert logged[f"decay/weight_norm/{group}/{name}"][3] == pytest.approx(norm([w]), rel=1e-6)
    # the first group holds one tensor: its per-tensor update ratio is the group's
    assert logged["decay/update_ratio/first/net.0.weight"] == logged["decay/update_ratio/first"]


def test_histograms(main_run: dict[str, Any]) -> None:
    ea, recorded = main_run["tb"], main_run["recorder"].steps
    assert set(ea.Tags()["histograms"]) == {f"decay/histogram/{g}" for g in GROUPS}
    for index, group in enumerate(main_run["groups"]):
        events = ea.Histograms(f"decay/histogram/{group}")
        assert [e.step for e in events] == LOGGED
        for event in events:
            weights = recorded[event.step][0][index]["weights"]
            assert event.histogram_value.num == sum(w.numel() for w in weights)
            assert event.histogram_value.sum_squares == pytest.approx(norm(weights) ** 2, rel=1e-5)


def text_of(ea: EventAccumulator, tag: str) -> str:
    (event,) = ea.Tensors(f"{tag}/text_summary")
    return str(event.tensor_proto.string_val[0].decode())


def test_grouping_text_summary(main_run: dict[str, Any]) -> None:
    ea = main_run["tb"]
    text = text_of(ea, "decay/grouping")
    assert "Adam implementation: fused" in text
    assert "| decay | l2 | 0.1 |" in text
    assert "| sparse | decoupled_l1 | 0.5 |" in text
    assert "| first | decoupled | 0.1 | 0.05 | 1 | 64 | 200 | 33 |" in text  # τ = 1/(0.05·0.1), run of 6 steps
    # the per-tensor table is apart, in pages short enough for TensorBoard's text card (8 tensors: one page)
    assert {t for t in ea.Tags()["tensors"] if t.startswith("decay/parameters")} == {"decay/parameters/1/text_summary"}
    page = text_of(ea, "decay/parameters/1")
    assert page.startswith("**optimizer 0: Adam**, tensors 1–8 of 8")
    assert "| net.1.weight | (16,) | 16 | no_decay | normalization layer LayerNorm |" in page
    assert "| net.0.weight | (16, 4) | 64 | first | override 'first' (net.0.weight) |" in page
    assert "net.1.weight" not in text


def custom_scalars(log_dir: str | Path, layouts: int = 1) -> layout_pb2.Layout:
    """The layout TensorBoard shows for a run (its latest), after checking how many the run wrote."""
    configs = [v for v in raw_values(log_dir) if v.tag == "custom_scalars__config__"]
    assert len(configs) == layouts, f"{len(configs)} custom-scalars layouts in {log_dir}"
    return layout_pb2.Layout.FromString(configs[-1].tensor.string_val[0]) if configs else layout_pb2.Layout()


def chart_metric(chart: Any) -> str:
    """The metric a chart shows: its title starts with the metric's name."""
    return str(chart.title).split(":")[0]


def test_custom_scalars_layout(main_run: dict[str, Any]) -> None:
    layout = custom_scalars(main_run["tb_dir"])
    (category,) = layout.category
    assert category.title == "decay"
    # this run logs every metric (its groups have every mode), weight_decay included
    assert [chart.title for chart in category.chart] == [chart_title(m) for m in METRICS]
    assert "rotational equilibrium" in category.chart[METRICS.index("equilibrium")].title
    tags = set(scalars(main_run["tb"]))
    for chart in category.chart:
        (regex,) = chart.multiline.tag
        metric = chart_metric(chart)
        # a pattern that holds whatever the groups are, so the charts of runs with other groups merge
        assert regex == f"^decay/{metric}/[^/]+$"
        # one chart holds exactly that metric's group tags, none of the per-parameter ones
        matched = {t for t in tags if re.search(regex, t)}
        assert matched == {t for t in expected_group_tags() if t.split("/")[1] == metric}


# ---- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["decay_progress", "weight_decay", "equilibrium", "sparsity"])
def test_each_metric_alone_is_logged(tmp_path: Path, metric: str) -> None:
    """Any subset of metrics logs, each on its own: decay_progress alone (a host count, no tensor work) included."""
    monitor = WeightDecayMonitor(log_every_n_steps=2, metrics=[metric])
    _, trainer, _ = fit(tmp_path, monitor, loggers="csv", max_steps=6)
    columns = csv_metrics(trainer.logger.log_dir)
    logged = {key for key in columns if key.startswith("decay/")}
    assert logged == {tag for tag in expected_group_tags(metrics=(metric,))}, logged
    for key in logged:
        assert sorted(columns[key]) == LOGGED, key
    if metric == "decay_progress":
        assert columns["decay/decay_progress/first"][5] == pytest.approx(6 * LR * 0.1)


def test_trainer_interval_prefix_and_metric_subset(tmp_path: Path) -> None:
    monitor = WeightDecayMonitor(prefix="wd", metrics=["sparsity", "weight_norm"])
    recorder, trainer, _ = fit(tmp_path, monitor, max_steps=7, log_every_n_steps=3)
    log_dir = trainer.logger.log_dir
    ea = accumulator(log_dir)
    logged = scalars(ea, prefix="")
    assert {t for t in logged if t.startswith("wd/")} == expected_group_tags("wd", ("weight_norm", "sparsity"))
    assert not [t for t in logged if t.startswith("decay/")]
    for tag, by_step in logged.items():
        if tag.startswith("wd/"):
            assert sorted(by_step) == [2, 5], tag
    groups = [g["name"] for g in trainer.optimizers[0].param_groups]
    for step in (2, 5):
        for name, group in zip(groups, recorder.steps[step][0]):
            assert logged[f"wd/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
    layout = custom_scalars(log_dir)
    charts = [chart_title("weight_norm"), chart_title("sparsity")]
    assert [(c.title, [ch.title for ch in c.chart]) for c in layout.category] == [("wd", charts)]
    assert "wd/grouping/text_summary" in ea.Tags()["tensors"]
    assert not ea.Tags()["histograms"]


class TwoOptimizers(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_encoder, opt_head = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.encoder(x)), y)
        opt_encoder.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_encoder.step()
        opt_head.step()

    def configure_optimizers(self) -> Any:
        return [
            lit_decay.configure_adam(self.encoder, lr=0.01, weight_decay=0.1, mode="decoupled"),
            lit_decay.configure_adam(self.head, lr=0.02, weight_decay=0.2, mode="l2"),
        ]

    def train_dataloader(self) -> DataLoader:
        return Net.train_dataloader(self)  # type: ignore[arg-type]


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    monitor = WeightDecayMonitor(log_every_n_steps=2, metrics=["weight_norm", "effective_decay"])
    recorder, trainer, _ = fit(tmp_path, monitor, module=TwoOptimizers(), max_steps=8)
    logged = scalars(accumulator(trainer.logger.log_dir))
    names = ["decay", "no_decay", "decay-1", "no_decay-1"]
    assert set(logged) == {f"decay/{m}/{g}" for m in ("weight_norm", "effective_decay") for g in names}
    # two optimizer steps per batch: Lightning's global step moves by two, its logging step by one per batch, and
    # the monitor logs every second batch at the logging step
    assert trainer.global_step == 8 and sorted(recorder.steps) == [0, 1, 2, 3]
    logging_steps = [1, 3]
    for tag in logged:
        assert sorted(logged[tag]) == logging_steps, tag
    for step in logging_steps:
        encoder_groups, head_groups = recorder.steps[step]
        for name, group in zip(names, encoder_groups + head_groups):
            assert logged[f"decay/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
        assert logged["decay/effective_decay/decay"][step] == pytest.approx(0.01 * 0.1, rel=1e-6)
        assert logged["decay/effective_decay/decay-1"][step] == pytest.approx(
            effective_decay(head_groups[0], "l2", 0.2), rel=1e-5
        )


def test_gradient_accumulation_logs_at_global_steps(tmp_path: Path) -> None:
    monitor = WeightDecayMonitor(log_every_n_steps=2, metrics=["weight_norm", "grad_norm"])
    recorder, trainer, _ = fit(tmp_path, monitor, max_steps=6, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    logged = scalars(accumulator(trainer.logger.log_dir))
    groups = [g["name"] for g in trainer.optimizers[0].param_groups]
    for tag in logged:
        assert sorted(logged[tag]) == LOGGED, tag
    for step in LOGGED:
        for name, group in zip(groups, recorder.steps[step][0]):
            assert logged[f"decay/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
            # the gradient the step used: summed over both accumulated batches
            grads = [g for g in group["grads"] if g is not None]
            assert logged[f"decay/grad_norm/{name}"][step] == pytest.approx(norm(grads), rel=1e-5)


def test_effective_decay_uses_the_lr_of_the_step(tmp_path: Path) -> None:
    def with_schedule(module: L.LightningModule) -> Any:
        schedule = {
            "scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k),
            "interval": "step",
        }
        return lit_decay.configure_adam(
            module, lr=LR, weight_decay=0.1, mode="l2", overrides=OVERRIDES, scheduler=schedule
        )

    monitor = WeightDecayMonitor(log_every_n_steps=1, metrics=["effective_decay"])
    recorder, trainer, _ = fit(tmp_path, monitor, module=Net(with_schedule), max_steps=4)
    logged = scalars(accumulator(trainer.logger.log_dir))
    # the step of batch k runs with lr = LR * 0.5**k; the scheduler moves it after the step
    assert logged["decay/effective_decay/first"] == pytest.approx(
        {k: LR * 0.5**k * 0.1 for k in (0, 1, 2, 3)}, rel=1e-6
    )
    groups = [g["name"] for g in trainer.optimizers[0].param_groups]
    for step in (0, 1, 2, 3):
        # by the batch end Lightning has already stepped the scheduler, so the recorded lr is the next one
        decay = {**recorder.steps[step][0][groups.index("decay")], "lr": LR * 0.5**step}
        assert logged["decay/effective_decay/decay"][step] == pytest.approx(effective_decay(decay, "l2", 0.1), rel=1e-5)


# ---- audit --------------------------------------------------------------------------------------------------------


def audit_messages(record: list[warnings.WarningMessage]) -> list[str]:
    """The audit's warnings."""
    return [str(w.message) for w in record if "WeightDecayMonitor audit" in str(w.message)]


def test_audit_user_built_adamw_decaying_norms_and_biases(tmp_path: Path) -> None:
    module = Net(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1))
    with pytest.warns(UserWarning, match="applies weight decay to 5 normalization or bias") as record:
        fit(tmp_path, WeightDecayMonitor(), module=module, loggers="csv", max_steps=1)
    (message,) = audit_messages(record.list)
    for name in GROUP_PARAMS["no_decay"]:
        assert name in message
    assert "net.1.weight (normalization layer LayerNorm)" in message
    assert "net.0.bias (bias)" in message
    assert "net.2.weight" not in message


def test_audit_hand_built_l1_groups_in_torchs_adam(tmp_path: Path) -> None:
    module = Net(lambda m: torch.optim.Adam(lit_decay.param_groups(m, weight_decay=0.1, mode="l1"), lr=0.01))
    with pytest.warns(UserWarning, match="only lit_decay.Adam applies") as record:
        fit(tmp_path, WeightDecayMonitor(), module=module, loggers="csv", max_steps=1)
    (message,) = audit_messages(record.list)
    assert "decay (l1, applied as l2)" in message
    assert "reads their weight_decay as its own decay" in message and "configure_adam" in message


def test_audit_silent_for_well_grouped_optimizers(tmp_path: Path) -> None:
    for make in (
        default_optimizer,
        # hand-built over lit_decay's groups: nothing to complain about either
        lambda m: torch.optim.AdamW(lit_decay.param_groups(m, weight_decay=0.1), lr=0.01),
        lambda m: torch.optim.Adam(lit_decay.param_groups(m, weight_decay=0.1, mode="l2"), lr=0.01),
    ):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(tmp_path, WeightDecayMonitor(), module=Net(make), loggers="csv", max_steps=1)
        assert audit_messages(record) == []


def test_audit_parameters_missing_from_the_optimizer(tmp_path: Path) -> None:
    module = Net(lambda m: lit_decay.configure_adam(m.net[2], lr=0.01, weight_decay=0.1))
    with pytest.warns(UserWarning, match="6 trainable parameter") as record:
        fit(tmp_path, WeightDecayMonitor(), module=module, loggers="csv", max_steps=1)
    (message,) = [m for m in audit_messages(record.list) if "in no optimizer" in m]
    # net.0, net.1 and net.3 are missing; net.2 is in the optimizer
    missing = [n for n, _ in module.named_parameters() if not n.startswith("net.2.")]
    assert len(missing) == 6
    for name in missing:
        assert name in message


def test_audit_false_is_silent(tmp_path: Path) -> None:
    for make in (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
        lambda m: torch.optim.Adam(lit_decay.param_groups(m, weight_decay=0.1, mode="l1"), lr=0.01),
        lambda m: lit_decay.configure_adam(m.net[2], lr=0.01, weight_decay=0.1),
    ):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(tmp_path, WeightDecayMonitor(audit=False), module=Net(make), loggers="csv", max_steps=1)
        assert audit_messages(record) == []


# ---- non-finite figures, checkpoints ------------------------------------------------------------------------------


class NaNNet(Net):
    """A decayed matrix that is never used: NaN weights in the "decay" group, finite figures elsewhere."""

    def __init__(self) -> None:
        super().__init__(lambda m: lit_decay.configure_adam(m, lr=0.01, weight_decay=0.1, mode="l2"))
        self.spare = nn.Parameter(torch.full((3, 3), math.nan))


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("nan_run")
    monitor = WeightDecayMonitor(log_every_n_steps=2, on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, trainer, _ = fit(tmp, monitor, module=NaNNet(), loggers="csv", max_steps=6)
    path = tmp / "last.ckpt"
    trainer.save_checkpoint(path)
    return {
        "messages": [str(w.message) for w in record if "WeightDecayMonitor:" in str(w.message)],
        "csv": csv_metrics(trainer.logger.log_dir),
        "checkpoint": path,
        "monitor": monitor,
    }


def test_nonfinite_warns_once_per_group_and_still_logs(nan_run: dict[str, Any]) -> None:
    messages = nan_run["messages"]
    assert len(messages) == 1
    assert "weight_norm of group 'decay' is nan at step 1" in messages[0]
    columns = nan_run["csv"]
    assert sorted(columns["decay/weight_norm/decay"]) == LOGGED
    assert all(math.isnan(v) for v in columns["decay/weight_norm/decay"].values())
    assert all(math.isfinite(v) for v in columns["decay/weight_norm/no_decay"].values())


def test_nonfinite_raise_names_group_and_metric(tmp_path: Path) -> None:
    monitor = WeightDecayMonitor(log_every_n_steps=2, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"weight_norm of group 'decay' is nan at step 1"):
        fit(tmp_path, monitor, module=NaNNet(), loggers="csv", max_steps=6)


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_checkpoint_loads_with_weights_only(nan_run: dict[str, Any]) -> None:
    checkpoint = torch.load(nan_run["checkpoint"], weights_only=True)
    monitor = nan_run["monitor"]
    state = checkpoint["callbacks"][monitor.state_key]
    assert state["warned_nonfinite"] == ["decay"] and state["decay_progress"] == {}  # an l2 model: no decoupled group
    assert set(state["decay_record"]) == {"decay", "no_decay"}
    assert _plain(state)
    restored = WeightDecayMonitor()
    restored.load_state_dict(state)
    assert restored.state_dict() == state


# ---- misuse -------------------------------------------------------------------------------------------------------


def test_without_logger(tmp_path: Path) -> None:
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        callbacks=[WeightDecayMonitor()],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(Net())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"log_every_n_steps": 0}, "got 0"),
        ({"log_every_n_steps": -3}, "got -3"),
        ({"log_every_n_steps": 2.5}, "got 2.5"),
        ({"on_nonfinite": "boom"}, "'boom'.*warn, raise, ignore"),
        ({"metrics": ["nope"]}, "'nope'.*weight_norm"),
        ({"prefix": ""}, "got ''"),
        ({"prefix": "decay/"}, "got 'decay/'"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        WeightDecayMonitor(**kwargs)


# ---- LightningCLI -------------------------------------------------------------------------------------------------


class CLINet(Net):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lambda m: lit_decay.configure_adam(m, lr=lr, weight_decay=0.1))


def test_lightning_cli_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_steps: 3
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: {tmp_path / "logs"}
      name: cli
  callbacks:
    - class_path: lit_decay.WeightDecayMonitor
      init_args:
        log_every_n_steps: 1
        per_parameter: true
model:
  lr: 0.02
"""
    )
    cli = LightningCLI(CLINet, args=["fit", "--config", str(config)], save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, WeightDecayMonitor)]
    assert monitor.log_every_n_steps == 1 and monitor.per_parameter
    (log_dir,) = (tmp_path / "logs" / "cli").glob("version_*")
    logged = scalars(accumulator(log_dir))
    names = {n: p for n, p in cli.model.named_parameters()}
    decay_names = ["net.0.weight", "net.2.weight", "net.3.weight"]
    assert {t for t in logged if t.count("/") == 2} == {
        f"decay/{m}/{g}"
        for m in ("weight_norm", "grad_norm", "update_ratio", "effective_decay", "weight_decay")
        for g in GROUPS
        if g in ("decay", "no_decay")
    } | {"decay/decay_timescale/decay", "decay/equilibrium/decay", "decay/decay_progress/decay"}
    assert {t for t in logged if t.count("/") == 3} == {
        f"decay/{m}/decay/{n}" for m in PER_PARAMETER for n in decay_names
    } | {f"decay/{m}/no_decay/{n}" for m in PER_PARAMETER for n in names if n not in decay_names}
    for tag in logged:
        assert sorted(logged[tag]) == [0, 1, 2], tag
    assert logged["decay/effective_decay/decay"][2] == pytest.approx(0.02 * 0.1, rel=1e-6)
    assert logged["decay/decay_progress/decay"] == pytest.approx({k: (k + 1) * 0.02 * 0.1 for k in (0, 1, 2)})
    assert logged["decay/weight_norm/decay"][2] == pytest.approx(
        norm([names[n].detach().double() for n in decay_names]), rel=1e-6
    )


# ---- rotational equilibrium and decay progress (Kosson, Messmer & Jaggi, 2024; Wang & Aitchison, 2024) -------------


def test_equilibrium_is_the_update_ratio_over_adamws_prediction(main_run: dict[str, Any]) -> None:
    logged = scalars(main_run["tb"])
    predicted = math.sqrt(2 * LR * 0.1 * (1 - 0.9) / (1 + 0.9))  # the "first" group: decoupled, wd 0.1, β₁ 0.9
    for step in LOGGED:
        assert logged["decay/equilibrium/first"][step] == pytest.approx(
            logged["decay/update_ratio/first"][step] / predicted, rel=1e-5
        )


def test_decay_progress_counts_every_step_not_only_logged_ones(main_run: dict[str, Any]) -> None:
    # after the step of batch k, k + 1 steps of lr·wd have been applied to the decoupled group
    assert scalars(main_run["tb"])["decay/decay_progress/first"] == pytest.approx(
        {k: (k + 1) * LR * 0.1 for k in LOGGED}, rel=1e-6
    )


class NormalizedNet(L.LightningModule):
    """A bias-free Linear followed by a LayerNorm (its weights' scale does not matter), and a plain Linear head."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128, bias=False), nn.LayerNorm(128), nn.Linear(128, 1))
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        overrides = [{"pattern": "net.0.weight", "name": "normalized"}, {"pattern": "net.2.weight", "name": "head"}]
        return lit_decay.configure_adam(
            self, lr=self.lr, weight_decay=self.weight_decay, mode="decoupled", overrides=overrides
        )

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(512, 32, generator=g), torch.randn(512, 1, generator=g))
        return DataLoader(data, batch_size=64, shuffle=True, generator=g)


def test_layernorm_followed_linear_reaches_equilibrium(tmp_path: Path) -> None:
    # τ = 1/(lr·wd) = 5 steps: from 4τ on, the normalized layer's update ratio is, on average, the one the paper
    # predicts; the head, whose scale matters to the loss, is not held there
    torch.manual_seed(0)
    monitor = WeightDecayMonitor(log_every_n_steps=1, metrics=["update_ratio", "equilibrium"])
    module = NormalizedNet(lr=0.05, weight_decay=4.0)
    _, trainer, _ = fit(tmp_path, monitor, module=module, loggers="csv", max_steps=60)
    columns = csv_metrics(trainer.logger.log_dir)
    normalized, head = columns["decay/equilibrium/normalized"], columns["decay/equilibrium/head"]
    late = range(20, 60)
    assert sum(normalized[k] for k in late) / len(late) == pytest.approx(1.0, abs=0.15)
    assert sum(head[k] for k in late) / len(late) > 1.5
    assert abs(normalized[0] - 1) > 0.5  # far from it at the start: the figure can fail


def test_no_extra_transfer_for_equilibrium_and_decay_progress(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    transfers: list[int] = []
    real_to_host = lit_decay.stats.to_host
    monkeypatch.setattr(lit_decay.stats, "to_host", lambda table: transfers.append(1) or real_to_host(table))
    _, trainer, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2), loggers="csv", max_steps=6)
    columns = csv_metrics(trainer.logger.log_dir)
    assert sorted(columns["decay/equilibrium/first"]) == sorted(columns["decay/decay_progress/first"]) == LOGGED
    assert transfers == [1, 1, 1]  # one per logging step, as without the two figures


def test_decay_progress_is_restored_on_resume(tmp_path: Path) -> None:
    _, trainer, _ = fit(tmp_path / "a", WeightDecayMonitor(log_every_n_steps=2), loggers="csv", max_steps=4)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][WeightDecayMonitor(log_every_n_steps=2).state_key]
    assert state["decay_progress"]["first"] == pytest.approx(4 * LR * 0.1)
    resumed = L.Trainer(
        max_steps=8,
        logger=CSVLogger(tmp_path / "b", name="csv"),
        callbacks=[WeightDecayMonitor(log_every_n_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    resumed.fit(Net(), ckpt_path=path)
    progress = csv_metrics(resumed.logger.log_dir)["decay/decay_progress/first"]
    assert progress == pytest.approx({5: 6 * LR * 0.1, 7: 8 * LR * 0.1}, rel=1e-6)


def grouping_summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The grouping summaries shown (through Lightning's rank_zero_info), not the decay report at the end."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("lit_decay:") and "trainable" in r.getMessage()
    ]


def test_a_timescale_longer_than_the_run_is_advice_in_the_summary_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def warmup(module: L.LightningModule) -> Any:
        # the lr starts at 0 in a warmup: the advice must use the peak, 0.01
        schedule = {
            "scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k / 6),
            "interval": "step",
        }
        return lit_decay.configure_adam(module, lr=0.01, weight_decay=0.1, mode="decoupled", scheduler=schedule)

    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        _, trainer, _ = fit(tmp_path, WeightDecayMonitor(), module=Net(warmup), loggers="tb", max_steps=6)
    assert not [w for w in record if "lit_decay" in str(w.filename) or "WeightDecayMonitor" in str(w.message)]
    advice = "group 'decay': τ = 1/(lr·wd) = 1,000 steps is 1.7e+02× the run of 6 steps"
    summary = grouping_summaries(caplog)
    assert len(summary) == 1 and advice in summary[0] and "timescale_fraction=0.1" in summary[0]
    text = [v for v in raw_values(trainer.logger.log_dir) if v.tag.startswith("decay/grouping")]
    assert advice in text[0].tensor.string_val[0].decode()
    # τ shorter than the run: nothing to say
    caplog.clear()
    short = lambda m: lit_decay.configure_adam(m, lr=0.05, weight_decay=5.0, mode="decoupled")  # noqa: E731
    with caplog.at_level(logging.INFO):
        fit(tmp_path, WeightDecayMonitor(), module=Net(short), loggers="csv", max_steps=6)
    assert not [r for r in caplog.records if "τ = 1/(lr·wd)" in r.getMessage() and "× the run" in r.getMessage()]


# ---- the x-axis: the step values of the user's own metrics ---------------------------------------------------------


class LoggingNet(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("user/loss", loss)
        return loss


class LoggingTwoOptimizers(TwoOptimizers):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        self.log("user/batch", float(batch_idx))


@pytest.mark.parametrize(("module", "max_steps"), [(LoggingNet, 9), (LoggingTwoOptimizers, 18)])
def test_monitor_logs_on_the_steps_of_the_users_metrics(
    tmp_path: Path, module: type[L.LightningModule], max_steps: int
) -> None:
    # 9 batches either way (two optimizer steps per batch in manual optimization): the user's metrics land on 2, 5, 8
    _, trainer, _ = fit(tmp_path, WeightDecayMonitor(), module=module(), max_steps=max_steps, log_every_n_steps=3)
    logged = scalars(accumulator(trainer.logger.log_dir), prefix="")
    user = next(tag for tag in logged if tag.startswith("user/"))
    assert sorted(logged[user]) == [2, 5, 8]
    for tag in logged:
        if tag.startswith("decay/"):
            assert sorted(logged[tag]) == [2, 5, 8], tag


# ---- set-ups that broke before: two monitors, lazy modules, a failing fit, group names ------------------------------


def test_two_monitors_in_one_trainer_keep_their_own_state(tmp_path: Path) -> None:
    cheap = WeightDecayMonitor(metrics=["weight_norm"])
    detailed = WeightDecayMonitor(histograms=True, per_parameter=True, prefix="detail")
    assert cheap.state_key != detailed.state_key
    trainer = L.Trainer(
        max_steps=2,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[cheap, detailed],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net())
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert {cheap.state_key, detailed.state_key} <= set(states)
    logged = scalars(accumulator(trainer.logger.log_dir), prefix="")
    assert "decay/weight_norm/decay" in logged and "decay/grad_norm/decay" not in logged
    assert "detail/grad_norm/decay/net.2.weight" in logged


class LazyNet(Net):
    def __init__(self) -> None:
        super().__init__(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1))
        self.net = nn.Sequential(nn.LazyLinear(16), nn.LayerNorm(16), nn.Linear(16, 2))


def test_lazy_module_with_a_hand_built_optimizer(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, trainer, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=1), module=LazyNet(), loggers="csv")
    assert trainer.global_step == 6
    (message,) = [m for m in audit_messages(record) if "could not check" in m]
    assert "lazy module is not initialised yet" in message
    assert sorted(csv_metrics(trainer.logger.log_dir)["decay/weight_norm/pg1"]) == list(range(6))


def hooks(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


@pytest.mark.parametrize("failure", ["nonfinite", "user"])
def test_hooks_are_removed_when_fit_raises(tmp_path: Path, failure: str) -> None:
    class Failing(NaNNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if failure == "user" and batch_idx == 3:
                raise RuntimeError("a bug in the user's training_step")
            return super().training_step(batch, batch_idx)

    module = Failing()
    plain = lit_decay.configure_adam(Failing(), lr=0.01, weight_decay=0.1, mode="l2")
    monitor = WeightDecayMonitor(log_every_n_steps=2, on_nonfinite="raise")
    with pytest.raises((FloatingPointError, RuntimeError)):
        fit(tmp_path, monitor, module=module, loggers="csv", max_steps=6)
    (optimizer,) = module.trainer.optimizers
    assert hooks(optimizer) == hooks(plain)  # only configure_adam's own
    assert monitor._statistics is None


def test_group_name_with_a_slash(tmp_path: Path) -> None:
    class SlashNet(NaNNet):
        def configure_optimizers(self) -> Any:
            # lit_decay refuses "/" in the names of its own groups (issue 21); a user-built optimizer may have one.
            overrides = [{"pattern": "spare", "name": "enc"}]
            groups = lit_decay.param_groups(self, weight_decay=0.1, mode="l2", overrides=overrides)
            groups[-1]["name"] = "enc/dec"
            return torch.optim.Adam(groups, lr=0.01)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, trainer, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2, per_parameter=True), module=SlashNet())
    messages = [str(w.message) for w in record if "WeightDecayMonitor:" in str(w.message)]
    assert len(messages) == 1 and "of group 'enc/dec' is nan" in messages[0]
    log_dir = trainer.logger.log_dir
    tags = set(scalars(accumulator(log_dir)))
    assert {"decay/weight_norm/enc/dec", "decay/weight_norm/enc/dec/spare"} <= tags
    (chart,) = [c for c in custom_scalars(log_dir).category[0].chart if chart_metric(c) == "weight_norm"]
    (regex,) = chart.multiline.tag
    matched = {t for t in tags if re.search(regex, t)}
    assert matched == {"decay/weight_norm/decay", "decay/weight_norm/no_decay", "decay/weight_norm/enc/dec"}


def test_no_timescale_advice_under_a_weight_decay_scheduler(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the scheduler rewrites wd = 1/(lr·τ) before every step: the coefficient at fit start says nothing
    make = lambda m: lit_decay.configure_adam(m, lr=0.01, weight_decay=0.1, mode="decoupled")  # noqa: E731
    trainer = L.Trainer(
        max_steps=6,
        logger=CSVLogger(tmp_path),
        callbacks=[WeightDecayMonitor(), lit_decay.WeightDecayScheduler(timescale_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer.fit(Net(make))
    assert audit_messages(record) == []
    summary = grouping_summaries(caplog)
    assert len(summary) == 1 and "× the run" not in summary[0]


# ---- steps a GradScaler skipped -----------------------------------------------------------------------------------


def inf_grad_norm_of(monkeypatch: pytest.MonkeyPatch, group: str, skipped: frozenset[str]) -> None:
    """Make every collect() report an inf grad_norm for ``group`` and name ``skipped`` as GradScaler-skipped groups,
    as StepStatistics does (its ``skipped`` attribute) when torch.amp's GradScaler skipped the measured step."""
    original = lit_decay.StepStatistics.collect

    def collect(self: lit_decay.StepStatistics) -> dict[str, float]:
        figures = original(self)
        if figures:
            figures[f"grad_norm/{group}"] = math.inf
        self.skipped = skipped  # type: ignore[attr-defined]  # set here whether or not StepStatistics has it yet
        return figures

    monkeypatch.setattr(lit_decay.StepStatistics, "collect", collect)


@pytest.mark.parametrize("action", ["warn", "raise"])
def test_nonfinite_figures_of_a_skipped_step_neither_warn_nor_raise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, action: str
) -> None:
    inf_grad_norm_of(monkeypatch, "decay", skipped=frozenset({"decay"}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, trainer, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2, on_nonfinite=action), loggers="csv")
    assert [str(w.message) for w in record if "WeightDecayMonitor:" in str(w.message)] == []
    # still logged as measured: only the fault-finding skips the group
    assert all(math.isinf(v) for v in csv_metrics(trainer.logger.log_dir)["decay/grad_norm/decay"].values())


def test_nonfinite_figures_of_another_group_than_the_skipped_one_still_raise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    inf_grad_norm_of(monkeypatch, "decay", skipped=frozenset({"first"}))
    with pytest.raises(FloatingPointError, match=r"grad_norm of group 'decay' is inf at step 1"):
        fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2, on_nonfinite="raise"), loggers="csv")


class PoisonedFirstStep(Net):
    """An fp16 run whose first backward overflows, as the GradScaler's initial scale of 65,536 often does."""

    backwards = 0

    def on_after_backward(self) -> None:
        if self.backwards == 0:
            self.net[0].weight.grad[0, 0] = float("inf")
        self.backwards += 1


@pytest.mark.parametrize("mode", ["l2", "decoupled_l1"])
def test_fp16_run_whose_scaler_skips_the_first_step_is_not_a_fault(tmp_path: Path, mode: str) -> None:
    """precision="16-mixed" (asked for through Lightning's plugin, as Lightning maps it to bf16 on a CPU) with a first
    step the scaler skips: with on_nonfinite="raise" the fit runs on, the skipped step is logged with update_ratio 0
    and finite decay figures, and the steps after it are measured normally."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def make_optimizer(module: L.LightningModule) -> Any:
        return lit_decay.configure_adam(module, lr=LR, weight_decay=0.1, mode=mode)

    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    monitor = WeightDecayMonitor(on_nonfinite="raise", metrics=["update_ratio", "effective_decay", "grad_norm"])
    _, trainer, _ = fit(
        tmp_path,
        monitor,
        module=PoisonedFirstStep(make_optimizer),
        max_steps=4,
        log_every_n_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert scaler.get_scale() < 65536.0  # the scaler did skip steps (the first, and any other that overflowed)
    logged = scalars(accumulator(trainer.loggers[0].log_dir))
    ratios, decays, norms = (logged[f"decay/{m}/decay"] for m in ("update_ratio", "effective_decay", "grad_norm"))
    assert sorted(ratios) == [0, 1, 2, 3]
    skipped = [step for step, norm in norms.items() if not math.isfinite(norm)]
    assert 0 in skipped and len(skipped) < 4
    for step, ratio in ratios.items():
        if step in skipped:
            assert ratio == 0.0 and decays[step] == 0.0, step
        else:
            assert ratio > 0 and decays[step] > 0, step
    assert all(math.isfinite(v) for tag, by_step in logged.items() if "grad_norm" not in tag for v in by_step.values())


# ---- arguments that are flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [("per_parameter", "no"), ("histograms", "yes"), ("audit", 1)])
def test_flags_must_be_booleans(flag: str, value: Any) -> None:
    # bool("no") is True: a string where a flag belongs would silently turn the option on
    with pytest.raises(TypeError, match=rf"{flag} must be True or False; got {value!r}"):
        WeightDecayMonitor(**{flag: value})


# ---- the custom-scalars layout holds the charts of what the run logs ------------------------------------------------


def charted(log_dir: str | Path, layouts: int = 1) -> list[str]:
    return [chart_metric(c) for c in custom_scalars(log_dir, layouts).category[0].chart]


@pytest.mark.parametrize(
    ("mode", "absent"),
    [
        ("decoupled", {"sparsity"}),
        ("l2", {"sparsity", "equilibrium", "decay_progress"}),
        ("decoupled_l1", {"equilibrium", "decay_progress"}),
    ],
)
def test_layout_has_a_chart_only_for_what_the_run_logs(tmp_path: Path, mode: str, absent: set[str]) -> None:
    module = Net(lambda m: lit_decay.configure_adam(m, lr=0.01, weight_decay=0.1, mode=mode))
    _, trainer, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2), module=module)
    log_dir = trainer.logger.log_dir
    metrics = {t.split("/")[1] for t in scalars(accumulator(log_dir))}
    assert charted(log_dir) == [m for m in METRICS if m not in absent]
    assert set(charted(log_dir)) == metrics  # every logged metric has its chart, and no chart is empty


def test_a_run_that_logs_nothing_writes_no_layout(tmp_path: Path) -> None:
    # the first run logs; the second, in the same folder, ends before its first logging step (log_every_n_steps=50)
    _, first, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2))
    _, second, _ = fit(tmp_path, WeightDecayMonitor())
    assert Path(first.logger.log_dir).parent == Path(second.logger.log_dir).parent
    assert custom_scalars(first.logger.log_dir).category
    custom_scalars(second.logger.log_dir, layouts=0)  # TensorBoard would merge its charts in as empty duplicates
    assert not scalars(accumulator(second.logger.log_dir))


def test_charts_of_runs_with_other_groups_are_the_same_charts(tmp_path: Path) -> None:
    # TensorBoard merges the layouts of the runs it shows, dropping charts equal to one it has: runs with other
    # groups must give equal charts, or each metric is charted once per run
    other = Net(lambda m: lit_decay.configure_adam(m, lr=0.01, weight_decay=0.1, mode="decoupled_l1"))
    _, first, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2))
    _, second, _ = fit(tmp_path, WeightDecayMonitor(log_every_n_steps=2), module=other)
    charts = [{c.title: c for c in custom_scalars(t.logger.log_dir).category[0].chart} for t in (first, second)]
    assert {t: c for t, c in charts[0].items() if t in charts[1]} == {
        t: c for t, c in charts[1].items() if t in charts[0]
    }


def test_a_metric_first_logged_later_gets_its_chart(tmp_path: Path) -> None:
    # a warm-up of the decay starts at wd = 0: no decay_timescale or equilibrium at step 0, both from step 1 on
    make = lambda m: lit_decay.configure_adam(m, lr=0.01, weight_decay=0.1, mode="decoupled")  # noqa: E731
    scheduler = lit_decay.WeightDecayScheduler(warmup_steps=2)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=4,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[scheduler, WeightDecayMonitor(log_every_n_steps=1), recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(make))
    log_dir = trainer.logger.log_dir
    logged = scalars(accumulator(log_dir))
    assert sorted(logged["decay/decay_timescale/decay"]) == [1, 2, 3]
    configs = [v for v in raw_values(log_dir) if v.tag == "custom_scalars__config__"]
    first = [chart_metric(c) for c in layout_pb2.Layout.FromString(configs[0].tensor.string_val[0]).category[0].chart]
    assert "decay_timescale" not in first and "equilibrium" not in first
    assert charted(log_dir, layouts=2) == [m for m in METRICS if m != "sparsity"]  # the latest, which TensorBoard shows


# ---- the decay report at the end of fit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report_run")
    tb, csv_logger = TensorBoardLogger(tmp, name="tb"), CSVLogger(tmp, name="csv")
    monitor = WeightDecayMonitor(log_every_n_steps=1)
    handler = _Capture()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)
    try:
        _, trainer, _ = fit(tmp, monitor, loggers=[tb, csv_logger], max_steps=12)
    finally:
        rank_zero.removeHandler(handler)
    return {
        "monitor": monitor,
        "csv": csv_metrics(csv_logger.log_dir),
        "tb": accumulator(tb.log_dir),
        "messages": handler.messages,
        "steps": trainer.global_step,
    }


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_every_field_of_the_report_is_the_run_own_logged_figures(report_run: dict[str, Any]) -> None:
    report, columns = report_run["monitor"].report, report_run["csv"]
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # JSON-safe
    # every decayed group, in the optimizer's order; no_decay (mode none) is not decayed
    assert list(report) == ["decay", "sparse", "first"]
    steps = list(range(12))
    for name, entry in report.items():
        assert set(entry) == set(lit_decay.diagnostics.REPORT_FIELDS)
        mode, _ = GROUPS[name]
        norms = columns[f"decay/weight_norm/{name}"]
        assert sorted(norms) == steps
        assert entry["mode"] == mode and entry["run_steps"] == 12 == report_run["steps"]
        assert (entry["first_step"], entry["last_step"]) == (0, 11)
        assert entry["weight_norm_first"] == pytest.approx(norms[0], rel=1e-12)
        assert entry["weight_norm_last"] == pytest.approx(norms[11], rel=1e-12)
        if mode == "decoupled":
            # counted at every step; the last step's lr·wd is its effective decay
            assert entry["decay_progress"] == pytest.approx(columns[f"decay/decay_progress/{name}"][11], rel=1e-12)
            tau = 1 / columns[f"decay/effective_decay/{name}"][11]
            window = [columns[f"decay/equilibrium/{name}"][k] for k in (9, 10, 11)]  # the last quarter: 3 of 12
            assert entry["equilibrium_last"] == pytest.approx(window[-1], rel=1e-12)
            mean = sum(window) / 3
            assert entry["equilibrium_mean_last_quarter"] == pytest.approx(mean, rel=1e-12)
            assert entry["equilibrium_held"] == (abs(mean - 1) <= 0.2)
            assert entry["acted"] == (entry["decay_progress"] >= 1)
        else:
            assert entry["decay_progress"] is None
            assert entry["equilibrium_last"] is entry["equilibrium_mean_last_quarter"] is entry["equilibrium_held"]
            assert entry["equilibrium_held"] is None
            tau = columns[f"decay/decay_timescale/{name}"][11]
            assert entry["acted"] == (tau <= 12)
        assert entry["timescale_over_run"] == pytest.approx(tau / 12, rel=1e-9)
        if mode == "decoupled_l1":
            assert entry["sparsity_last"] == pytest.approx(columns[f"decay/sparsity/{name}"][11], rel=1e-12)
        else:
            assert entry["sparsity_last"] is None
    # lr·wd = 0.05·0.1 for 12 steps: 0.06 e-folds, τ 17× the run, 1 − e^−0.06 of the norm
    first = report["first"]
    assert first["decay_progress"] == pytest.approx(12 * LR * 0.1) and first["acted"] is False
    assert first["advice"] == (
        "τ is 17× the run: decay removed 6% of the weight norm; WeightDecayScheduler(timescale_fraction=0.1) "
        "would make it act."
    )
    for name in ("decay", "sparse"):
        entry = report[name]
        if entry["acted"] is False:
            assert (
                f"penalty removed little of the weight norm; about {entry['timescale_over_run'] * 10:,.0f}×"
                in (entry["advice"])
            )


def test_the_report_is_shown_once_and_written_to_tensorboard(report_run: dict[str, Any]) -> None:
    report = report_run["monitor"].report
    (shown,) = [m for m in report_run["messages"] if "decay report" in m]
    assert shown.startswith("lit_decay: decay report after 12 optimizer steps")
    for name, entry in report.items():
        assert re.search(rf"^  {name} +{entry['mode']} ", shown, flags=re.M), name
        if entry["advice"]:
            assert f"group {name!r}: {entry['advice']}" in shown
    text = text_of(report_run["tb"], "decay/report")
    assert text.startswith("**decay report after 12 optimizer steps")
    assert "| group | mode | e-folds | τ/run |" in text and "| first | decoupled | 0.06 | 17 |" in text
    assert report["first"]["advice"] in text


def test_the_report_of_a_resumed_run_covers_the_whole_run(tmp_path: Path) -> None:
    _, trainer, _ = fit(tmp_path / "a", WeightDecayMonitor(log_every_n_steps=1), loggers="csv", max_steps=4)
    before = csv_metrics(trainer.logger.log_dir)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    assert _plain(torch.load(path, weights_only=True)["callbacks"][WeightDecayMonitor(log_every_n_steps=1).state_key])
    monitor = WeightDecayMonitor(log_every_n_steps=1)
    resumed = L.Trainer(
        max_steps=8,
        logger=CSVLogger(tmp_path / "b", name="csv"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    resumed.fit(Net(), ckpt_path=path)
    after = csv_metrics(resumed.logger.log_dir)
    first = monitor.report["first"]
    assert first["run_steps"] == 8 and (first["first_step"], first["last_step"]) == (0, 7)
    assert first["weight_norm_first"] == pytest.approx(before["decay/weight_norm/first"][0], rel=1e-12)
    assert first["weight_norm_last"] == pytest.approx(after["decay/weight_norm/first"][7], rel=1e-12)
    assert first["decay_progress"] == pytest.approx(8 * LR * 0.1, rel=1e-9)
    window = [after["decay/equilibrium/first"][k] for k in (6, 7)]  # the last quarter of 8 logging steps
    assert first["equilibrium_mean_last_quarter"] == pytest.approx(sum(window) / 2, rel=1e-12)


# ---- a smoke run says nothing it need not ----------------------------------------------------------------------------


def test_the_readme_usage_example_emits_no_lit_decay_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)
    assert "WeightDecayMonitor()" in code and "trainer.fit(" in code
    monkeypatch.chdir(tmp_path)
    package = str(Path(lit_decay.__file__).parent)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in record
        if w.filename.startswith(package) or re.search(r"lit_decay|WeightDecay", str(w.message))
    ]
    assert ours == []
