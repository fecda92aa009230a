"""Seeing through DTensor (FSDP2, tensor parallel): elementwise work runs on the local shard."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded or replicated view of a whole tensor)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard, any other tensor itself.

    Examples:
        >>> t = torch.ones(3)
        >>> local(t) is t
        True
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
