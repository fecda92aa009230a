"""lit_decay.audit.audit_messages on its own: no Trainer, just a module and its optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lit_decay
from lit_decay.audit import audit_messages, listing


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_well_grouped_optimizers_say_nothing() -> None:
    module = model()
    built = lit_decay.configure_adam(module, lr=0.01, weight_decay=0.1)
    by_hand = torch.optim.AdamW(lit_decay.param_groups(module, weight_decay=0.1), lr=0.01)
    assert audit_messages(module, [built]) == []
    assert audit_messages(module, [by_hand]) == []


def test_hand_built_optimizer_decaying_norms_and_biases() -> None:
    module = model()
    (message,) = audit_messages(module, [torch.optim.AdamW(module.parameters(), weight_decay=0.1)])
    assert message.startswith("WeightDecayMonitor audit: optimizer 0 (AdamW) applies weight decay to 4 normalization")
    assert "1.weight (normalization layer LayerNorm)" in message and "0.bias (bias)" in message
    assert "0.weight" not in message.replace("1.weight", "")
    # a zero coefficient decays nothing
    assert audit_messages(module, [torch.optim.AdamW(module.parameters(), weight_decay=0.0)]) == []


def test_l1_groups_in_an_optimizer_that_cannot_apply_them() -> None:
    module = model()
    optimizer = torch.optim.Adam(lit_decay.param_groups(module, weight_decay=0.1, mode="decoupled_l1"), lr=0.01)
    (message,) = audit_messages(module, [optimizer])
    assert "group(s) decay (decoupled_l1, applied as l2) whose decay_mode only lit_decay.Adam applies" in message
    assert "Adam reads their weight_decay as its own decay" in message
    # lit_decay.Adam applies it: nothing to say
    assert audit_messages(module, [lit_decay.configure_adam(module, weight_decay=0.1, mode="decoupled_l1")]) == []


def test_trainable_parameters_in_no_optimizer() -> None:
    module = model()
    module[2].weight.requires_grad_(False)  # frozen: not missing
    (message,) = audit_messages(module, [lit_decay.configure_adam(module[0], weight_decay=0.1)])
    assert "3 trainable parameter(s) are in no optimizer" in message
    assert "1.weight, 1.bias, 2.bias" in message


def test_a_timescale_longer_than_the_run_is_no_defect() -> None:
    """A smoke test's τ is always longer than its few steps: information for the summary, never an audit warning."""
    module = model()
    optimizer = lit_decay.configure_adam(module, lr=1e-3, weight_decay=0.01, mode="decoupled")
    assert audit_messages(module, [optimizer]) == []


def test_lazy_module_skips_the_norm_and_bias_check() -> None:
    module = nn.Sequential(nn.LazyLinear(4), nn.LayerNorm(4))
    messages = audit_messages(module, [torch.optim.AdamW(module.parameters(), weight_decay=0.1)])
    assert len(messages) == 1 and "could not check which parameters are normalization or bias" in messages[0]


@pytest.mark.parametrize(("count", "expected"), [(2, "a, b"), (12, "a, b, ... (10 more)")])
def test_listing(count: int, expected: str) -> None:
    assert listing(["a", "b", *["x"] * (count - 2)], limit=2) == expected
