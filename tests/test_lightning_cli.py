"""docs/lightning_cli.md's ``main.py`` under a real ``LightningCLI``: its commands, its config file, and what
``--optimizer AdamW`` does to the grouping (its audit message is the one the page shows).

The page's code is read from the page itself, so the page and these tests cannot drift apart. Every fit is bounded
to a few steps of the page's 256-sample random data.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lit_decay
from lit_decay.audit import audit_messages
from tests.test_docs import DOCS, blocks_of

PAGE = DOCS / "lightning_cli.md"
BLOCKS = blocks_of(PAGE)
MAIN = next(b.code for b in BLOCKS if b.language == "python" and b.code.startswith("# main.py"))
CONFIG = next(b.code for b in BLOCKS if b.language == "yaml")
COMMANDS = [
    shlex.split(line, comments=True)[2:]  # after "python main.py"
    for b in BLOCKS
    if b.language == "bash"
    for line in b.code.splitlines()
    if line.startswith("python main.py ")
]
AUDIT_SHOWN = next(b.code.strip() for b in BLOCKS if b.language == "text" and "WeightDecayMonitor audit" in b.code)
# What the tests add to a page's command so that it stays a smoke run that writes only under tmp_path.
BOUNDED = shlex.split("--trainer.max_steps 3 --trainer.enable_progress_bar false --trainer.enable_model_summary false")


@pytest.fixture
def main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The page's main.py, imported from a file (so that jsonargparse can read its source), run in tmp_path."""
    monkeypatch.chdir(tmp_path)
    # As `python main.py ...` would see it; pytest's own options would otherwise meet the given args.
    monkeypatch.setattr(sys, "argv", ["main.py"])
    path = tmp_path / "main.py"
    path.write_text(MAIN, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("lit_decay_docs_main", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def cli(main: ModuleType, args: list[str], **kwargs: object) -> LightningCLI:
    """main.py's LightningCLI, as its ``__main__`` block builds it, with ``args`` as the command line."""
    defaults = {"max_epochs": 5, "callbacks": [lit_decay.WeightDecayMonitor()]}
    return LightningCLI(main.Classifier, main.RandomData, trainer_defaults=defaults, args=args, **kwargs)


def groups(optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, str, list[str]]]:
    return {g["name"]: (g["weight_decay"], g["decay_mode"], g["param_names"]) for g in optimizer.param_groups}


NO_DECAY = ["net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"]


def test_the_page_shows_the_commands_this_file_runs() -> None:
    assert ["fit", "--model.weight_decay", "0.05", "--model.mode", "decoupled_l1"] in COMMANDS
    assert ["fit", "--help"] in COMMANDS
    assert any("--optimizer" in command for command in COMMANDS)
    assert "__main__" in MAIN and "LightningCLI(" in MAIN and "trainer_defaults=" in MAIN


def test_cli_options_reach_configure_adam(main: ModuleType) -> None:
    built = cli(main, shlex.split("--model.weight_decay 0.05 --model.mode decoupled_l1 --model.lr 0.002"), run=False)
    optimizer = built.model.configure_optimizers()
    assert isinstance(optimizer, lit_decay.Adam)
    assert groups(optimizer) == {
        "decay": (0.05, "decoupled_l1", ["net.0.weight", "net.3.weight"]),
        "no_decay": (0.0, "none", NO_DECAY),
    }
    assert {g["lr"] for g in optimizer.param_groups} == {0.002}
    assert audit_messages(built.model, [optimizer]) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [c for c in COMMANDS if "--help" not in c], ids=shlex.join)
def test_each_command_of_the_page_trains(main: ModuleType, command: list[str]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        built = cli(main, [*command, *BOUNDED])
    assert built.trainer.global_step == 3
    (optimizer,) = built.trainer.optimizers
    audit = [str(w.message) for w in record if "WeightDecayMonitor audit" in str(w.message)]
    if "--optimizer" not in command:
        assert groups(optimizer)["decay"][:2] == (0.05, "decoupled_l1")
        assert groups(optimizer)["no_decay"][2] == NO_DECAY
        assert not [m for m in audit if "normalization or bias" in m]
        return
    # LightningCLI built the optimizer over model.parameters(): one group, the biases and the norm decayed.
    assert type(optimizer) is torch.optim.AdamW
    ((group),) = optimizer.param_groups
    assert group["weight_decay"] == 0.01 and len(group["params"]) == 6
    messages = audit_messages(built.model, [optimizer])
    assert all(name in messages[0] for name in NO_DECAY)
    # The monitor warned it at fit start, word for word as the page shows it.
    assert AUDIT_SHOWN in audit
    assert any("configure_optimizers` will be overridden" in str(w.message) for w in record)


def test_optimizer_lit_decay_adam_is_no_grouping_either(main: ModuleType) -> None:
    built = cli(main, ["--optimizer", "lit_decay.Adam"], run=False)
    optimizer = built.model.configure_optimizers()
    assert isinstance(optimizer, lit_decay.Adam) and len(optimizer.param_groups) == 1
    (message,) = audit_messages(built.model, [optimizer])
    assert all(name in message for name in NO_DECAY)


def test_help_lists_the_module_options(main: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli(main, ["fit", "--help"])
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--model.lr", "--model.weight_decay", "--model.mode"))


def test_a_mode_outside_the_literal_is_refused(main: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli(main, ["--model.mode", "adamw"], run=False)
    assert stopped.value.code != 0
    assert "decoupled_l1" in capsys.readouterr().err


def test_the_config_file_of_the_page(main: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG, encoding="utf-8")
    built = cli(main, ["--config", "config.yaml"], run=False)
    optimizer = built.model.configure_optimizers()
    assert groups(optimizer)["decay"][:2] == (0.1, "decoupled")
    assert {g["lr"] for g in optimizer.param_groups} == {0.0003}
    assert built.trainer.max_epochs == 5


def test_lr_scheduler_alone_leaves_the_module_optimizer(main: ModuleType) -> None:
    built = cli(main, ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "10"], run=False)
    assert isinstance(built.model.configure_optimizers(), lit_decay.Adam)


def test_without_automatic_optimizers_the_bypass_is_an_error(
    main: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "auto_configure_optimizers=False" in PAGE.read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        cli(main, ["--optimizer", "AdamW"], run=False, auto_configure_optimizers=False)
    assert stopped.value.code != 0
    assert "--optimizer" in capsys.readouterr().err
