"""Pieces the examples share: the digits data module and the closing TensorBoard hint.

The digits are scikit-learn's ``load_digits``: 1,797 grey-scale 8×8 images of handwritten digits that ship inside the
scikit-learn package, so the examples never download anything.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, RandomSampler, TensorDataset


def quiet_lightning() -> None:
    """Silence console noise that says nothing about the example (the logs and the lit_decay summary stay)."""
    # The data sits in memory, so DataLoader workers would only add start-up time.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Lightning 2.6 still uses a torch.utils._pytree class that newer torch releases deprecate.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    # An advertisement Lightning prints whenever its cloud logger is not installed.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip")
    )


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8×8 digits as flat 64-feature vectors in [0, 1], split into stratified train/val sets.

    Args:
        batch_size: training batch size (validation uses batches of 512).
        train_size: number of training images (int) or fraction of the 1,797 (float); the rest is validation.
        seed: seed of the split, so every run sees the same images.
        evaluate_train: also evaluate on the training set at each validation, as validation dataloader 0
            (the validation set is then dataloader 1), to measure the train/val gap in eval mode.
        samples_per_epoch: draw this many training samples per epoch, with replacement, instead of one pass over
            the training set; a tiny training set then needs no thousands of short epochs.
    """

    def __init__(
        self,
        batch_size: int = 64,
        train_size: int | float = 0.8,
        seed: int = 0,
        evaluate_train: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_size = train_size
        self.seed = seed
        self.evaluate_train = evaluate_train
        self.samples_per_epoch = samples_per_epoch

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x_train, x_val, y_train, y_val = train_test_split(
            digits.data, digits.target, train_size=self.train_size, stratify=digits.target, random_state=self.seed
        )
        # Pixel values are 0..16.
        self.train_set = TensorDataset(torch.tensor(x_train / 16.0, dtype=torch.float32), torch.tensor(y_train))
        self.val_set = TensorDataset(torch.tensor(x_val / 16.0, dtype=torch.float32), torch.tensor(y_val))

    def train_dataloader(self) -> DataLoader:
        # drop_last: a last batch of one image would break BatchNorm's batch statistics.
        if self.samples_per_epoch is None:
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=0)
        sampler = RandomSampler(self.train_set, replacement=True, num_samples=self.samples_per_epoch)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = DataLoader(self.val_set, batch_size=512, num_workers=0)
        if not self.evaluate_train:
            return val
        return [DataLoader(self.train_set, batch_size=512, num_workers=0), val]


def print_tensorboard_hint(logdir: str) -> None:
    """Tell the user how to look at what was logged (with the tensorboard of this environment, e.g. .venv/bin)."""
    beside = Path(sys.executable).with_name("tensorboard")
    command = "tensorboard"
    if beside.exists() and shutil.which("tensorboard") != str(beside):
        command = os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") else str(beside)
    print(f"\nTensorBoard logs are in {logdir}/. Open them with:\n\n    {command} --logdir {logdir}\n")
    print("then look at the SCALARS tab (decay/...) and the CUSTOM SCALARS tab (one chart per decay metric).")
