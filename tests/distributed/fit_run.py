"""A two-process CPU fit with lit_decay, run by tests/test_distributed.py as ``python fit_run.py OUTDIR``.

OUTDIR/config.json says which strategy ("ddp" or "fsdp2") and which decay settings to use. Lightning's subprocess
launcher re-runs this very file for rank 1, so everything below the ``__main__`` guard runs on both ranks.

What it leaves in OUTDIR for the test to check against a single-process computation:
- ``tb/`` and ``csv/``: what the TensorBoardLogger and CSVLogger wrote (rank zero only, by Lightning's design);
- ``figures_rank{r}.json``: every metric each rank handed to its loggers, from a logger that records on all ranks;
- ``rank{r}.pt``: the whole (gathered) weights after the fit and before the last step, the last step's gradients and
  Adam state, the local shards (FSDP2), the initial weights and the optimizer's groups as configured.

Importing this file has no side effects: the test imports it for :func:`build_net` and :func:`make_data`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lit_decay

IN, HIDDEN, OUT = 16, 32, 5  # OUT is odd so FSDP2 shards head.weight unevenly (3 + 2 rows)


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, OUT)
        # One row: under FSDP2 rank 1 holds an empty shard of it.
        self.gate = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mid(torch.tanh(self.norm(self.inp(x)))))
        return self.head(hidden) * torch.sigmoid(self.gate(hidden))


class Net(L.LightningModule):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        torch.manual_seed(int(config.get("seed", 0)))
        self.model = Body()
        with torch.no_grad():
            # Rows of very different sizes, smaller on average in rank 0's half: each shard's norm is then far from
            # the whole tensor's, and the proximal step zeroes more of rank 0's half than of rank 1's.
            scale = torch.cat([torch.linspace(0.1, 1.5, HIDDEN // 2), torch.linspace(0.5, 2.5, HIDDEN - HIDDEN // 2)])
            self.model.inp.weight.mul_(scale.unsqueeze(1))
            self.model.norm.weight.copy_(torch.linspace(0.5, 2.0, HIDDEN))

    def configure_model(self) -> None:
        if self.config["strategy"] != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.model.inp, self.model.mid, self.model.head, self.model.gate):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, **self.config["adam"])

    def train_dataloader(self) -> DataLoader:
        # Lightning's own sampler shuffles training data; this one deals sample i to rank i % 2, in order, so the test
        # knows which samples made each step's global batch.
        sampler = DistributedSampler(make_data(self.config), shuffle=False, **self.trainer.distributed_sampler_kwargs)
        return DataLoader(sampler.dataset, batch_size=int(self.config["batch_size"]), sampler=sampler, num_workers=0)


def build_net(config: dict[str, Any]) -> Net:
    return Net(config)


def make_data(config: dict[str, Any]) -> TensorDataset:
    """``world · batch · steps`` fixed samples: one epoch is exactly ``steps`` optimizer steps on every rank."""
    generator = torch.Generator().manual_seed(1234)
    n = 2 * int(config["batch_size"]) * int(config["steps"])
    x = torch.randn(n, IN, generator=generator)
    y = torch.randn(n, OUT, generator=generator)
    return TensorDataset(x, y)


class RecordingLogger(Logger):
    """Records what it is given on every rank (Lightning's own loggers only act on rank zero)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.records: dict[str, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.setdefault(str(step), {}).update({k: float(v) for k, v in metrics.items()})
        self.path.write_text(json.dumps(self.records, indent=1))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # full_tensor() is a collective: every rank calls it, whether or not it saves the result.
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().clone().cpu()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.detach().clone().cpu()


class Capture(Callback):
    """Keeps the weights before the last step, and the gradients, Adam state and weights right after it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.saved: dict[str, Any] = {}

    def _named(self, pl_module: L.LightningModule) -> list[tuple[str, nn.Parameter]]:
        return list(pl_module.named_parameters())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved["initial"] = {n: _full(p) for n, p in self._named(pl_module)}
        optimizer = trainer.optimizers[0]
        self.saved["groups"] = [
            {k: v for k, v in g.items() if k not in ("params", "param_names")} | {"param_names": list(g["param_names"])}
            for g in optimizer.param_groups
        ]
        self.saved["fused"] = optimizer.defaults.get("fused")
        self.saved["dtensor"] = {n: type(p).__name__ for n, p in self._named(pl_module)}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.steps - 1:
            self.saved["before_last"] = {n: _full(p) for n, p in self._named(pl_module)}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step != self.steps:
            return
        optimizer = trainer.optimizers[0]
        named = self._named(pl_module)
        self.saved["step"] = trainer.global_step
        self.saved["final"] = {n: _full(p) for n, p in named}
        self.saved["local"] = {n: _local(p) for n, p in named}
        self.saved["grads"] = {n: _full(p.grad) for n, p in named if p.grad is not None}
        self.saved["state"] = {
            n: {k: (_full(v) if isinstance(v, torch.Tensor) else v) for k, v in sorted(optimizer.state[p].items())}
            for n, p in named
            if p in optimizer.state
        }
        self.saved["lrs"] = [float(g["lr"]) for g in optimizer.param_groups]


def main(outdir: Path) -> None:
    config = json.loads((outdir / "config.json").read_text())
    steps = int(config["steps"])
    if config["strategy"] == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    capture = Capture(steps)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    loggers = [
        TensorBoardLogger(save_dir=str(outdir), name="tb"),
        CSVLogger(save_dir=str(outdir), name="csv"),
        RecordingLogger(outdir / f"figures_rank{rank}.json"),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        max_epochs=1,
        logger=loggers,
        log_every_n_steps=int(config["log_every_n_steps"]),
        callbacks=[
            lit_decay.WeightDecayMonitor(
                log_every_n_steps=int(config["log_every_n_steps"]),
                per_parameter=bool(config.get("per_parameter")),
                histograms=bool(config.get("histograms")),
            ),
            capture,
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(build_net(config))
    # Ranks report which rank they are as Lightning saw it (LOCAL_RANK is only set on the launched rank).
    capture.saved["global_rank"] = trainer.global_rank
    capture.saved["world_size"] = trainer.world_size
    # Written under another name and renamed, so the test never reads a half-written file of a rank still saving.
    partial = outdir / f"rank{trainer.global_rank}.pt.partial"
    torch.save(capture.saved, partial)
    os.replace(partial, outdir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
