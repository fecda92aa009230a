"""configure_adam and WeightDecayMonitor in two-process CPU training: Lightning DDP and FSDP2 (ModelParallelStrategy).

Each fit runs tests/distributed/fit_run.py in a subprocess (gloo on CPU); the script saves the whole weights, the
last step's Adam state and what every rank handed its loggers. Here, in a single process, the same figures are
computed from those weights with the formulas of docs/monitoring.md, and the same training is replayed on the global
batch.
Both fits start together (they take ~30-60 s each, mostly importing torch and Lightning in 2 processes apiece).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lit_decay

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "fit_run.py"
RUN_TIMEOUT_S = 240
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # configure_adam's defaults
PREFIX = "decay"

_spec = importlib.util.spec_from_file_location("lit_decay_fit_run", SCRIPT)
assert _spec is not None and _spec.loader is not None
fit_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_run)

# One optimizer mixing modes through overrides, so a single fit covers several of them.
DDP_CONFIG: dict[str, Any] = {
    "strategy": "ddp",
    "steps": 4,
    "batch_size": 4,
    "log_every_n_steps": 2,
    "per_parameter": False,
    "histograms": True,
    "adam": {
        "lr": 0.01,
        "weight_decay": 0.05,
        "mode": "l1",
        "overrides": [
            {"pattern": "model.mid.weight", "name": "mid", "mode": "decoupled", "weight_decay": 0.2},
            {"pattern": "model.head.*", "name": "head", "mode": "l2", "weight_decay": 0.1},
        ],
    },
}
FSDP2_CONFIG: dict[str, Any] = {
    "strategy": "fsdp2",
    "steps": 4,
    "batch_size": 4,
    "log_every_n_steps": 2,
    "per_parameter": True,
    "histograms": True,
    "adam": {
        # lr·wd = 0.025 per step: the proximal step leaves many exact zeros in the small rows of inp.weight.
        "lr": 0.05,
        "weight_decay": 0.5,
        "mode": "decoupled_l1",
        "overrides": [
            {"pattern": "model.mid.weight", "name": "mid", "mode": "decoupled"},
            {"pattern": "model.head.*", "name": "head", "mode": "l1", "weight_decay": 0.1},
        ],
    },
}
# 4 steps logging every 2: the step values Lightning gives the user's metrics of batches 1 and 3
LOGGED_STEPS = [1, 3]

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
]


# ---- running the fits ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fit:
    """One fit_run.py subprocess (and the rank Lightning starts from it), in its own process group."""

    def __init__(self, config: dict[str, Any], outdir: Path) -> None:
        self.config = config
        self.outdir = outdir
        outdir.mkdir(parents=True)
        (outdir / "config.json").write_text(json.dumps(config))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            LIT_DECAY_COMPILE="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONWARNINGS="ignore",
        )
        self.log = outdir / "output.txt"
        self.deadline = time.monotonic() + RUN_TIMEOUT_S
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(outdir)],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._result: dict[str, Any] | None = None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def result(self) -> dict[str, Any]:
        if self._result is None:
            try:
                code = self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
                # Rank 1 is Lightning's child of rank 0 and may still be saving when rank 0 exits.
                while code == 0 and not self._saved() and time.monotonic() < self.deadline:
                    time.sleep(0.2)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.config['strategy']} fit ran past {RUN_TIMEOUT_S} s:\n{self._tail()}")
            finally:
                # Whatever happened, no rank may be left waiting on a collective.
                self._kill_group()
            assert code == 0, f"{self.config['strategy']} fit failed (exit {code}):\n{self._tail()}"
            assert self._saved(), f"a rank of the {self.config['strategy']} fit saved nothing:\n{self._tail()}"
            self._result = {rank: torch.load(self.outdir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)} | {
                f"figures{rank}": json.loads((self.outdir / f"figures_rank{rank}.json").read_text()) for rank in (0, 1)
            }
        return self._result

    def _saved(self) -> bool:
        return all((self.outdir / f"rank{rank}.pt").exists() for rank in (0, 1))

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Fit]]:
    base = tmp_path_factory.mktemp("distributed")
    started: dict[str, Fit] = {}
    try:
        # Started together: most of each fit is interpreter start-up and imports, which overlap well.
        for config in (DDP_CONFIG, FSDP2_CONFIG):
            started[config["strategy"]] = Fit(config, base / config["strategy"])
        yield started
    finally:
        for fit in started.values():
            fit.kill()
            fit._kill_group()


@pytest.fixture(scope="module")
def ddp(fits: dict[str, Fit]) -> dict[str, Any]:
    return fits["ddp"].result() | {"outdir": fits["ddp"].outdir}


@pytest.fixture(scope="module")
def fsdp2(fits: dict[str, Fit]) -> dict[str, Any]:
    return fits["fsdp2"].result() | {"outdir": fits["fsdp2"].outdir}


# ---- reading what the loggers wrote ---------------------------------------------------------------------------------


def _only(paths: list[Path], what: str) -> Path:
    assert len(paths) == 1, f"expected exactly one {what}, found {[str(p) for p in paths]}"
    return paths[0]


def tensorboard_events(outdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    version = _only(sorted((outdir / "tb").iterdir()), "TensorBoard version directory")
    events = _only(sorted(version.glob("events.out.tfevents.*")), "TensorBoard event file")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def _by_step(events: list[Any], tag: str) -> dict[int, Any]:
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag} written more than once at a step: {steps}"
    return {e.step: e for e in events}


def tensorboard_scalars(outdir: Path) -> dict[str, dict[int, float]]:
    accumulator = tensorboard_events(outdir)
    scalars: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        scalars[tag] = {step: e.value for step, e in _by_step(accumulator.Scalars(tag), tag).items()}
    scalars["__text__"] = {0: float(accumulator.Tags()["tensors"].count(f"{PREFIX}/grouping/text_summary"))}
    return scalars


def assert_histograms_of_whole_groups(outdir: Path, config: dict[str, Any], saved: dict[str, Any]) -> None:
    """One weight histogram per group and logged step, of the whole tensors as they were after the last step."""
    accumulator = tensorboard_events(outdir)
    groups = groups_of(config)
    tags = sorted(t for t in accumulator.Tags()["histograms"] if t.startswith(f"{PREFIX}/histogram/"))
    assert tags == sorted(f"{PREFIX}/histogram/{g['name']}" for g in groups)
    for group in groups:
        tag = f"{PREFIX}/histogram/{group['name']}"
        by_step = _by_step(accumulator.Histograms(tag), tag)
        assert sorted(by_step) == LOGGED_STEPS, tag
        histogram = by_step[LOGGED_STEPS[-1]].histogram_value
        values = torch.cat([saved["final"][n].reshape(-1) for n, _ in group["params"]]).double()
        assert histogram.num == values.numel(), tag
        assert histogram.min == pytest.approx(float(values.min())), tag
        assert histogram.max == pytest.approx(float(values.max())), tag
        assert histogram.sum_squares == pytest.approx(float(values.square().sum()), rel=1e-5), tag


def csv_scalars(outdir: Path) -> dict[str, dict[int, float]]:
    version = _only(sorted((outdir / "csv").iterdir()), "CSVLogger version directory")
    path = _only(sorted(version.glob("*.csv")), "CSV file")
    scalars: dict[str, dict[int, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    scalars.setdefault(key, {})[int(row["step"])] = float(value)
    return scalars


def at_step(scalars: dict[str, dict[int, float]], step: int) -> dict[str, float]:
    return {tag: by_step[step] for tag, by_step in scalars.items() if tag.startswith(PREFIX + "/") and step in by_step}


def recorded(run: dict[str, Any], rank: int, step: int) -> dict[str, float]:
    figures = run[f"figures{rank}"].get(str(step), {})
    return {tag: value for tag, value in figures.items() if tag.startswith(PREFIX + "/")}


# ---- the single-process side ----------------------------------------------------------------------------------------


def batch_indices(config: dict[str, Any], step: int) -> list[int]:
    """The samples both ranks saw at ``step``: DistributedSampler (no shuffle) deals sample i to rank i % 2."""
    size, n = int(config["batch_size"]), 2 * int(config["batch_size"]) * int(config["steps"])
    return [i for rank in (0, 1) for i in list(range(rank, n, 2))[step * size : (step + 1) * size]]


def groups_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    adam = config["adam"]
    return lit_decay.param_groups(
        fit_run.build_net(config),
        weight_decay=adam["weight_decay"],
        mode=adam["mode"],
        overrides=adam["overrides"],
        lr=adam["lr"],
    )


def last_step_gradients(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over the last global batch, at the weights before the last step."""
    net = fit_run.build_net(config)
    net.load_state_dict(weights)
    x, y = fit_run.make_data(config).tensors
    index = batch_indices(config, int(config["steps"]) - 1)
    nn.functional.mse_loss(net(x[index]), y[index]).backward()
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def expected_figures(config: dict[str, Any], saved: dict[str, Any]) -> dict[str, float]:
    """The monitor's figures (docs/monitoring.md) at the last step, in float64, from saved weights and Adam state."""
    final = {n: t.double() for n, t in saved["final"].items()}
    before = {n: t.double() for n, t in saved["before_last"].items()}
    raw = {n: g.double() for n, g in last_step_gradients(config, saved["before_last"]).items()}
    figures: dict[str, float] = {}
    for group in groups_of(config):
        name, mode, wd = group["name"], group["decay_mode"], group["weight_decay"]
        lr = group.get("lr", config["adam"]["lr"])
        names = [n for n, _ in group["params"]]
        # What Adam was given: the l1 term is added to the gradient, with the sign of the weights before the step.
        grads = {n: raw[n] + wd * torch.sign(before[n]) if mode == "l1" else raw[n] for n in names}

        def sums(selected: list[str], grads: dict[str, torch.Tensor] = grads) -> tuple[float, float, float, float]:
            w2 = sum(float(final[n].square().sum()) for n in selected)
            g2 = sum(float(grads[n].square().sum()) for n in selected)
            d2 = sum(float((final[n] - before[n]).square().sum()) for n in selected)
            b2 = sum(float(before[n].square().sum()) for n in selected)
            return w2, g2, d2, b2

        w2, g2, d2, b2 = sums(names)
        figures[f"weight_norm/{name}"] = math.sqrt(w2)
        figures[f"grad_norm/{name}"] = math.sqrt(g2)
        figures[f"weight_decay/{name}"] = wd
        figures[f"update_ratio/{name}"] = math.sqrt(d2) / math.sqrt(b2)  # against the weights before the step
        # rotational equilibrium (Kosson, Messmer & Jaggi, 2024) and Σ lr·wd over the steps, for decoupled groups
        equilibrium = math.sqrt(2 * lr * wd * (1 - BETA1) / (1 + BETA1)) if mode == "decoupled" and wd else None
        if equilibrium:
            figures[f"equilibrium/{name}"] = figures[f"update_ratio/{name}"] / equilibrium
        if mode == "decoupled":
            figures[f"decay_progress/{name}"] = int(config["steps"]) * lr * wd
        if config.get("per_parameter"):
            for n in names:
                pw2, pg2, pd2, pb2 = sums([n])
                figures[f"weight_norm/{name}/{n}"] = math.sqrt(pw2)
                figures[f"grad_norm/{name}/{n}"] = math.sqrt(pg2)
                figures[f"update_ratio/{name}/{n}"] = math.sqrt(pd2) / math.sqrt(pb2)

        def denominator(n: str) -> torch.Tensor:
            state = saved["state"][n]
            t = float(state["step"])
            return torch.sqrt(state["exp_avg_sq"].double() / (1 - BETA2**t)) + EPS

        def adam_direction(n: str) -> torch.Tensor:
            state = saved["state"][n]
            return state["exp_avg"].double() / (1 - BETA1 ** float(state["step"])) / denominator(n)

        if mode == "none" or wd == 0:
            effective = 0.0
        elif mode == "decoupled":
            effective = lr * wd
        elif mode == "l2":
            effective = lr * wd * sum(float((final[n].square() / denominator(n)).sum()) for n in names) / w2
        elif mode == "l1":
            effective = lr * wd * sum(float((final[n].abs() / denominator(n)).sum()) for n in names) / w2
        else:
            assert mode == "decoupled_l1"
            # Defined on the weights the soft threshold acts on: after Adam's step, before the shrink.
            acted_on = {n: before[n] - lr * adam_direction(n) for n in names}
            shrunk = sum(float((acted_on[n].abs() * acted_on[n].abs().clamp(max=lr * wd)).sum()) for n in names)
            effective = shrunk / sum(float(acted_on[n].square().sum()) for n in names)
        figures[f"effective_decay/{name}"] = effective
        if effective:
            figures[f"decay_timescale/{name}"] = 1.0 / effective
        if mode in ("l1", "decoupled_l1"):
            zeros = sum(int((final[n] == 0).sum()) for n in names)
            figures[f"sparsity/{name}"] = zeros / sum(final[n].numel() for n in names)
    return {f"{PREFIX}/{tag}": value for tag, value in figures.items()}


def assert_figures(logged: dict[str, float], expected: dict[str, float], where: str) -> None:
    assert sorted(logged) == sorted(expected), f"{where}: tags differ"
    wrong = {
        tag: (logged[tag], value)
        for tag, value in expected.items()
        if logged[tag] != pytest.approx(value, rel=2e-4, abs=1e-7)
    }
    assert not wrong, f"{where}: logged vs single-process (logged, expected): {wrong}"


def replay(config: dict[str, Any], initial: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """The same training in one process on the global batch (what the two ranks' averaged gradients amount to)."""
    net = fit_run.build_net(config)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, initial[name]), f"{name}: the fit did not start from the weights build_net makes"
    optimizer = lit_decay.configure_adam(net, **config["adam"])
    x, y = fit_run.make_data(config).tensors
    for step in range(int(config["steps"])):
        index = batch_indices(config, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[index]), y[index]).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}, optimizer


# ---- DDP ------------------------------------------------------------------------------------------------------------


def test_ddp_writes_each_log_once(ddp: dict[str, Any]) -> None:
    outdir = ddp["outdir"]
    tensorboard = tensorboard_scalars(outdir)  # asserts one version directory and one event file
    table = csv_scalars(outdir)
    tag = f"{PREFIX}/weight_norm/decay"
    assert sorted(tensorboard[tag]) == LOGGED_STEPS
    assert sorted(table[tag]) == LOGGED_STEPS
    assert tensorboard["__text__"] == {0: 1.0}, "the grouping text should be written once, by rank zero"
    assert sorted(p.name for p in outdir.iterdir() if p.is_dir()) == ["csv", "tb"]


def test_ddp_histograms_written_once_of_each_group(ddp: dict[str, Any]) -> None:
    assert_histograms_of_whole_groups(ddp["outdir"], DDP_CONFIG, ddp[0])


def test_ddp_figures_match_single_process_at_last_step(ddp: dict[str, Any]) -> None:
    expected = expected_figures(DDP_CONFIG, ddp[0])
    assert {k.split("/")[-1] for k in expected} == {"decay", "mid", "head", "no_decay"}
    assert expected[f"{PREFIX}/effective_decay/mid"] == pytest.approx(0.01 * 0.2)
    last = LOGGED_STEPS[-1]
    assert ddp[0]["step"] == last + 1  # the global step after the last batch's step
    assert_figures(at_step(tensorboard_scalars(ddp["outdir"]), last), expected, "TensorBoard")
    assert_figures(at_step(csv_scalars(ddp["outdir"]), last), expected, "CSV")
    for rank in (0, 1):
        assert_figures(recorded(ddp, rank, last), expected, f"rank {rank}'s figures")
    # Same on every rank, at every logged step.
    for step in LOGGED_STEPS:
        assert recorded(ddp, 0, step) == pytest.approx(recorded(ddp, 1, step), rel=1e-6, abs=1e-9)


def test_ddp_ranks_end_with_identical_weights_and_state(ddp: dict[str, Any]) -> None:
    assert ddp[0]["global_rank"] == 0 and ddp[1]["global_rank"] == 1
    assert ddp[0]["fused"] is True
    for name, tensor in ddp[0]["final"].items():
        assert torch.equal(tensor, ddp[1]["final"][name]), name
        assert not torch.equal(tensor, ddp[0]["initial"][name]), f"{name} did not train"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ddp[0]["state"][name][key], ddp[1]["state"][name][key]), (name, key)


def test_ddp_training_matches_single_process_global_batch(ddp: dict[str, Any]) -> None:
    weights, optimizer = replay(DDP_CONFIG, ddp[0]["initial"])
    assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in ddp[0]["groups"]]
    for name, tensor in weights.items():
        torch.testing.assert_close(ddp[0]["final"][name], tensor, rtol=1e-5, atol=2e-6, msg=name)


# ---- FSDP2 (ModelParallelStrategy) ----------------------------------------------------------------------------------


def test_fsdp2_parameters_are_sharded_dtensors_on_fused_adam(fsdp2: dict[str, Any]) -> None:
    for rank in (0, 1):
        assert set(fsdp2[rank]["dtensor"].values()) == {"DTensor"}
        assert fsdp2[rank]["fused"] is True
    # Rows are dealt out on dim 0, unevenly where the row count is odd.
    assert fsdp2[0]["local"]["model.head.weight"].shape == (3, fit_run.HIDDEN)
    assert fsdp2[1]["local"]["model.head.weight"].shape == (2, fit_run.HIDDEN)
    assert fsdp2[1]["local"]["model.gate.weight"].shape == (0, fit_run.HIDDEN)  # an empty shard
    whole = fsdp2[0]["final"]["model.inp.weight"]
    assert whole.shape == (fit_run.HIDDEN, fit_run.IN)
    shards = [fsdp2[rank]["local"]["model.inp.weight"] for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(shards), whole)


def test_fsdp2_figures_are_of_the_whole_tensors(fsdp2: dict[str, Any]) -> None:
    last = LOGGED_STEPS[-1]
    expected = expected_figures(FSDP2_CONFIG, fsdp2[0])
    assert_figures(at_step(tensorboard_scalars(fsdp2["outdir"]), last), expected, "TensorBoard")
    for rank in (0, 1):
        assert_figures(recorded(fsdp2, rank, last), expected, f"rank {rank}'s figures")
    for step in LOGGED_STEPS:
        assert recorded(fsdp2, 0, step) == pytest.approx(recorded(fsdp2, 1, step), rel=1e-6, abs=1e-9)

    logged = recorded(fsdp2, 0, last)
    whole = fsdp2[0]["final"]["model.inp.weight"]
    norm = logged[f"{PREFIX}/weight_norm/decay/model.inp.weight"]
    assert norm == pytest.approx(float(whole.norm()), rel=1e-5)
    for rank in (0, 1):
        shard_norm = float(fsdp2[rank]["local"]["model.inp.weight"].norm())
        assert abs(norm - shard_norm) > 0.05 * norm, f"logged norm {norm} is rank {rank}'s shard norm {shard_norm}"
    # The proximal step made zeros, unevenly across shards: the whole group's fraction is neither rank's.
    names = next([n for n, _ in g["params"]] for g in groups_of(FSDP2_CONFIG) if g["name"] == "decay")
    assert "model.inp.weight" in names
    sparsity = logged[f"{PREFIX}/sparsity/decay"]
    assert sparsity == pytest.approx(zero_fraction(fsdp2[0]["final"], names), rel=1e-9)
    assert sparsity > 0
    for rank in (0, 1):
        shard_sparsity = zero_fraction(fsdp2[rank]["local"], names)
        assert abs(sparsity - shard_sparsity) > 0.02, f"logged sparsity {sparsity} is rank {rank}'s shard's"


def zero_fraction(tensors: dict[str, torch.Tensor], names: list[str]) -> float:
    return sum(int((tensors[n] == 0).sum()) for n in names) / sum(tensors[n].numel() for n in names)


def test_fsdp2_histograms_are_of_the_whole_tensors(fsdp2: dict[str, Any]) -> None:
    assert_histograms_of_whole_groups(fsdp2["outdir"], FSDP2_CONFIG, fsdp2[0])


def test_fsdp2_training_matches_single_process_global_batch(fsdp2: dict[str, Any]) -> None:
    # The L1 terms act on each rank's shard; sign and soft-threshold are elementwise, so the result must be the same
    # as on the whole tensor in one process.
    weights, _ = replay(FSDP2_CONFIG, fsdp2[0]["initial"])
    for name, tensor in weights.items():
        torch.testing.assert_close(fsdp2[0]["final"][name], tensor, rtol=1e-5, atol=2e-6, msg=name)
    assert int((weights["model.inp.weight"] == 0).sum()) == int((fsdp2[0]["final"]["model.inp.weight"] == 0).sum())
