"""Shared test settings: quiet, deterministic, and bounded in time."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Keep inductor's cache inside the temp dir CI cleans, and let tests opt into the compiled kernels explicitly.
os.environ.setdefault("LIT_DECAY_COMPILE", "auto")


@pytest.fixture(autouse=True)
def _seed_and_quiet() -> None:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
