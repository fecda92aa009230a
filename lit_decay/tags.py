"""The one home of a figure's tag: ``{prefix}/{metric}/{group}[/{parameter}]``.

Every tag the monitor logs, every key ``lit_decay.stats.StepStatistics.collect`` returns (the same tag without a
prefix) and every chart pattern of the TensorBoard layout is built here, from its parts. A group's name may hold "/"
itself (``"enc/dec"``), so a tag cannot be split back apart by its separators: where a figure's key must be read back
(the monitor's non-finite check), ``TagIndex`` matches it against the tags built from the known metrics and groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

SEPARATOR = "/"
# Tags the monitor writes beside the metrics (TensorBoard only): weight histograms, the grouping summary, the
# per-tensor table's pages and the end-of-fit decay report.
HISTOGRAM = "histogram"
GROUPING = "grouping"
PARAMETERS = "parameters"
REPORT = "report"


@dataclass(frozen=True)
class Tag:
    """A figure's identity: which metric, of which param group, and of which parameter (None: the whole group).

    Examples:
        >>> Tag("weight_norm", "enc/dec", "w").path("decay")
        'decay/weight_norm/enc/dec/w'
        >>> Tag("weight_norm", "decay").path()
        'weight_norm/decay'
    """

    metric: str
    group: str
    parameter: str | None = None

    def path(self, prefix: str | None = None) -> str:
        """The tag as loggers see it; without ``prefix``, the key ``StepStatistics.collect`` uses."""
        parts = [prefix, self.metric, self.group, self.parameter]
        return SEPARATOR.join(part for part in parts if part is not None)


def tag(prefix: str | None, metric: str, group: str, parameter: str | None = None) -> str:
    """The tag of ``metric`` of ``group`` (and of one ``parameter`` in it), under ``prefix`` (None: no prefix).

    ``tag(None, metric, group)`` is the key of a figure in ``StepStatistics.collect``'s result, and
    ``tag(prefix, metric, group)`` the tag the monitor logs it under.

    Examples:
        >>> tag("decay", "weight_norm", "no_decay")
        'decay/weight_norm/no_decay'
        >>> tag(None, "update_ratio", "decay", "net.0.weight")
        'update_ratio/decay/net.0.weight'
    """
    return Tag(metric, group, parameter).path(prefix)


def prefixed(prefix: str, key: str) -> str:
    """A ``StepStatistics.collect`` key (built by ``tag(None, ...)``) under the monitor's ``prefix``.

    Equal to ``tag(prefix, metric, group, parameter)`` for ``key = tag(None, metric, group, parameter)``.

    Examples:
        >>> prefixed("decay", tag(None, "weight_norm", "enc/dec")) == tag("decay", "weight_norm", "enc/dec")
        True
    """
    return SEPARATOR.join((prefix, key))


def extra_tag(prefix: str, kind: str, part: str | None = None) -> str:
    """The tag of something the monitor writes beside the metrics: ``HISTOGRAM`` of a group (``part``), the
    ``GROUPING`` summary, a page (``part``, from "1") of the ``PARAMETERS`` table, or the ``REPORT``.

    Examples:
        >>> extra_tag("decay", HISTOGRAM, "no_decay"), extra_tag("decay", GROUPING), extra_tag("decay", PARAMETERS, "2")
        ('decay/histogram/no_decay', 'decay/grouping', 'decay/parameters/2')
    """
    return SEPARATOR.join(piece for piece in (prefix, kind, part) if piece is not None)


def check_prefix(prefix: Any) -> str:
    """Return ``prefix`` if it can head a tag (a non-empty string, no leading or trailing "/"), else raise.

    Examples:
        >>> check_prefix("train/decay")
        'train/decay'
        >>> check_prefix("decay/")
        Traceback (most recent call last):
        ...
        ValueError: prefix must be a non-empty tag prefix such as 'decay'; got 'decay/'
    """
    if not isinstance(prefix, str) or not prefix or prefix.startswith(SEPARATOR) or prefix.endswith(SEPARATOR):
        raise ValueError(f"prefix must be a non-empty tag prefix such as 'decay'; got {prefix!r}")
    return prefix


def group_tag_pattern(prefix: str, metric: str, groups: Sequence[str] | None = None) -> str:
    """A regular expression matching the group tags of ``metric`` and no per-parameter tag.

    With ``groups``, exactly those groups' tags (so a group whose name holds "/" is matched too); without, any group
    whose name is one segment.

    Examples:
        >>> group_tag_pattern("decay", "weight_norm")
        '^decay/weight_norm/[^/]+$'
        >>> group_tag_pattern("decay", "weight_norm", ["decay", "enc/dec"])
        '^decay/weight_norm/(decay|enc/dec)$'
    """
    any_group = f"[^{re.escape(SEPARATOR)}]+"
    group = any_group if groups is None else "(" + "|".join(re.escape(g) for g in groups) + ")"
    return "^" + SEPARATOR.join((re.escape(prefix), re.escape(metric), group)) + "$"


class TagIndex:
    """The ``Tag`` of each figure key (``tag(None, ...)``) of the given metrics and groups, found by matching the
    key against the tags built from them, never by splitting it at "/".

    A per-parameter key belongs to the longest group tag it extends: with groups ``enc`` and ``enc/dec``, the key
    ``weight_norm/enc/dec/w`` is parameter ``w`` of ``enc/dec``.

    Examples:
        >>> index = TagIndex(["weight_norm"], ["enc", "enc/dec"])
        >>> index.find("weight_norm/enc/dec/w")
        Tag(metric='weight_norm', group='enc/dec', parameter='w')
        >>> index.find("weight_norm/enc")
        Tag(metric='weight_norm', group='enc', parameter=None)
        >>> index.find("grad_norm/enc") is None
        True
    """

    def __init__(self, metrics: Iterable[str], groups: Iterable[str]) -> None:
        groups = list(groups)
        self._group_tags = {tag(None, m, g): Tag(m, g) for m in metrics for g in groups}
        # Longest first, so that a key under both "enc" and "enc/dec" goes to "enc/dec".
        self._longest_first = sorted(self._group_tags, key=len, reverse=True)

    def find(self, key: str) -> Tag | None:
        """The ``Tag`` whose path is ``key``, or None when it is no tag of these metrics and groups."""
        exact = self._group_tags.get(key)
        if exact is not None:
            return exact
        for group_key in self._longest_first:
            if key.startswith(group_key + SEPARATOR):
                owner = self._group_tags[group_key]
                return Tag(owner.metric, owner.group, key[len(group_key) + len(SEPARATOR) :])
        return None


def group_names(optimizers: Sequence[Optimizer]) -> list[list[str]]:
    """Tag names of every group: its ``"name"`` key, else ``pg1``, ``pg2``... as Lightning's LearningRateMonitor
    names them; a name seen before gets the first free ``-1``, ``-2``... (never one that another group is named),
    so several optimizers never share a tag.

    Examples:
        >>> import torch
        >>> a = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": "decay"}], lr=0.1)
        >>> b = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> group_names([a, b, a])
        [['decay'], ['pg1'], ['decay-1']]
    """
    bases = [
        [str(group.get("name", f"pg{index + 1}")) for index, group in enumerate(optimizer.param_groups)]
        for optimizer in optimizers
    ]
    reserved = {base for current in bases for base in current}
    used: set[str] = set()
    names: list[list[str]] = []
    for current in bases:
        tagged = []
        for base in current:
            name, suffix = base, 0
            while name in used or (suffix and name in reserved):
                suffix += 1
                name = f"{base}-{suffix}"
            used.add(name)
            tagged.append(name)
        names.append(tagged)
    return names
