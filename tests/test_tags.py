"""lit_decay.tags: every tag is built from its parts, and read back only by matching against built tags."""

from __future__ import annotations

import re

import pytest
import torch

import lit_decay
from lit_decay import METRICS
from lit_decay.tags import (
    GROUPING,
    HISTOGRAM,
    Tag,
    TagIndex,
    check_prefix,
    extra_tag,
    group_tag_pattern,
    prefixed,
    tag,
)


def test_tag_parts_in_order_and_without_a_prefix() -> None:
    assert tag("decay", "weight_norm", "no_decay") == "decay/weight_norm/no_decay"
    assert tag("train/wd", "grad_norm", "enc/dec", "w") == "train/wd/grad_norm/enc/dec/w"
    # the key StepStatistics.collect uses, and the same key under the monitor's prefix
    assert tag(None, "weight_norm", "decay") == "weight_norm/decay"
    assert tag(None, "weight_norm", "decay", "net.0.weight") == "weight_norm/decay/net.0.weight"
    assert prefixed("decay", tag(None, "weight_norm", "decay", "p0")) == tag("decay", "weight_norm", "decay", "p0")
    assert Tag("weight_norm", "decay").path("decay") == tag("decay", "weight_norm", "decay")


def test_extra_tags() -> None:
    assert extra_tag("decay", HISTOGRAM, "no_decay") == "decay/histogram/no_decay"
    assert extra_tag("decay", GROUPING) == "decay/grouping"


@pytest.mark.parametrize("prefix", ["", "/decay", "decay/", 3, None])
def test_check_prefix_refuses_what_cannot_head_a_tag(prefix: object) -> None:
    with pytest.raises(ValueError, match="prefix must be a non-empty tag prefix"):
        check_prefix(prefix)


def test_pattern_matches_the_tags_tag_builds_and_no_other() -> None:
    groups = ["decay", "enc/dec", "a+b"]
    for prefix in ("decay", "decay+l1", "train/wd"):
        pattern = group_tag_pattern(prefix, "weight_norm", groups)
        for group in groups:
            assert re.search(pattern, tag(prefix, "weight_norm", group))
            assert not re.search(pattern, tag(prefix, "weight_norm", group, "net.0.weight"))
            assert not re.search(pattern, tag(prefix, "grad_norm", group))
        assert not re.search(pattern, tag(prefix, "weight_norm", "enc"))
        loose = group_tag_pattern(prefix, "weight_norm")
        assert re.search(loose, tag(prefix, "weight_norm", "decay-1"))
        assert not re.search(loose, tag(prefix, "weight_norm", "decay", "w"))


def test_index_finds_group_and_parameter_of_names_holding_a_slash() -> None:
    index = TagIndex(METRICS, ["enc", "enc/dec", "decay"])
    for built in (
        Tag("weight_norm", "enc"),
        Tag("weight_norm", "enc/dec"),
        Tag("update_ratio", "enc/dec", "w"),
        Tag("grad_norm", "enc", "x/y"),
        Tag("decay_progress", "decay"),
    ):
        # "enc" with parameter "dec/w" and "enc/dec" with parameter "w" share a path: the longer group wins
        assert index.find(built.path()) == built
    assert index.find("weight_norm/encoder") is None
    assert index.find("unknown_metric/decay") is None


def test_index_reads_back_every_key_of_step_statistics() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    # lit_decay refuses group names holding "/", but a user-built optimizer may have them.
    groups = [
        {"params": [model[0].bias], "name": "a/b"},
        {"params": [model[0].weight, model[1].weight, model[1].bias], "name": "rest"},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    statistics = lit_decay.StepStatistics([optimizer], per_parameter=True, parameter_names=names)
    statistics.arm()
    statistics.before_step(optimizer)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    statistics.after_step(optimizer)
    figures = statistics.collect()
    index = TagIndex(METRICS, [name for group_names in statistics.names for name in group_names])
    assert figures
    for key in figures:
        found = index.find(key)
        assert found is not None and found.path() == key
    assert index.find("weight_norm/a/b") == Tag("weight_norm", "a/b")
