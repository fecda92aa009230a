"""lit_decay on a CUDA device: the fused kernel, every mode against the float64 reference, GradScaler with float16
autocast, the compiled kernels against the eager ones, the monitor's figures against a CPU recomputation, and
Lightning fits in 16-bit mixed precision.

Every test is marked ``cuda`` and skipped where torch sees no CUDA device, so a default ``pytest`` run on a CPU
machine only reports them as skipped. Run them with ``pytest -m cuda tests/test_cuda.py`` (or
``bash scripts/gpu_check.sh``, which also times the many-tensor benchmarks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
import lit_decay.stats
from lit_decay.optim import describe_implementation
from lit_decay.stats import StepStatistics
from tests.reference import ReferenceAdam, assert_unchanged, snapshot

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"),
]

MODES = ("l2", "decoupled", "l1", "decoupled_l1", "none")
LR = 1e-2
WD = 0.1
CUDA = torch.device("cuda")


class Net(nn.Module):
    """Two linear layers around a LayerNorm: matrices in ``decay``, biases and the norm in ``no_decay``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def settings(model: nn.Module, mode: str) -> dict[str, tuple[float, float, str]]:
    """{name: (lr, weight_decay, mode)} from the grouping rules, for the reference: matrices decay, the rest not."""
    return {name: (LR, WD, mode) if p.ndim >= 2 else (LR, 0.0, "none") for name, p in model.named_parameters()}


def batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 6, generator=generator, dtype=dtype).to(CUDA),
            torch.randn(8, 3, generator=generator, dtype=dtype).to(CUDA),
        )
        for _ in range(n)
    ]


def test_fused_kernel_is_chosen_on_cuda() -> None:
    for mode in MODES:
        optimizer = lit_decay.configure_adam(Net().to(CUDA), lr=LR, weight_decay=WD, mode=mode)
        assert optimizer.defaults["fused"] is True, mode
        assert describe_implementation(optimizer) == "fused", mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_float64_reference_on_cuda(mode: str, dtype: torch.dtype) -> None:
    """Fed the same gradients, torch's fused CUDA kernel with lit_decay's terms follows the float64 reference."""
    model = Net().to(CUDA, dtype)
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode)
    ref = ReferenceAdam.from_named(((n, p.cpu()) for n, p in model.named_parameters()), settings(model, mode))
    for x, y in batches(20, dtype):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        # lit_decay.Adam's l1 term changes p.grad in place: the reference gets the loss gradient as backward left it.
        grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        ref.step(grads)
    tight = dtype == torch.float64
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach().cpu().double(),
            ref.params[name],
            atol=1e-10 if tight else 2e-5,
            rtol=1e-9 if tight else 1e-4,
            msg=name,
        )


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_grad_scaler_float16_autocast_and_a_skipped_step(mode: str) -> None:
    """torch.amp.GradScaler("cuda") with float16 autocast: each step is the reference's step on the unscaled
    gradient (the L1 term included), and a step whose gradient holds an inf changes nothing."""
    model = Net().to(CUDA)
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode)
    ref = ReferenceAdam.from_named(((n, p.cpu()) for n, p in model.named_parameters()), settings(model, mode))
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    data = batches(4)
    for x, y in data[:3]:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        # A power-of-two scale divides out exactly: this is the gradient the step must use.
        scale = scaler.get_scale()
        ref.step({name: p.grad.detach().cpu().double() / scale for name, p in model.named_parameters()})
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 1024.0  # no step was skipped so far
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().cpu().double(), ref.params[name], atol=2e-5, rtol=1e-4, msg=name)

    before = snapshot(model, optimizer)
    x, y = data[3]
    optimizer.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model.head.weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 512.0  # the scaler saw the inf and skipped the step
    assert_unchanged(before, snapshot(model, optimizer))


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_compiled_kernels_match_eager_on_cuda(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LIT_DECAY_COMPILE=1 (every tensor's statistics through torch.compile, Triton on CUDA) against =0 (eager, the
    default on CUDA until the GPU check has measured both): the same steps and the same group_stats figures, to
    float32 rounding."""
    results: dict[str, tuple[list[torch.Tensor], dict[str, float]]] = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("LIT_DECAY_COMPILE", setting)
        torch.manual_seed(0)
        model = Net().to(CUDA)
        optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode)
        for x, y in batches(5):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        results[setting] = ([p.detach().clone() for p in model.parameters()], lit_decay.group_stats(optimizer))
    (eager_weights, eager_figures), (compiled_weights, compiled_figures) = results["0"], results["1"]
    for eager, compiled in zip(eager_weights, compiled_weights, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    assert compiled_figures.keys() == eager_figures.keys() and eager_figures
    for key, value in eager_figures.items():
        assert compiled_figures[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def overrides() -> list[dict[str, Any]]:
    """The head in its own decoupled_l1 group, so the figures cover a proximal group (sparsity; after the step,
    group_stats gives no update ratio or effective decay for it)."""
    return [{"pattern": "*head.*", "name": "head", "mode": "decoupled_l1", "weight_decay": 0.05}]


def cpu_copy(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same model and optimizer on the CPU: weights, gradients and Adam state copied."""
    twin = Net()
    twin.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    for source, target in zip(model.parameters(), twin.parameters(), strict=True):
        target.grad = None if source.grad is None else source.grad.detach().cpu().clone()
    twin_optimizer = lit_decay.configure_adam(twin, lr=LR, weight_decay=WD, mode="l2", overrides=overrides())
    twin_optimizer.load_state_dict(optimizer.state_dict())
    return twin, twin_optimizer


def test_monitor_figures_on_cuda_match_cpu_with_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """group_stats and a hooked StepStatistics logging step on CUDA give the figures a CPU recomputation gives, with
    one device-to-host transfer (lit_decay.stats.to_host) per collect, of a table still on the GPU."""
    transfers: list[torch.device] = []
    real_to_host = lit_decay.stats.to_host

    def counted(table: torch.Tensor) -> list[list[float]]:
        transfers.append(table.device)
        return real_to_host(table)

    model = Net().to(CUDA)
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode="l2", overrides=overrides())
    data = batches(4)
    for x, y in data[:3]:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    # (1) group_stats right after a step, on the GPU and on a CPU copy of the same tensors.
    _, twin_optimizer = cpu_copy(model, optimizer)
    monkeypatch.setattr(lit_decay.stats, "to_host", counted)
    on_gpu = lit_decay.group_stats(optimizer)
    assert [d.type for d in transfers] == ["cuda"]
    on_cpu = lit_decay.group_stats(twin_optimizer)
    assert on_gpu.keys() == on_cpu.keys() and on_gpu
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key

    # (2) A hooked logging step (as WeightDecayMonitor runs it) on both, from the same weights and gradients.
    x, y = data[3]
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    _, twin_optimizer = cpu_copy(model, optimizer)
    figures = {}
    for name, opt in (("cuda", optimizer), ("cpu", twin_optimizer)):
        statistics = StepStatistics([opt])
        statistics.attach()
        statistics.arm()
        transfers.clear()
        opt.step()
        figures[name] = statistics.collect()
        statistics.detach()
        assert len(transfers) == 1 and transfers[0].type == name  # one transfer per logging step
    assert figures["cuda"].keys() == figures["cpu"].keys()
    assert any(key.startswith("update_ratio/") for key in figures["cuda"])
    assert "sparsity/head" in figures["cuda"]
    for key, value in figures["cpu"].items():
        # Two fused kernels (CUDA, CPU) stepping the same float32 tensors: equal to float32 rounding.
        assert figures["cuda"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


class LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, lr=LR, weight_decay=WD, mode="decoupled", overrides=overrides())

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(48, 6, generator=generator), torch.randn(48, 3, generator=generator))
        return DataLoader(data, batch_size=4)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_trainer_fit_on_gpu_with_the_monitor(tmp_path: Path, precision: str) -> None:
    """A Lightning fit on one GPU in mixed precision with WeightDecayMonitor: the fused kernel is kept, and the
    monitor's figures reach TensorBoard at the logging steps, finite."""
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=6,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[lit_decay.WeightDecayMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(LitNet())
    assert describe_implementation(trainer.optimizers[0]) == "fused"
    events = EventAccumulator(str(logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    decay_tags = [tag for tag in logged if tag.startswith("decay/")]
    assert "decay/weight_norm/decay" in decay_tags and "decay/sparsity/head" in decay_tags
    for tag in decay_tags:
        # Logging steps of a 6-step run logging every 2 (Lightning's step values for the user's metrics). Under
        # "16-mixed" a step the GradScaler skips (an overflow) is not measured, so a logging step may be missing.
        steps = sorted(logged[tag])
        assert set(steps) <= {1, 3, 5} and steps, tag
        if precision == "bf16-mixed":
            assert steps == [1, 3, 5], tag
        assert all(math.isfinite(value) for value in logged[tag].values()), tag
