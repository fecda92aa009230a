"""lit_decay.tensorboard's pieces, then the whole path: a short fit, a real ``tensorboard`` server, its HTTP API."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay import METRICS
from lit_decay.tensorboard import (
    PAGE_ROWS,
    chart_title,
    custom_scalars_layout,
    group_values,
    grouping_markdown,
    parameter_pages,
)

SERVER_START_TIMEOUT_S = 120


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


# ---- custom_scalars_layout ----------------------------------------------------------------------------------------


def test_layout_one_multiline_chart_per_metric() -> None:
    layout = custom_scalars_layout("decay", list(METRICS))
    assert list(layout) == ["decay"]
    assert list(layout["decay"]) == [chart_title(m) for m in METRICS]
    for metric in METRICS:
        kind, regexes = layout["decay"][chart_title(metric)]
        assert kind == "Multiline"
        assert regexes == [f"^decay/{metric}/[^/]+$"]
    (regex,) = layout["decay"][chart_title("weight_norm")][1]
    assert re.search(regex, "decay/weight_norm/no_decay")
    assert re.search(regex, "decay/weight_norm/decay-1")
    assert not re.search(regex, "decay/weight_norm/decay/net.0.weight")  # per-parameter tags stay out
    assert not re.search(regex, "decay/grad_norm/decay")
    assert not re.search(regex, "other/decay/weight_norm/decay")


def test_layout_subset_keeps_given_order() -> None:
    layout = custom_scalars_layout("train/wd", ["sparsity", "weight_norm"])
    assert layout == {
        "train/wd": {
            chart_title("sparsity"): ["Multiline", ["^train/wd/sparsity/[^/]+$"]],
            chart_title("weight_norm"): ["Multiline", ["^train/wd/weight_norm/[^/]+$"]],
        }
    }


def test_every_chart_says_what_its_figure_means() -> None:
    for metric in METRICS:
        title = chart_title(metric)
        assert title.startswith(f"{metric}: ") and len(title) > len(metric) + 10, metric
    # the one figure whose reading needs the theory: 1 where, and why a group may sit elsewhere
    assert "followed by a normalization" in chart_title("equilibrium") and "head" in chart_title("equilibrium")


def test_layout_regex_matches_a_prefix_with_regex_characters() -> None:
    # WeightDecayMonitor accepts any prefix without a leading/trailing "/"; the chart must still find its tags
    monitor = lit_decay.WeightDecayMonitor(prefix="decay+l1")
    _, (regex,) = custom_scalars_layout(monitor.prefix, ["weight_norm"])["decay+l1"][chart_title("weight_norm")]
    assert re.search(regex, "decay+l1/weight_norm/decay")


def test_layout_with_group_names_holding_a_slash() -> None:
    # a group named "enc/dec" is charted; "enc"'s per-parameter tag "enc/dec" would look alike, but no group is
    # named "enc" here, so it is a group tag by construction
    layout = custom_scalars_layout("decay", ["weight_norm"], ["decay", "enc/dec", "a+b"])
    (regex,) = layout["decay"][chart_title("weight_norm")][1]
    for tag in ("decay/weight_norm/decay", "decay/weight_norm/enc/dec", "decay/weight_norm/a+b"):
        assert re.search(regex, tag), tag
    for tag in ("decay/weight_norm/decay/net.0.weight", "decay/weight_norm/enc", "decay/weight_norm/aab"):
        assert not re.search(regex, tag), tag


# ---- grouping_markdown --------------------------------------------------------------------------------------------


GROUP_HEADER = (
    "| group | mode | weight_decay | lr | tensors | elements | τ = 1/(lr·wd) at peak lr (steps) | τ / run |\n"
    + "|---" * 8
    + "|"
)


def test_grouping_markdown_of_configure_adam() -> None:
    model = small_model()
    optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.1, mode="l2")
    text = grouping_markdown([optimizer], [["decay", "no_decay"]])
    parts = text.split("\n\n")
    assert parts == [
        "**optimizer 0: Adam** — Sequential: 6 trainable tensors (74 elements), 0 frozen (0 elements)",
        f"{GROUP_HEADER}\n| decay | l2 | 0.1 | 0.01 | 2 | 48 | – | – |"
        "\n| no_decay | none | 0 | 0.01 | 4 | 26 | – | – |",
        "Adam implementation: fused",
    ]  # l2: no timescale; the per-tensor table is in parameter_pages


def test_grouping_markdown_of_hand_built_optimizers() -> None:
    model = small_model()
    params = list(model.parameters())
    adam = torch.optim.Adam([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], lr=0.003)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-4)
    adamw = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.05, foreach=False)
    text = grouping_markdown([adam, sgd, adamw], [["pg1", "pg2"], ["pg1-1"], ["pg1-2"]])
    parts = text.split("\n\n")
    assert parts == [
        f"**optimizer 0: Adam** ({lit_decay.optim.describe_implementation(adam)})",
        f"{GROUP_HEADER}\n| pg1 | l2 | 0.1 | 0.003 | 2 | 40 | – | – |\n| pg2 | l2 | 0 | 0.003 | 4 | 34 | – | – |",
        f"**optimizer 1: SGD** ({lit_decay.optim.describe_implementation(sgd)})",
        f"{GROUP_HEADER}\n| pg1-1 | sgd | 0.0001 | 0.5 | 6 | 74 | – | – |",
        "**optimizer 2: AdamW** (for-loop)",
        f"{GROUP_HEADER}\n| pg1-2 | decoupled | 0.05 | 0.001 | 6 | 74 | 20,000 | – |",
    ]


def test_grouping_markdown_says_a_scheduler_rewrites_the_strengths() -> None:
    optimizer = lit_decay.configure_adam(small_model(), lr=0.01, weight_decay=0.5)
    assert "WeightDecayScheduler" not in grouping_markdown([optimizer], [["decay", "no_decay"]])
    text = grouping_markdown([optimizer], [["decay", "no_decay"]], scheduled=True)
    assert "A WeightDecayScheduler sets weight_decay during training" in text


def test_grouping_markdown_timescale_against_the_run() -> None:
    model = small_model()
    optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.5, mode="decoupled")
    # a warmup schedule starts the lr at 0: the timescale is that of the peak lr, 1/(0.01·0.5) = 200 steps
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 10))
    text = grouping_markdown([optimizer], [["decay", "no_decay"]], run_steps=1000)
    assert "| decay | decoupled | 0.5 | 0 | 2 | 48 | 200 | 0.2 |" in text  # the lr is 0 now, 0.01 at its peak
    assert "| no_decay | none | 0 | 0 | 4 | 26 | – | – |" in text


def test_grouping_markdown_of_a_lazy_module() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    text = grouping_markdown([optimizer], [["pg1"]])
    assert "| pg1 | decoupled | 0.1 | 0.001 | 4 | ? | 10,000 | – |" in text
    (page,) = parameter_pages([optimizer], [["pg1"]], {id(model[0].weight): "0.weight"})
    assert "| 0.weight | ? | ? | pg1 |" in page


# ---- parameter_pages ----------------------------------------------------------------------------------------------


def test_parameter_pages_hold_the_whole_table_a_card_at_a_time() -> None:
    # 32 tensors: TensorBoard shows a text in a card 500 pixels high, so the table comes in pages of PAGE_ROWS rows
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(15)), nn.LayerNorm(2))
    optimizer = lit_decay.configure_adam(model, weight_decay=0.1, verbose=False)
    pages = parameter_pages([optimizer], [["decay", "no_decay"]])
    assert len(pages) == -(-32 // PAGE_ROWS) == 3
    table = lit_decay.configure.report_of(optimizer).parameter_table(with_frozen=True).markdown_lines()
    rows: list[str] = []
    for number, page in enumerate(pages):
        title, _, lines = page.split("\n", 2)
        first, last = number * PAGE_ROWS + 1, min((number + 1) * PAGE_ROWS, 32)
        assert title == f"**optimizer 0: Adam**, tensors {first}–{last} of 32"
        header, separator, *body = lines.split("\n")
        assert [header, separator] == table[:2] and 0 < len(body) <= PAGE_ROWS
        rows += body
    assert rows == table[2:]


# ---- group_values -------------------------------------------------------------------------------------------------


def test_group_values_flat_float_on_host() -> None:
    a = torch.arange(6.0).reshape(2, 3)
    b = torch.tensor([-1.5, 2.5], dtype=torch.bfloat16)
    values = group_values({"params": [a, b]})
    assert values.dtype == torch.float32 and values.device.type == "cpu"
    assert values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -1.5, 2.5]
    assert group_values({"params": []}).numel() == 0


# ---- end to end through a real TensorBoard server -----------------------------------------------------------------


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_model()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, lr=0.05, weight_decay=0.1, mode="decoupled")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)), batch_size=4)


class WeightNorms(L.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        decay = trainer.optimizers[0].param_groups[0]
        assert decay["name"] == "decay"
        flat = torch.cat([p.detach().double().reshape(-1) for p in decay["params"]])
        # keyed by the step value Lightning logs this batch's metrics at
        self.by_step[trainer.fit_loop.epoch_loop._batches_that_stepped] = float(torch.linalg.vector_norm(flat))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(base: str, path: str, **query: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


def test_tensorboard_server_shows_our_tags_and_layout(tmp_path: Path) -> None:
    norms = WeightNorms()
    logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    trainer = L.Trainer(
        max_steps=6,
        logger=logger,
        callbacks=[lit_decay.WeightDecayMonitor(log_every_n_steps=2), norms],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net())
    run = Path(logger.log_dir).relative_to(tmp_path / "logs").as_posix()
    assert run == "tb/version_0"

    executable = Path(sys.executable).with_name("tensorboard")
    assert executable.exists(), executable
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "tensorboard.log"
    command = [
        str(executable),
        "--logdir",
        str(tmp_path / "logs"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast=false",
        "--reload_interval",
        "1",
    ]
    with open(log_file, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        # ready once our series have been loaded and stay the same across a reload (no half-read file)
        tags: dict[str, Any] = {}
        series: dict[str, Any] = {}
        previous: dict[str, Any] | None = None
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited early:\n{log_file.read_text()}"
            try:
                tags = get_json(base, "/data/plugin/scalars/tags")
                if {"decay/weight_norm/decay", "decay/effective_decay/decay"} <= set(tags.get(run, {})):
                    series = {
                        tag: get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)
                        for tag in ("decay/weight_norm/decay", "decay/effective_decay/decay")
                    }
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                series = {}
            if series and series == previous:
                break
            previous = series or None
            time.sleep(1.5)
        else:
            pytest.fail(f"tensorboard did not serve our run within {SERVER_START_TIMEOUT_S}s:\n{log_file.read_text()}")

        expected_tags = {
            f"decay/{metric}/{group}"
            for metric in ("weight_norm", "grad_norm", "update_ratio", "effective_decay", "weight_decay")
            for group in ("decay", "no_decay")
        } | {"decay/decay_timescale/decay", "decay/equilibrium/decay", "decay/decay_progress/decay"}
        assert {t for t in tags[run] if t.startswith("decay/")} == expected_tags

        points = series["decay/weight_norm/decay"]
        assert [step for _, step, _ in points] == [1, 3, 5]
        for _, step, value in points:
            assert value == pytest.approx(norms.by_step[step], rel=1e-6)
        points = series["decay/effective_decay/decay"]
        assert [value for _, _, value in points] == pytest.approx([0.05 * 0.1] * 3, rel=1e-6)
        # the group's strength, as LearningRateMonitor shows lr
        strengths = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="decay/weight_decay/decay")
        assert [value for _, _, value in strengths] == pytest.approx([0.1] * 3)

        layout = get_json(base, "/data/plugin/custom_scalars/layout")
        (category,) = layout["category"]
        assert category["title"] == "decay"
        charts = {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
        # every chart has curves: no sparsity chart in a run without an L1 group
        logged = [m for m in METRICS if m != "sparsity"]
        assert list(charts) == [chart_title(m) for m in logged]
        for metric in logged:
            assert charts[chart_title(metric)] == [f"^decay/{metric}/[^/]+$"]

        # torch's SummaryWriter.add_text files the text under "<tag>/text_summary"; each text is short enough for
        # TensorBoard's text card, which scrolls what is longer than 500 pixels in a box of its own
        text_tags = {"decay/grouping", "decay/parameters/1", "decay/report"}
        assert {f"{t}/text_summary" for t in text_tags} <= set(get_json(base, "/data/plugin/text/tags")[run])
        texts = {
            t: get_json(base, "/data/plugin/text/text", run=run, tag=f"{t}/text_summary")[0]["text"] for t in text_tags
        }
        assert "Adam implementation: fused" in texts["decay/grouping"]
        assert "τ = 1/(lr·wd)" in texts["decay/grouping"]
        assert "normalization layer LayerNorm" in texts["decay/parameters/1"]
        assert "decay report after 6 optimizer steps" in texts["decay/report"]
        # TensorBoard renders them as HTML tables, none longer than a page
        assert all("<table>" in text for text in texts.values())
        assert max(text.count("<tr>") for text in texts.values()) <= PAGE_ROWS + 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
    assert server.returncode is not None
