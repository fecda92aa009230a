"""Shared test settings: quiet, deterministic, and bounded in time."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch

# Keep inductor's cache inside the temp dir CI cleans, and let tests opt into the compiled kernels explicitly.
os.environ.setdefault("LIT_DECAY_COMPILE", "auto")


@pytest.fixture(autouse=True)
def _seed_and_quiet() -> None:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of tiny tensors: OpenMP workers only spin against other processes on a shared
    machine (~20x slower here). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
