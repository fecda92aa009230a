"""A small GPT on the King James Genesis and Exodus, with decoupled weight decay and its figures in TensorBoard.

What it shows:

- ``lit_decay.explain(model, ...)`` printed before training: one row per tensor saying which group it lands in and
  why. ``TinyGPT`` ties its output head to the token embedding (one tensor, two names): the table lists it once, with
  its alias, in the decay group (embeddings are decayed unless ``--exclude-embeddings``). LayerNorm weights and all
  biases go to "no_decay".
- ``configure_adam(..., mode="decoupled", scheduler=...)``: AdamW's rule on torch's fused Adam kernel, with a cosine
  learning-rate schedule. Decoupled decay shrinks the weights by lr·wd per step, so TensorBoard's
  ``decay/effective_decay/decay`` follows the schedule down, and ``decay/decay_timescale/decay`` (1 / that) goes up.
- ``WeightDecayMonitor`` logging per-group figures next to the training and validation loss, its decay report at the
  end of training, and a sample of generated text.
- ``--timescale-fraction F`` adds ``lit_decay.WeightDecayScheduler(timescale_fraction=F)``: the decay timescale
  τ = 1/(lr·wd) held at F times the run (Wang & Aitchison, 2024), wd recomputed from the cosine schedule's lr before
  every step (``--no-hold-timescale``: wd computed once, from the starting lr). With the defaults (wd = 0.1) τ is
  longer than the run and the report says decay did not act; with a fraction it acts, and the decay group's norm
  levels off (docs/choosing_weight_decay.md).

The text (examples/data/kjv_genesis_exodus.txt, public domain) is read as characters; the last 10 % is held out for
validation. Training batches are random blocks of ``--block-size`` characters.

Run it from the repository root with the environment ``bash scripts/setup.sh`` made (``.venv/bin/python``, or
``python`` after ``source .venv/bin/activate``). About a minute and a half on a 2-core CPU; ``--fast`` is a
few-second smoke test. The logs go to ``--logdir`` (default ``runs``, git-ignored)::

    .venv/bin/python examples/char_gpt.py
    .venv/bin/tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

import lit_decay

if __package__ in (None, ""):
    # Run as a script, Python puts examples/ on sys.path; the imports below need the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples._common import print_tensorboard_hint, quiet_lightning
from examples.models import TinyGPT

TEXT = Path(__file__).resolve().parent / "data" / "kjv_genesis_exodus.txt"


class CharVocab:
    """Maps the characters of a text to token ids and back."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


class RandomBlocks(Dataset):
    """``num_blocks`` (input, next-character target) pairs cut at random offsets drawn once from ``seed``."""

    def __init__(self, data: torch.Tensor, block_size: int, num_blocks: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(len(data) - block_size - 1, (num_blocks,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.offsets[index])
        block = self.data[start : start + self.block_size + 1]
        return block[:-1], block[1:]


class CharGPT(L.LightningModule):
    """Next-character prediction with ``TinyGPT``, Adam with decoupled weight decay and a cosine lr schedule."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_embd: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        exclude_embeddings: bool = False,
        total_steps: int = 1500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyGPT(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> dict:
        total_steps = self.hparams.total_steps
        return lit_decay.configure_adam(
            self,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            mode="decoupled",
            betas=(0.9, 0.99),
            exclude_embeddings=self.hparams.exclude_embeddings,
            # Lightning's scheduler config: step the cosine schedule every optimizer step, not every epoch.
            scheduler={
                "scheduler": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps),
                "interval": "step",
            },
        )

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, length: int, temperature: float = 0.8, seed: int = 0) -> torch.Tensor:
        """Sample ``length`` characters after ``prompt`` (1-D token ids), one at a time."""
        self.eval()
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        idx = prompt.unsqueeze(0)
        for _ in range(length):
            logits = self(idx[:, -self.hparams.block_size :])[:, -1] / temperature
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx[0, len(prompt) :]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1500; 20 with --fast)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--exclude-embeddings", action="store_true", help="keep embedding tables out of decay")
    parser.add_argument(
        "--timescale-fraction",
        type=float,
        default=None,
        help="set wd from the decay timescale, held at this fraction of the run (WeightDecayScheduler); "
        "--weight-decay is then only the value before the first step",
    )
    parser.add_argument(
        "--no-hold-timescale",
        action="store_true",
        help="with --timescale-fraction: compute wd once, from the starting lr, so that τ lengthens as the lr falls",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root folder (default: %(default)s)")
    parser.add_argument(
        "--fast", action="store_true", help="a few-second smoke run (a smaller model, 20 steps unless --steps)"
    )
    args = parser.parse_args(argv)
    if args.fast:
        args.batch_size, args.block_size, args.n_layer, args.n_embd = 8, 32, 1, 32
    if args.steps is None:
        args.steps = 20 if args.fast else 1500
    return args


@dataclass
class Run:
    """Everything one run of the example is made of, ready for ``fit``: usable from a notebook or the docs."""

    model: CharGPT
    trainer: L.Trainer
    monitor: lit_decay.WeightDecayMonitor
    train_loader: DataLoader
    val_loader: DataLoader
    vocab: CharVocab
    characters: int
    train_characters: int

    def fit(self) -> None:
        self.trainer.fit(self.model, train_dataloaders=self.train_loader, val_dataloaders=self.val_loader)


def prepare(args: argparse.Namespace) -> Run:
    """The data, the model and the Trainer of ``args`` (from ``parse_args``), seeded; nothing is trained yet."""
    quiet_lightning()
    # A model this small runs fastest on one CPU thread: more only add synchronisation, a lot on a busy machine.
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)

    text = TEXT.read_text(encoding="utf-8")
    vocab = CharVocab(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))
    train_blocks = RandomBlocks(data[:split], args.block_size, args.steps * args.batch_size, seed=args.seed)
    val_blocks = RandomBlocks(data[split:], args.block_size, 8 * args.batch_size, seed=args.seed + 1)

    model = CharGPT(
        vocab_size=len(vocab),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        lr=args.lr,
        weight_decay=args.weight_decay,
        exclude_embeddings=args.exclude_embeddings,
        total_steps=args.steps,
    )
    monitor = lit_decay.WeightDecayMonitor()
    callbacks: list[L.Callback] = [monitor, LearningRateMonitor("step")]
    if args.timescale_fraction is not None:
        hold = not args.no_hold_timescale
        callbacks.append(
            lit_decay.WeightDecayScheduler(timescale_fraction=args.timescale_fraction, hold_timescale=hold)
        )
    trainer = L.Trainer(
        max_epochs=1,  # one pass over steps × batch_size random blocks
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(args.logdir, name="char_gpt", default_hp_metric=False),
        callbacks=callbacks,
        log_every_n_steps=10 if not args.fast else 5,
        val_check_interval=min(100, args.steps),
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )
    return Run(
        model=model,
        trainer=trainer,
        monitor=monitor,
        train_loader=DataLoader(train_blocks, batch_size=args.batch_size, shuffle=False, num_workers=0),
        val_loader=DataLoader(val_blocks, batch_size=args.batch_size, num_workers=0),
        vocab=vocab,
        characters=len(text),
        train_characters=split,
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    run = prepare(args)
    print(f"{run.characters:,} characters, vocabulary of {len(run.vocab)}, {run.train_characters:,} for training")
    # Every grouping decision, before anything trains.
    print(lit_decay.explain(run.model, weight_decay=args.weight_decay, exclude_embeddings=args.exclude_embeddings))
    print()
    run.fit()

    trainer, model, vocab = run.trainer, run.model, run.vocab
    print(f"\nFinal validation loss: {float(trainer.callback_metrics['val/loss']):.3f} nats per character")
    prompt = "And God said"
    sample = vocab.decode(model.generate(vocab.encode(prompt).to(model.device), length=300, seed=args.seed))
    print(f"\nSample (temperature 0.8):\n\n{prompt}{sample}\n")
    print(f"Logged to {trainer.logger.log_dir}")
    print_tensorboard_hint(args.logdir)
    return sample


if __name__ == "__main__":
    main()
