"""WeightDecayMonitor in real ``Trainer.fit`` runs: what lands in TensorBoard's event files and CSVLogger's
metrics.csv, checked against weights, gradients and optimizer state recorded at the same steps."""

from __future__ import annotations

import csv
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


class Recorder(L.Callback):
    """Copies every group's weights, gradients and Adam state at the first batch end of each global step.

    Placed after the monitor in ``callbacks``, it sees the same post-step weights the monitor measured.
    """

    def __init__(self) -> None:
        self.steps: dict[int, list[dict[str, Any]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            # an accumulating batch after the step: same weights, but its gradients are not the ones that stepped
            return
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
                        "grads": [None if p.grad is None else p.grad.detach().double().clone() for p in params],
                        "state": [
                            {k: v.detach().double().clone() for k, v in optimizer.state.get(p, {}).items()}
                            for p in params
                        ],
                    }
                )
            optimizers.append(groups)
        self.steps[trainer.global_step] = optimizers


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
        return sum(float((w.abs() * w.abs().clamp(max=lr * wd)).sum()) for w in weights) / w2
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
            tags.add(f"{prefix}/{metric}/{group}")
    return tags


def test_every_tag_at_the_logging_steps(main_run: dict[str, Any]) -> None:
    logged = scalars(main_run["tb"])
    group_tags = {t for t in logged if t.count("/") == 2}
    assert group_tags == expected_group_tags()
    for tag in logged:
        assert sorted(logged[tag]) == [2, 4, 6], tag


def test_weight_and_grad_norms_match_recorded(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in (2, 4, 6):
        for name, group in zip(main_run["groups"], recorded[step][0]):
            assert logged[f"decay/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
            grads = [g for g in group["grads"] if g is not None]
            assert logged[f"decay/grad_norm/{name}"][step] == pytest.approx(norm(grads), rel=1e-5)


def test_update_ratio_from_consecutive_steps(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in (2, 4, 6):
        for name, now, previous in zip(main_run["groups"], recorded[step][0], recorded[step - 1][0]):
            delta = norm([a - b for a, b in zip(now["weights"], previous["weights"])])
            assert logged[f"decay/update_ratio/{name}"][step] == pytest.approx(
                delta / norm(now["weights"]), rel=1e-4
            ), name


def test_effective_decay_and_sparsity_match_formulas(main_run: dict[str, Any]) -> None:
    logged, recorded = scalars(main_run["tb"]), main_run["recorder"].steps
    for step in (2, 4, 6):
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
    assert logged["decay/sparsity/sparse"][6] > 0


def test_csv_logger_gets_the_same_figures(main_run: dict[str, Any]) -> None:
    logged, columns = scalars(main_run["tb"]), main_run["csv"]
    decay_columns = {c for c in columns if c.startswith("decay/")}
    assert decay_columns == set(logged)
    for tag, by_step in logged.items():
        assert sorted(columns[tag]) == [2, 4, 6]
        for step, value in by_step.items():
            assert columns[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    # CSV keeps float64: compare the l2 group's effective decay to the formula more tightly
    recorded = main_run["recorder"].steps
    for step in (2, 4, 6):
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
            w = recorded[4][0][group_index]["weights"][i]
            assert logged[f"decay/weight_norm/{group}/{name}"][4] == pytest.approx(norm([w]), rel=1e-6)


def test_histograms(main_run: dict[str, Any]) -> None:
    ea, recorded = main_run["tb"], main_run["recorder"].steps
    assert set(ea.Tags()["histograms"]) == {f"decay/histogram/{g}" for g in GROUPS}
    for index, group in enumerate(main_run["groups"]):
        events = ea.Histograms(f"decay/histogram/{group}")
        assert [e.step for e in events] == [2, 4, 6]
        for event in events:
            weights = recorded[event.step][0][index]["weights"]
            assert event.histogram_value.num == sum(w.numel() for w in weights)
            assert event.histogram_value.sum_squares == pytest.approx(norm(weights) ** 2, rel=1e-5)


def test_grouping_text_summary(main_run: dict[str, Any]) -> None:
    ea = main_run["tb"]
    assert "decay/grouping/text_summary" in ea.Tags()["tensors"]
    (event,) = ea.Tensors("decay/grouping/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "Adam implementation: fused" in text
    assert "| decay | l2 | 0.1 |" in text
    assert "| sparse | decoupled_l1 | 0.5 |" in text
    assert "| net.1.weight | (16,) | 16 | no_decay | normalization layer LayerNorm |" in text
    assert "| net.0.weight | (16, 4) | 64 | first | override 'first' (net.0.weight) |" in text


def custom_scalars(log_dir: str | Path) -> layout_pb2.Layout:
    configs = [v for v in raw_values(log_dir) if v.tag == "custom_scalars__config__"]
    assert len(configs) == 1, "one custom-scalars layout per run"
    return layout_pb2.Layout.FromString(configs[0].tensor.string_val[0])


def test_custom_scalars_layout(main_run: dict[str, Any]) -> None:
    layout = custom_scalars(main_run["tb_dir"])
    (category,) = layout.category
    assert category.title == "decay"
    assert [chart.title for chart in category.chart] == list(METRICS)
    tags = set(scalars(main_run["tb"]))
    for chart in category.chart:
        (regex,) = chart.multiline.tag
        assert regex == f"^decay/{chart.title}/[^/]+$"
        # one chart holds exactly that metric's group tags, none of the per-parameter ones
        matched = {t for t in tags if re.search(regex, t)}
        assert matched == {t for t in expected_group_tags() if t.split("/")[1] == chart.title}


# ---- options ------------------------------------------------------------------------------------------------------


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
            assert sorted(by_step) == [3, 6], tag
    groups = [g["name"] for g in trainer.optimizers[0].param_groups]
    for step in (3, 6):
        for name, group in zip(groups, recorder.steps[step][0]):
            assert logged[f"wd/weight_norm/{name}"][step] == pytest.approx(norm(group["weights"]), rel=1e-6)
    layout = custom_scalars(log_dir)
    assert [(c.title, [ch.title for ch in c.chart]) for c in layout.category] == [("wd", ["weight_norm", "sparsity"])]
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
    # two optimizer steps per batch: Lightning's global step moves by two, the monitor logs every second batch
    steps = sorted(recorder.steps)
    logging_steps = steps[1::2]
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
        assert sorted(logged[tag]) == [2, 4, 6], tag
    for step in (2, 4, 6):
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
    # the s-th optimizer step runs with lr = LR * 0.5**(s - 1); the scheduler moves it after the step
    assert logged["decay/effective_decay/first"] == pytest.approx(
        {s: LR * 0.5 ** (s - 1) * 0.1 for s in (1, 2, 3, 4)}, rel=1e-6
    )
    groups = [g["name"] for g in trainer.optimizers[0].param_groups]
    for step in (1, 2, 3, 4):
        # by the batch end Lightning has already stepped the scheduler, so the recorded lr is the next one
        decay = {**recorder.steps[step][0][groups.index("decay")], "lr": LR * 0.5 ** (step - 1)}
        assert logged["decay/effective_decay/decay"][step] == pytest.approx(effective_decay(decay, "l2", 0.1), rel=1e-5)


# ---- audit --------------------------------------------------------------------------------------------------------


def audit_messages(record: list[warnings.WarningMessage]) -> list[str]:
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


def test_audit_hand_built_l1_groups_without_the_penalty(tmp_path: Path) -> None:
    module = Net(lambda m: torch.optim.Adam(lit_decay.param_groups(m, weight_decay=0.1, mode="l1"), lr=0.01))
    with pytest.warns(UserWarning, match="no L1 term") as record:
        fit(tmp_path, WeightDecayMonitor(), module=module, loggers="csv", max_steps=1)
    (message,) = audit_messages(record.list)
    assert "decay (l1)" in message
    assert "no decay" in message and "configure_adam" in message


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
    assert "weight_norm of group 'decay' is nan at step 2" in messages[0]
    columns = nan_run["csv"]
    assert sorted(columns["decay/weight_norm/decay"]) == [2, 4, 6]
    assert all(math.isnan(v) for v in columns["decay/weight_norm/decay"].values())
    assert all(math.isfinite(v) for v in columns["decay/weight_norm/no_decay"].values())


def test_nonfinite_raise_names_group_and_metric(tmp_path: Path) -> None:
    monitor = WeightDecayMonitor(log_every_n_steps=2, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"weight_norm of group 'decay' is nan at step 2"):
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
    assert state == {"warned_nonfinite": ["decay"]}
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
        for m in ("weight_norm", "grad_norm", "update_ratio", "effective_decay")
        for g in GROUPS
        if g in ("decay", "no_decay")
    } | {"decay/decay_timescale/decay"}
    assert {t for t in logged if t.count("/") == 3} == {
        f"decay/{m}/decay/{n}" for m in PER_PARAMETER for n in decay_names
    } | {f"decay/{m}/no_decay/{n}" for m in PER_PARAMETER for n in names if n not in decay_names}
    for tag in logged:
        assert sorted(logged[tag]) == [1, 2, 3], tag
    assert logged["decay/effective_decay/decay"][3] == pytest.approx(0.02 * 0.1, rel=1e-6)
    assert logged["decay/weight_norm/decay"][3] == pytest.approx(
        norm([names[n].detach().double() for n in decay_names]), rel=1e-6
    )
