"""The examples run end to end (``--fast``) and write the TensorBoard figures and reports their docstrings promise."""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lit_decay

ROOT = Path(__file__).resolve().parents[1]
DECAY_TAGS = {
    f"decay/{metric}/{group}"
    for metric in ("weight_norm", "grad_norm", "update_ratio", "effective_decay")
    for group in ("decay", "no_decay")
} | {"decay/decay_timescale/decay"}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def tree_state() -> dict[str, int]:
    """The modification time of every tracked file, and every untracked file git does not ignore (as -1).

    Equal before and after a run means the run rewrote no tracked file (even with the same content) and left nothing
    that ``git status`` would show: its outputs all went to the folders it was given or to ignored ones.
    """
    tracked = {path: (ROOT / path).stat().st_mtime_ns for path in _git("ls-files", "-z").split("\0") if path}
    untracked = dict.fromkeys(_git("ls-files", "-z", "--others", "--exclude-standard").split("\0"), -1)
    untracked.pop("", None)
    return tracked | untracked


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>.py --fast ARGS`` from the repository root; its stdout and stderr together.

    It is also checked to leave the work tree as it found it.
    """
    before = tree_state()
    # subprocess.run kills the child when the timeout expires.
    proc = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--fast", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"examples/{name}.py --fast failed:\n{output[-4000:]}"
    after = tree_state()
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"examples/{name}.py wrote into the work tree: {changed}"
    return output


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensor_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["tensors"])


def test_quickstart_logs_decay_figures_and_prints_how_to_open_them(tmp_path: Path) -> None:
    output = run_example("quickstart", "--logdir", str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    logged = scalars(run_dir)

    assert set(logged) >= DECAY_TAGS
    assert {"train/loss", "val/loss", "val/acc"} <= set(logged)
    assert not any("sparsity" in tag for tag in logged)  # decoupled mode: no L1 group
    # Decoupled decay removes exactly lr·wd of the weight norm per step (quickstart's defaults: 3e-3 and 2.0).
    assert [value for _, value in logged["decay/effective_decay/decay"]] == pytest.approx(
        [3e-3 * 2.0] * len(logged["decay/effective_decay/decay"]), rel=1e-5
    )
    # Σ lr·wd over every step so far: the step value s is logged after s + 1 steps.
    assert [value for _, value in logged["decay/decay_progress/decay"]] == pytest.approx(
        [(step + 1) * 3e-3 * 2.0 for step, _ in logged["decay/decay_progress/decay"]], rel=1e-5
    )
    assert "decay/equilibrium/decay" in logged
    assert all(value == 0 for _, value in logged["decay/effective_decay/no_decay"])
    assert {"custom_scalars__config__", "decay/grouping/text_summary"} <= tensor_tags(run_dir)

    final = float(re.search(r"Final validation accuracy: ([0-9.]+)", output).group(1))
    assert final == pytest.approx(logged["val/acc"][-1][1], abs=5e-4)
    assert final > 0.5  # two epochs already learn the digits; chance is 0.1
    assert re.search(r"decay\s+decoupled\s+2\s+2\s+9,472", output)  # the grouping summary of configure_adam
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in output


def test_char_gpt_prints_the_grouping_table_and_decay_follows_the_lr_schedule(tmp_path: Path) -> None:
    output = run_example("char_gpt", "--logdir", str(tmp_path / "runs"))
    logged = scalars(tmp_path / "runs" / "char_gpt" / "version_0")

    assert set(logged) >= DECAY_TAGS
    assert {"train/loss", "val/loss", "lr-Adam/decay"} <= set(logged)
    # lit_decay.explain: the tied embedding is listed once with its alias; LayerNorm and biases are kept out.
    assert re.search(r"model\.tok_emb\.weight .*decay\s+embedding; tied to model\.lm_head\.weight", output)
    assert re.search(r"model\.ln_f\.weight .*no_decay\s+normalization layer LayerNorm", output)
    assert re.search(r"model\.blocks\.0\.attn\.qkv\.bias .*no_decay\s+bias", output)
    # Decoupled decay is lr·wd with the lr of that step, so it follows the cosine schedule down (wd = 0.1).
    lrs = [value for _, value in logged["lr-Adam/decay"]]
    effective = [value for _, value in logged["decay/effective_decay/decay"]]
    assert len(effective) == len(lrs) == 4  # 20 steps, logged every 5
    assert effective == pytest.approx([0.1 * lr for lr in lrs], rel=1e-4)
    assert effective == sorted(effective, reverse=True) and effective[0] > 10 * effective[-1]

    sample = output.split("Sample (temperature 0.8):\n\n", 1)[1].split("\n\nLogged to", 1)[0]
    assert sample.startswith("And God said") and len(sample) == len("And God said") + 300
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in output


def test_compare_modes_writes_one_run_per_mode_and_a_report_from_the_runs(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    docs_report = ROOT / "docs" / "modes_comparison.md"
    docs_before = docs_report.stat().st_mtime_ns if docs_report.exists() else None
    run_example("compare_modes", "--logdir", str(tmp_path / "runs"), "--out-dir", str(out_dir))

    runs = tmp_path / "runs" / "compare_modes"
    assert sorted(p.name for p in runs.iterdir()) == sorted(lit_decay.MODES)
    logged = {mode: scalars(runs / mode) for mode in lit_decay.MODES}
    for mode, tags in logged.items():
        assert {"decay/weight_norm/decay", "decay/effective_decay/decay", "val/acc", "train_eval/acc"} <= set(tags)
        has_sparsity = "decay/sparsity/decay" in tags
        assert has_sparsity == (mode in ("l1", "decoupled_l1")), mode
    assert all(value == 0 for _, value in logged["none"]["decay/effective_decay/decay"])
    # decoupled at its default wd = 1 and lr = 1e-3.
    assert all(value == pytest.approx(1e-3) for _, value in logged["decoupled"]["decay/effective_decay/decay"])
    # Every mode starts from the same weights and batches: the first logged weight norm differs only by the decay.
    first_norms = [logged[mode]["decay/weight_norm/decay"][0][1] for mode in lit_decay.MODES]
    assert max(first_norms) - min(first_norms) < 0.05 * min(first_norms)
    assert logged["none"]["decay/weight_norm/decay"][0][1] == max(first_norms)

    # Everything it writes is in the two folders it was given.
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()) == [
        "img/modes_comparison.png",
        "modes_comparison.md",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]
    report = (out_dir / "modes_comparison.md").read_text(encoding="utf-8")
    image = out_dir / "img" / "modes_comparison.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    assert "](img/modes_comparison.png)" in report
    assert f".venv/bin/python examples/compare_modes.py --fast --logdir {tmp_path / 'runs'} --out-dir" in report
    assert "## What the runs show" in report and f"torch {__import__('torch').__version__}" in report
    # The table's figures are the runs' own: its val acc column is the last val/acc each run logged.
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| ")}
    for mode in lit_decay.MODES:
        assert float(rows[mode][3]) == pytest.approx(logged[mode]["val/acc"][-1][1], abs=5e-4), mode
    assert rows["none"][10].strip() == "0.0%"
    assert (docs_report.stat().st_mtime_ns if docs_report.exists() else None) == docs_before


def test_char_gpt_with_a_timescale_fraction_holds_tau_and_reports_that_decay_acted(tmp_path: Path) -> None:
    # the example the "Choosing weight decay" page runs: τ = 0.1 · 40 = 4 steps under the cosine lr schedule
    output = run_example("char_gpt", "--steps", "40", "--timescale-fraction", "0.1", "--logdir", str(tmp_path / "runs"))
    logged = scalars(tmp_path / "runs" / "char_gpt" / "version_0")
    lrs, strengths = dict(logged["lr-Adam/decay"]), dict(logged["decay/weight_decay/decay"])
    assert sorted(strengths) == [4, 9, 14, 19, 24, 29, 34, 39]
    for step, strength in strengths.items():
        assert strength * lrs[step] * 4 == pytest.approx(1.0, rel=1e-5), step
    assert lrs[4] > 10 * lrs[39] and strengths[39] > 10 * strengths[4]  # wd rises as the cosine lr falls
    report = output.split("lit_decay: decay report after 40 optimizer steps", 1)[1]
    assert re.search(r"^  decay +decoupled +10 +0\.1 .* yes$", report, flags=re.M)


class _Stop(Exception):
    """Ends a fit once the grouping summary is out: the quickstart's full training is not needed to read it."""


class _StopAfterFirstBatch(L.Callback):
    def on_train_batch_end(self, *args: object) -> None:
        raise _Stop


@pytest.mark.parametrize(("argv", "advised"), [(["--weight-decay", "0.05"], True), ([], False)])
def test_quickstart_decay_timescale_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: list[str], advised: bool
) -> None:
    # The quickstart's former wd = 0.05 gives τ = 1/(3e-3 · 0.05) ≈ 6,700 steps in a run of 440: the decay would
    # barely act. The grouping summary and TensorBoard's text say so, as information: no warning. Its present
    # defaults put τ well inside the run.
    from examples._common import DigitsDataModule
    from examples.quickstart import DigitClassifier, parse_args

    args = parse_args(argv)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[lit_decay.WeightDecayMonitor(), _StopAfterFirstBatch()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = DigitsDataModule(batch_size=args.batch_size, train_size=0.8, seed=args.seed)
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO), pytest.raises(_Stop):
        warnings.simplefilter("always")
        trainer.fit(DigitClassifier(lr=args.lr, weight_decay=args.weight_decay), datamodule=data)
    assert trainer.estimated_stepping_batches == 440
    assert not [w for w in record if "lit_decay" in w.filename or "timescale" in str(w.message)]
    (summary,) = [r.getMessage() for r in caplog.records if "trainable tensors" in r.getMessage()]
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (text,) = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("decay/grouping/text_summary")]
    advice = (
        "group 'decay': τ = 1/(lr·wd) = 6,667 steps is 15× the run of 440 steps: decay can remove at most 6% of the "
        "weight norm; WeightDecayScheduler(timescale_fraction=0.1) would make it act."
    )
    if advised:
        assert advice in summary and advice in text
    else:
        assert "× the run" not in summary and "× the run" not in text
        assert 1 / (args.lr * args.weight_decay) < trainer.estimated_stepping_batches / 2


@pytest.mark.parametrize("name", ["quickstart", "char_gpt", "compare_modes"])
def test_examples_write_only_to_ignored_folders_by_default_and_say_how_to_run_them(name: str) -> None:
    module = importlib.import_module(f"examples.{name}")
    args = module.parse_args([])
    outputs = [args.logdir, *([args.out_dir] if hasattr(args, "out_dir") else [])]
    assert outputs == ["runs", *(["runs/compare_modes"] if name == "compare_modes" else [])]
    for folder in outputs:
        # check-ignore exits 0 when git ignores the path: what the example writes there never shows as a change.
        probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x"], cwd=ROOT, check=False)
        assert probe.returncode == 0, f"{folder}/ is not git-ignored"
    # The documented command uses the environment that scripts/setup.sh made, where lightning is installed.
    doc = module.__doc__
    assert f".venv/bin/python examples/{name}.py" in doc
    assert not re.search(rf"^\s+python examples/{name}\.py", doc, flags=re.M)


def test_examples_import_without_running() -> None:
    # Importing must not train or write anything: main() is behind `if __name__ == "__main__"`.
    from examples import char_gpt, compare_modes, quickstart

    assert callable(quickstart.main) and callable(char_gpt.main)
    assert set(compare_modes.DEFAULT_WEIGHT_DECAY) == set(lit_decay.MODES)
    assert compare_modes.parse_weight_decay(["l2=0.5"])["l2"] == 0.5
    with pytest.raises(SystemExit, match="MODE=VALUE"):
        compare_modes.parse_weight_decay(["adamw=0.1"])


def test_compare_modes_findings_are_read_from_the_results() -> None:
    from examples.compare_modes import MODES, Result, findings

    def result(mode: str, val_acc: float, val_loss: float, sparsity: float = 0.0) -> Result:
        final = {
            "val_acc": val_acc,
            "train_acc": 1.0,
            "val_loss": val_loss,
            "train_loss": 0.01,
            "weight_norm": 10.0 + len(mode),
            "sparsity": sparsity,
            "near_zero": 0.3 if mode == "l1" else 0.0,
            "val_acc_std": 0.004,
            "val_loss_min": val_loss / 2 if mode == "none" else val_loss,
            "val_loss_min_step": 600.0,
            "train_images": 100.0,
            "val_images": 1000.0,
        }
        return Result(mode, 0.1, {}, final)

    losses = {"none": 0.5, "l2": 0.3, "decoupled": 0.4, "l1": 0.45, "decoupled_l1": 0.6}
    results = [result(m, 0.9, losses[m], 0.7 if m == "decoupled_l1" else 0.0) for m in MODES]
    text = findings(results)
    assert "reaches 0.900 validation accuracy; its validation loss bottoms out at 0.250 around step 600" in text
    assert "l2, decoupled, l1 end with a lower validation loss (lowest: l2, 0.300 against 0.500)" in text
    assert "decoupled_l1 70.0%" in text and "ends 40% lower than no decay" in text
    assert "spans 0.900 to 0.900" in text and "±0.004" in text
    assert "30% of l1's decayed weights end within ±lr of zero (no decay: 0%)" in text
    assert "l2, decoupled, l1 narrow the loss gap (val − train); no mode narrows the accuracy gap" in text
    assert "differences between modes are of the size of one run's own fluctuation" in text
    assert "Stopping the undecayed run at its best step (validation loss 0.250)" in text
