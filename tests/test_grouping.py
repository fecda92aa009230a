"""param_groups()/explain() output: group dicts, the report, the partition check, errors, and random module trees."""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lit_decay
from lit_decay.grouping import GroupingOptions, check_partition, plan
from lit_decay.modes import MODES
from lit_decay.rules import GroupSettings


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def layout(groups: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    return [(g["name"], [name for name, _ in g["params"]]) for g in groups]


# --- group dicts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_group_keys_and_values_for_each_mode(mode: str) -> None:
    model = small_model()
    groups = lit_decay.param_groups(model, weight_decay=0.1, mode=mode)
    assert layout(groups) == [
        ("decay", ["0.weight", "2.weight"]),
        ("no_decay", ["0.bias", "1.weight", "1.bias", "2.bias"]),
    ]
    decay, no_decay = groups
    assert set(decay) == {"name", "params", "decay_mode", "weight_decay", "decoupled_weight_decay"}
    assert set(no_decay) == set(decay)
    assert decay["decay_mode"] == mode
    # The group's strength in every mode (one home), 0 where the mode decays nothing.
    assert decay["weight_decay"] == (0.0 if mode == "none" else 0.1)
    assert decay["decoupled_weight_decay"] is (mode == "decoupled")
    assert no_decay["decay_mode"] == "none"
    assert (no_decay["weight_decay"], no_decay["decoupled_weight_decay"]) == (0.0, False)
    assert decay["params"][0][1] is model[0].weight
    assert MODES == ("l2", "decoupled", "l1", "decoupled_l1", "none")


def test_default_mode_is_decoupled() -> None:
    (decay, _) = lit_decay.param_groups(small_model(), weight_decay=0.05)
    assert (decay["decay_mode"], decay["weight_decay"], decay["decoupled_weight_decay"]) == ("decoupled", 0.05, True)


def test_integer_weight_decay_becomes_float() -> None:
    (decay, _) = lit_decay.param_groups(small_model(), weight_decay=1)
    assert type(decay["weight_decay"]) is float


def test_empty_groups_are_left_out() -> None:
    assert layout(lit_decay.param_groups(nn.LayerNorm(3), weight_decay=0.1)) == [("no_decay", ["weight", "bias"])]
    assert layout(lit_decay.param_groups(nn.Linear(3, 3, bias=False), weight_decay=0.1)) == [("decay", ["weight"])]
    # An override group that takes everything leaves both built-in groups empty.
    assert [
        g["name"] for g in lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[{"pattern": "*"}])
    ] == ["*"]


def test_override_groups_follow_the_built_in_ones() -> None:
    overrides = [
        {"pattern": "2.*", "name": "head", "weight_decay": 0.0, "lr_scale": 10.0, "mode": "l2"},
        {"pattern": "1.weight", "name": "gain", "mode": "l1"},
    ]
    groups = lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=overrides, lr=1e-3)
    assert layout(groups) == [
        ("decay", ["0.weight"]),
        ("no_decay", ["0.bias", "1.bias"]),
        ("head", ["2.weight", "2.bias"]),
        ("gain", ["1.weight"]),
    ]
    head, gain = groups[2], groups[3]
    assert {k: v for k, v in head.items() if k != "params"} == {
        "name": "head",
        "decay_mode": "l2",
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "lr_scale": 10.0,
        "lr": pytest.approx(1e-2),
    }
    # Without its own settings an override inherits the coefficient, and gets no lr keys.
    assert {k: v for k, v in gain.items() if k != "params"} == {
        "name": "gain",
        "decay_mode": "l1",
        "weight_decay": 0.1,
        "decoupled_weight_decay": False,
    }
    assert "lr" not in groups[0] and "lr" not in groups[1]


def test_override_inherits_mode() -> None:
    groups = lit_decay.param_groups(small_model(), weight_decay=0.2, mode="l2", overrides=[{"pattern": "2.*"}])
    assert (groups[-1]["decay_mode"], groups[-1]["weight_decay"]) == ("l2", 0.2)


def test_lr_scale_without_lr_warns_at_the_caller() -> None:
    with pytest.warns(UserWarning, match=r"'head'.*lr_scale=10") as record:
        groups = lit_decay.param_groups(
            small_model(), weight_decay=0.1, overrides=[{"pattern": "2.*", "name": "head", "lr_scale": 10.0}]
        )
    assert record[0].filename == __file__
    assert groups[-1]["lr_scale"] == 10.0
    assert "lr" not in groups[-1]


def test_lr_scale_of_one_without_lr_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[{"pattern": "2.*", "lr_scale": 1}])
    assert groups[-1]["lr_scale"] == 1.0


def test_two_overrides_with_one_name_and_settings_merge() -> None:
    overrides = [
        {"pattern": "0.weight", "name": "special", "weight_decay": 0.3},
        {"pattern": "2.weight", "name": "special", "weight_decay": 0.3},
    ]
    groups = lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=overrides)
    assert layout(groups) == [
        ("no_decay", ["0.bias", "1.weight", "1.bias", "2.bias"]),
        ("special", ["0.weight", "2.weight"]),
    ]
    assert groups[1]["weight_decay"] == 0.3


def test_adam_accepts_groups_and_keeps_names() -> None:
    model = small_model()
    groups = lit_decay.param_groups(
        model, weight_decay=0.1, overrides=[{"pattern": "2.*", "name": "head", "lr_scale": 2}], lr=0.01
    )
    optimizer = torch.optim.Adam(groups, lr=0.01)
    state = optimizer.state_dict()["param_groups"]
    assert [(g["name"], g["param_names"]) for g in state] == [
        ("decay", ["0.weight"]),
        ("no_decay", ["0.bias", "1.weight", "1.bias"]),
        ("head", ["2.weight", "2.bias"]),
    ]
    assert [g["lr"] for g in state] == [0.01, 0.01, pytest.approx(0.02)]
    assert [g["weight_decay"] for g in state] == [0.1, 0.0, 0.1]
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # the extra keys must not upset the step


def test_determinism_across_calls_and_models() -> None:
    torch.manual_seed(1)
    first = lit_decay.param_groups(small_model(), weight_decay=0.1)
    torch.manual_seed(2)
    second_model = small_model()
    second = lit_decay.param_groups(second_model, weight_decay=0.1)
    again = lit_decay.param_groups(second_model, weight_decay=0.1)
    assert layout(first) == layout(second) == layout(again)
    assert [[t for _, t in g["params"]] for g in second] == [[t for _, t in g["params"]] for g in again]


# --- check_partition ----------------------------------------------------------------------------------------------


def test_check_partition_accepts_a_partition() -> None:
    model = small_model()
    check_partition(lit_decay.param_groups(model, weight_decay=0.1), model.named_parameters())


def test_check_partition_names_duplicates() -> None:
    model = small_model()
    named = list(model.named_parameters())
    groups = [{"name": "a", "params": named}, {"name": "b", "params": named[:1]}]
    with pytest.raises(RuntimeError, match=r"several groups: 0\.weight \(in 'a' and 'b'\)"):
        check_partition(groups, named)


def test_check_partition_names_missing() -> None:
    model = small_model()
    named = list(model.named_parameters())
    with pytest.raises(RuntimeError, match=r"in no group: 1\.bias, 2\.weight") as error:
        check_partition([{"name": "a", "params": named[:3] + named[5:]}], named)
    assert "several groups" not in str(error.value)


def test_check_partition_names_both() -> None:
    model = small_model()
    named = list(model.named_parameters())
    groups = [{"name": "a", "params": named[:2]}, {"name": "b", "params": named[1:2]}]
    with pytest.raises(RuntimeError) as error:
        check_partition(groups, named)
    message = str(error.value)
    assert "0.bias (in 'a' and 'b')" in message
    assert "in no group: 1.weight, 1.bias, 2.weight, 2.bias" in message


# --- GroupingReport -----------------------------------------------------------------------------------------------


class Reported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)


def reported() -> lit_decay.GroupingReport:
    return lit_decay.explain(
        Reported(), weight_decay=0.1, overrides=[{"pattern": "norm.*", "name": "norms", "lr_scale": 0.5}], lr=1e-3
    )


def test_report_rows() -> None:
    report = reported()
    assert [(r.name, r.shape, r.numel, r.group, r.reason, r.aliases) for r in report.rows] == [
        ("emb.weight", (10, 4), 40, "decay", "embedding", ("head.weight",)),
        ("body.weight", (4, 4), 16, "decay", "ndim=2 weight", ()),
        ("body.bias", (4,), 4, "no_decay", "bias", ()),
        ("norm.weight", (4,), 4, "norms", "override 'norms' (norm.*)", ()),
        ("norm.bias", (4,), 4, "norms", "override 'norms' (norm.*)", ()),
    ]
    assert [(f.name, f.shape, f.numel) for f in report.frozen] == [
        ("frozen.weight", (3, 4), 12),
        ("frozen.bias", (3,), 3),
    ]
    assert [(g.name, g.mode, g.coefficient, g.tensors, g.numel, g.lr_scale) for g in report.groups] == [
        ("decay", "decoupled", 0.1, 2, 56, None),
        ("no_decay", "none", 0.0, 1, 4, None),
        ("norms", "decoupled", 0.1, 2, 8, 0.5),
    ]
    assert report.group_of("head.weight") == "decay"
    assert report.group_of("norm.bias") == "norms"
    with pytest.raises(KeyError, match=r"frozen\.weight"):
        report.group_of("frozen.weight")


def test_report_matches_param_groups() -> None:
    model = Reported()
    options: dict[str, Any] = {"weight_decay": 0.1, "exclude_embeddings": True}
    report = lit_decay.explain(model, **options)
    groups = lit_decay.param_groups(model, **options)
    assert {r.name: r.group for r in report.rows} == {n: g["name"] for g in groups for n, _ in g["params"]}


def test_report_str_is_a_table() -> None:
    report = reported()
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "Reported: 5 trainable tensors (68 elements), 2 frozen (15 elements)"
    assert re.search(r"^\s+group\s+mode\s+coefficient\s+lr_scale\s+tensors\s+elements$", text, re.M)
    assert re.search(r"^\s+norms\s+decoupled\s+0\.1\s+0\.5\s+2\s+8$", text, re.M)
    for row in report.rows:
        matching = [line for line in lines if line.startswith(row.name + " ")]
        assert len(matching) == 1, row.name
        assert row.reason in matching[0] and row.group in matching[0]
    assert re.search(r"^emb\.weight\s+\(10, 4\)\s+40\s+decay\s+embedding; tied to head\.weight$", text, re.M)
    assert re.search(r"^frozen\.weight\s+\(3, 4\)\s+12$", text, re.M)
    assert text.startswith(report.summary())


def test_report_to_dict_is_json() -> None:
    data = json.loads(json.dumps(reported().to_dict()))
    assert set(data) == {
        "model",
        "groups",
        "parameters",
        "frozen",
        "implementation",
        "layering",
        "unmatched_no_weight_decay",
    }
    assert (data["layering"], data["unmatched_no_weight_decay"]) == (None, [])
    assert data["model"] == "Reported"
    for row in data["parameters"]:
        assert set(row) == {"name", "shape", "numel", "group", "reason", "aliases"}
    assert data["parameters"][0] == {
        "name": "emb.weight",
        "shape": [10, 4],
        "numel": 40,
        "group": "decay",
        "reason": "embedding",
        "aliases": ["head.weight"],
    }
    assert data["frozen"][0] == {"name": "frozen.weight", "shape": [3, 4], "numel": 12}
    assert [g["name"] for g in data["groups"]] == ["decay", "no_decay", "norms"]
    assert [(g["layer"], g["lr"]) for g in data["groups"]] == [(None, 1e-3), (None, 1e-3), (None, 5e-4)]


def test_report_summary_totals() -> None:
    report = reported()
    summary = report.summary()
    header = re.match(
        r"\w+: (\d+) trainable tensors \(([\d,]+) elements\), (\d+) frozen \(([\d,]+) elements\)", summary
    )
    assert header
    tensors, elements, frozen, frozen_elements = (int(x.replace(",", "")) for x in header.groups())
    assert tensors == len(report.rows) == sum(g.tensors for g in report.groups)
    assert elements == sum(r.numel for r in report.rows) == sum(g.numel for g in report.groups)
    assert (frozen, frozen_elements) == (len(report.frozen), sum(f.numel for f in report.frozen))
    rows = re.findall(r"^  (\S+)\s.*\s(\d+)\s+([\d,]+)$", summary, re.M)
    assert [(name, int(n), int(e.replace(",", ""))) for name, n, e in rows] == [
        (g.name, g.tensors, g.numel) for g in report.groups
    ]


def test_report_markdown() -> None:
    report = reported()
    markdown = report.to_markdown()
    for row in report.rows:
        assert sum(line.startswith(f"| {row.name} |") for line in markdown.splitlines()) == 1
    assert "| emb.weight | (10, 4) | 40 | decay | embedding; tied to head.weight |" in markdown
    assert "| frozen.bias | (3,) | 3 | frozen | requires_grad=False |" in markdown
    assert "| norms | decoupled | 0.1 | 0.5 | 2 | 8 |" in markdown


def test_report_with_lr_shows_each_groups_lr_and_timescale() -> None:
    report = reported()  # lr=1e-3; "norms" has lr_scale 0.5 and the decay group's decoupled mode and 0.1
    table = report.lr_table()
    assert table is not None
    assert table.rows == (("decay", "0.001", "10,000"), ("no_decay", "0.001", "–"), ("norms", "0.0005", "20,000"))
    summary = report.summary().splitlines()
    title = summary.index("Learning rates at base lr=0.001:")
    assert re.fullmatch(r"  norms\s+0\.0005\s+20,000", summary[title + 4])
    assert "| norms | 0.0005 | 20,000 |" in report.to_markdown()
    assert [g["lr"] for g in report.to_dict()["groups"]] == [0.001, 0.001, 0.0005]


def test_report_without_lr_has_no_lr_table() -> None:
    report = lit_decay.explain(Reported(), weight_decay=0.1)
    assert report.lr is None and report.lr_table() is None
    assert "Learning rates" not in str(report) and "Learning rates" not in report.to_markdown()
    assert [g["lr"] for g in report.to_dict()["groups"]] == [None, None]


@pytest.mark.parametrize(("mode", "weight_decay"), [("l2", 0.1), ("l1", 0.1), ("decoupled_l1", 0.1), ("decoupled", 0)])
def test_timescale_only_for_a_decoupled_decay(mode: str, weight_decay: float) -> None:
    report = lit_decay.explain(small_model(), weight_decay=weight_decay, mode=mode, lr=1e-3)
    table = report.lr_table()
    assert table is not None
    assert [tau for _, _, tau in table.rows] == ["–", "–"]


def test_text_and_markdown_show_the_same_cells() -> None:
    report = reported()
    text, markdown = str(report), report.to_markdown()
    tables = [report.group_table(), report.lr_table(), report.parameter_table()]
    for table in tables:
        assert table is not None
        for row in table.rows:
            assert "| " + " | ".join(row) + " |" in markdown
            assert re.search(r"^\s*" + r"\s+".join(map(re.escape, filter(None, row))) + "$", text, re.M), row


def test_override_settings_reach_the_group_and_the_report() -> None:
    overrides = [{"pattern": "2.*", "name": "head", "lr_scale": 3.0, "mode": "l1"}, {"pattern": "1.*", "name": "n"}]
    grouping = plan(small_model(), GroupingOptions(weight_decay=0.2, mode="l2", overrides=overrides, lr=0.1))
    assert grouping.settings == (
        GroupSettings("decay", "l2", 0.2),
        GroupSettings("no_decay", "none", 0.0),
        GroupSettings("head", "l1", 0.2, lr_scale=3.0),
        GroupSettings("n", "l2", 0.2),  # what an override leaves out is the decay group's
    )
    groups = grouping.groups()
    report = grouping.report()
    for group, summary in zip(groups, report.groups, strict=True):
        assert (group["name"], group["decay_mode"], group["weight_decay"], group.get("lr_scale")) == (
            summary.name,
            summary.mode,
            summary.coefficient,
            summary.lr_scale,
        )
        assert group.get("lr", 0.1) == pytest.approx(summary.scaled_lr(0.1))


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [lit_decay.param_groups, lit_decay.explain])
def test_unknown_mode(entry: Any) -> None:
    with pytest.raises(ValueError, match=r"mode='adamw'") as error:
        entry(small_model(), weight_decay=0.1, mode="adamw")
    for mode in MODES:
        assert repr(mode) in str(error.value)


@pytest.mark.parametrize(
    ("value", "shown"), [(-0.1, "-0.1"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_bad_weight_decay(value: float, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"weight_decay.*{re.escape(shown)}"):
        lit_decay.param_groups(small_model(), weight_decay=value)


@pytest.mark.parametrize("value", ["0.1", None, True, torch.tensor(0.1)])
def test_non_number_weight_decay(value: Any) -> None:
    with pytest.raises(TypeError, match=rf"weight_decay.*{type(value).__name__}"):
        lit_decay.param_groups(small_model(), weight_decay=value)


@pytest.mark.parametrize("lr", [-1e-3, math.nan])
def test_bad_lr(lr: float) -> None:
    with pytest.raises(ValueError, match=r"lr must be"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, lr=lr)


def test_all_frozen_module() -> None:
    model = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"Sequential has no trainable parameters.*all 6 are frozen.*0\.weight"):
        lit_decay.param_groups(model, weight_decay=0.1)


@pytest.mark.parametrize("module", [nn.Module(), nn.Identity(), nn.Sequential(nn.ReLU())])
def test_module_without_parameters(module: nn.Module) -> None:
    with pytest.raises(ValueError, match=rf"{type(module).__name__} has no trainable parameters"):
        lit_decay.explain(module, weight_decay=0.1)


def test_override_matching_nothing() -> None:
    with pytest.raises(ValueError, match=r"override pattern 'decoder\.\*' matches no trainable parameter.*0\.weight"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[{"pattern": "decoder.*"}])


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        (
            [{"pattern": "*"}, {"pattern": "*weight", "lr_scale": 10}],
            r"override pattern '\*weight' \(overrides\[1\]\) is shadowed: every trainable parameter it matches "
            r"\(0\.weight, 1\.weight, 2\.weight\) is taken by an earlier override \('\*'\)",
        ),
        (
            [{"pattern": "0.*", "name": "a"}, {"pattern": "2.*", "name": "b"}, {"pattern": "[02].weight", "name": "c"}],
            r"'\[02\]\.weight' \(overrides\[2\]\) is shadowed.*\('0\.\*', '2\.\*'\)",
        ),
    ],
    ids=["star-first", "two-earlier"],
)
def test_override_shadowed_by_earlier_ones(overrides: list[dict[str, Any]], shown: str) -> None:
    for entry in (lit_decay.param_groups, lit_decay.explain):
        with pytest.raises(ValueError, match=shown):
            entry(small_model(), weight_decay=0.1, overrides=overrides)


def test_override_partly_shadowed_is_fine() -> None:
    overrides = [{"pattern": "0.*", "name": "first"}, {"pattern": "*.weight", "name": "weights"}]
    groups = lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=overrides)
    assert layout(groups)[-2:] == [("first", ["0.weight", "0.bias"]), ("weights", ["1.weight", "2.weight"])]


def test_override_shadowed_through_a_tied_alias() -> None:
    model = nn.ModuleDict({"tok": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    model["head"].weight = model["tok"].weight
    with pytest.raises(ValueError, match=r"'head\.\*' \(overrides\[1\]\) is shadowed.*tok\.weight.*\('tok\.\*'\)"):
        lit_decay.explain(model, overrides=[{"pattern": "tok.*", "name": "t"}, {"pattern": "head.*", "name": "h"}])


def test_override_matching_only_frozen_parameters() -> None:
    model = small_model()
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match=r"'2\.\*' matches no trainable parameter"):
        lit_decay.param_groups(model, weight_decay=0.1, overrides=[{"pattern": "2.*"}])


@pytest.mark.parametrize("entry", [{"name": "head"}, {"pattern": ""}, {"pattern": None}])
def test_override_without_pattern(entry: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"overrides\[0\] needs a 'pattern'"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[entry])


def test_unknown_override_key() -> None:
    with pytest.raises(ValueError, match=r"overrides\[1\] has unknown key\(s\) 'lr'") as error:
        lit_decay.param_groups(
            small_model(), weight_decay=0.1, overrides=[{"pattern": "0.*"}, {"pattern": "2.*", "lr": 0.1}]
        )
    for key in ("pattern", "name", "weight_decay", "lr_scale", "mode"):
        assert key in str(error.value).split("valid keys are")[1]


def test_two_overrides_naming_one_group_differently() -> None:
    overrides = [
        {"pattern": "0.*", "name": "special", "weight_decay": 0.0},
        {"pattern": "2.*", "name": "special", "weight_decay": 0.5},
    ]
    with pytest.raises(ValueError, match=r"group 'special' differently.*weight_decay=0\.0.*weight_decay=0\.5"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=overrides)


@pytest.mark.parametrize("name", ["decay", "no_decay"])
def test_reserved_override_name(name: str) -> None:
    with pytest.raises(ValueError, match=rf"'name'='{name}' is reserved"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[{"pattern": "0.*", "name": name}])


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ({"pattern": "0.*", "name": "encoder/fast"}, r"overrides\[0\] 'name'='encoder/fast' contains '/'"),
        ({"pattern": "0/*"}, r"overrides\[0\] group name '0/\*' \(taken from its pattern\) contains '/'"),
    ],
    ids=["name", "pattern-as-name"],
)
def test_group_name_with_a_slash_is_refused(entry: dict[str, Any], shown: str) -> None:
    for build in (lit_decay.param_groups, lit_decay.explain):
        with pytest.raises(ValueError, match=shown) as error:
            build(small_model(), weight_decay=0.1, overrides=[entry])
        assert "{prefix}/{metric}/{group}" in str(error.value)


def test_explain_defaults_to_configure_adams_weight_decay() -> None:
    (decay, _) = lit_decay.explain(small_model()).groups
    assert (decay.name, decay.mode, decay.coefficient) == ("decay", "decoupled", 0.01)


@pytest.mark.parametrize(
    ("key", "value", "error", "shown"),
    [
        ("lr_scale", -1.0, ValueError, "-1.0"),
        ("lr_scale", math.nan, ValueError, "nan"),
        ("lr_scale", "10", TypeError, "'10'"),
        ("weight_decay", -0.5, ValueError, "-0.5"),
        ("weight_decay", math.inf, ValueError, "inf"),
        ("mode", "adamw", ValueError, "'adamw'"),
    ],
)
def test_bad_override_values(key: str, value: Any, error: type[Exception], shown: str) -> None:
    with pytest.raises(error, match=rf"overrides\[0\] {key}.*{re.escape(shown)}"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=[{"pattern": "0.*", key: value}])


@pytest.mark.parametrize("overrides", [{"pattern": "0.*"}, "0.*", ["0.*"]])
def test_overrides_of_the_wrong_shape(overrides: Any) -> None:
    with pytest.raises(TypeError, match="dict"):
        lit_decay.param_groups(small_model(), weight_decay=0.1, overrides=overrides)


@pytest.mark.parametrize("entry", [lit_decay.param_groups, lit_decay.explain])
@pytest.mark.parametrize("argument", [[nn.Parameter(torch.ones(2))], "model", None])
def test_non_module_argument(entry: Any, argument: Any) -> None:
    with pytest.raises(TypeError, match=rf"torch\.nn\.Module.*{type(argument).__name__}"):
        entry(argument, weight_decay=0.1)


def test_failed_call_leaves_nothing_behind() -> None:
    model = small_model()
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    attributes = set(vars(model))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # lr_scale without lr would warn if groups were built: the bad pattern must stop everything first.
        overrides = [{"pattern": "2.*", "lr_scale": 5.0}, {"pattern": "nothing.*"}]
        with pytest.raises(ValueError, match="nothing"):
            lit_decay.param_groups(model, weight_decay=0.1, overrides=overrides)
        with pytest.raises(ValueError, match="mode"):
            lit_decay.param_groups(model, weight_decay=0.1, mode="bogus", overrides=overrides)
    assert [str(w.message) for w in record] == []
    assert set(vars(model)) == attributes
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad is requires_grad
    # ...and the same model still groups fine afterwards.
    assert [g["name"] for g in lit_decay.param_groups(model, weight_decay=0.1)] == ["decay", "no_decay"]


# --- property tests: random module trees --------------------------------------------------------------------------


class Bare(nn.Module):
    """A module holding one bare Parameter of some shape (0-D temperatures, 1-D gains, 2-D tables)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(shape))


# Sizes are mostly 3 so that tensors of different kinds share shapes and can be tied to each other.
LEAVES = st.one_of(
    st.builds(nn.Linear, st.sampled_from([2, 3]), st.just(3), bias=st.booleans()),
    st.builds(nn.LayerNorm, st.sampled_from([3, (3, 3), (3, 2)])),  # 2-D norm weights: excluded as norms, not by ndim
    st.builds(nn.Embedding, st.sampled_from([3, 5]), st.just(3)),
    st.builds(nn.Conv1d, st.just(3), st.just(3), st.just(1), bias=st.booleans()),
    st.builds(nn.BatchNorm1d, st.just(3)),
    st.builds(Bare, st.sampled_from([(), (3,), (3, 2), (3, 3)])),
    st.builds(nn.ReLU),
)


def containers(children: st.SearchStrategy[nn.Module]) -> st.SearchStrategy[nn.Module]:
    lists = st.lists(children, min_size=1, max_size=4)
    return st.one_of(
        lists.map(lambda c: nn.Sequential(*c)),
        lists.map(nn.ModuleList),
        lists.map(lambda c: nn.ModuleDict({f"m{i}": m for i, m in enumerate(c)})),
    )


TREES = st.recursive(LEAVES, containers, max_leaves=12)
NORMS = (nn.LayerNorm, nn.BatchNorm1d)


def owned_parameters(root: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [
        (module, leaf, p)
        for _, module in root.named_modules(remove_duplicate=False)
        for leaf, p in module.named_parameters(recurse=False, remove_duplicate=False)
    ]


def expected_group(aliases: list[tuple[str, nn.Module]], tensor: torch.Tensor, options: dict[str, bool]) -> str:
    """An independent statement of the design's rules for this tree's kinds of layers (no overrides)."""

    def excluded(leaf: str, owner: nn.Module) -> bool:
        if isinstance(owner, NORMS) or leaf == "bias":
            return True
        if isinstance(owner, nn.Embedding):
            return options["exclude_embeddings"]
        return options["exclude_1d"] and tensor.ndim <= 1

    return "no_decay" if any(excluded(name.rpartition(".")[2], owner) for name, owner in aliases) else "decay"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=TREES, data=st.data())
def test_random_trees_are_partitioned(tree: nn.Module, data: st.DataObject) -> None:
    root = nn.ModuleDict({"tree": tree})
    owned = owned_parameters(root)
    if owned:
        # Ties: point some parameter slots at another parameter of the same shape.
        for _ in range(data.draw(st.integers(0, 4), label="ties")):
            module, leaf, _ = data.draw(st.sampled_from(owned), label="tie target")
            same_shape = [p for _, _, p in owned if p.shape == getattr(module, leaf).shape]
            setattr(module, leaf, data.draw(st.sampled_from(same_shape), label="tie source"))
        owned = owned_parameters(root)
        for _, _, p in owned:
            if data.draw(st.integers(0, 4), label="freeze") == 0:
                p.requires_grad_(False)

    names_of: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False, remove_duplicate=False):
            names_of.setdefault(id(p), []).append((f"{path}.{leaf}", module))
    tensors = {id(p): p for _, _, p in owned}
    trainable = {key for key, p in tensors.items() if p.requires_grad}

    options = {
        "exclude_embeddings": data.draw(st.booleans(), label="exclude_embeddings"),
        "exclude_1d": data.draw(st.booleans(), label="exclude_1d"),
    }

    if not trainable:
        with pytest.raises(ValueError, match="no trainable parameters"):
            lit_decay.param_groups(root, weight_decay=0.1, **options)
        return

    groups = lit_decay.param_groups(root, weight_decay=0.1, **options)
    placed = [(g["name"], name, t) for g in groups for name, t in g["params"]]
    assert len(placed) == len({id(t) for _, _, t in placed}), "a tensor is in two groups"
    assert {id(t) for _, _, t in placed} == trainable
    assert all(g["params"] for g in groups)
    assert [g["name"] for g in groups] == [n for n in ("decay", "no_decay") if n in {g for g, _, _ in placed}]
    for group, name, tensor in placed:
        aliases = names_of[id(tensor)]
        assert name == aliases[0][0]
        assert group == expected_group(aliases, tensor, options), (name, aliases)

    report = lit_decay.explain(root, weight_decay=0.1, **options)
    group_of = {id(t): group for group, _, t in placed}
    # Rows come in the order tensors first appear in the module, each under its first name, the others as aliases.
    assert [(r.name, r.group, r.aliases) for r in report.rows] == [
        (names_of[k][0][0], group_of[k], tuple(n for n, _ in names_of[k][1:])) for k in tensors if k in trainable
    ]
    assert {f.name for f in report.frozen} == {names_of[k][0][0] for k in tensors if k not in trainable}

    again = lit_decay.param_groups(root, weight_decay=0.1, **options)
    assert layout(again) == layout(groups)


TIE_KINDS = {
    "linear": lambda: nn.Linear(3, 3, bias=False),
    "embedding": lambda: nn.Embedding(3, 3),
    "norm": lambda: nn.LayerNorm((3, 3), bias=False),
    "bare": lambda: Bare((3, 3)),
}


def alias_decision(kind: str, exclude_embeddings: bool) -> tuple[str, str, int]:
    """(group, reason, rule number) the design gives one alias of a tied (3, 3) tensor, by the layer that holds it."""
    if kind == "norm":
        return ("no_decay", "normalization layer LayerNorm", 4)
    if kind == "embedding":
        if exclude_embeddings:
            return ("no_decay", "embedding (exclude_embeddings=True)", 6)
        return ("decay", "embedding", 6)
    return ("decay", "ndim=2 weight", 8)


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(TIE_KINDS)), min_size=2, max_size=5), exclude_embeddings=st.booleans())
def test_tied_tensor_is_decided_by_any_excluding_alias(kinds: list[str], exclude_embeddings: bool) -> None:
    model = nn.Sequential(*(TIE_KINDS[kind]() for kind in kinds))
    shared = next(iter(model[0].parameters()))
    for layer in model[1:]:
        setattr(layer, "value" if isinstance(layer, Bare) else "weight", shared)
    names = [f"{i}.{'value' if kind == 'bare' else 'weight'}" for i, kind in enumerate(kinds)]

    decisions = [alias_decision(kind, exclude_embeddings) for kind in kinds]
    excluded = [(d, n) for d, n in zip(decisions, names) if d[0] == "no_decay"]
    # First exclusion by the earliest rule wins; with none, the first name's decision stands.
    (group, reason, _), by = min(excluded, key=lambda item: item[0][2]) if excluded else (decisions[0], names[0])
    expected_reason = reason if by == names[0] else f"{reason} (via alias {by})"

    report = lit_decay.explain(model, weight_decay=0.1, exclude_embeddings=exclude_embeddings)
    assert [(r.name, r.group, r.reason, r.aliases) for r in report.rows] == [
        (names[0], group, expected_reason, tuple(names[1:]))
    ]
    groups = lit_decay.param_groups(model, weight_decay=0.1, exclude_embeddings=exclude_embeddings)
    assert layout(groups) == [(group, [names[0]])]
    assert groups[0]["params"][0][1] is shared


# --- layer-wise learning-rate decay ---------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Layered(nn.Module):
    """Embeddings, a stack of three blocks, a final norm and a head whose weight is tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.tokens = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.tokens.weight


def test_layer_decay_splits_groups_by_layer_and_decay() -> None:
    groups = lit_decay.param_groups(Layered(), weight_decay=0.1, lr=1.0, layer_decay=0.5)
    assert [(g["name"], g["layer"], g["lr"], g["lr_scale"], [n for n, _ in g["params"]]) for g in groups] == [
        ("layer_0.decay", 0, 0.0625, 0.0625, ["tokens.weight"]),
        ("layer_0.no_decay", 0, 0.0625, 0.0625, ["cls_token"]),
        ("layer_1.decay", 1, 0.125, 0.125, ["blocks.0.fc.weight"]),
        ("layer_1.no_decay", 1, 0.125, 0.125, ["blocks.0.fc.bias", "blocks.0.norm.weight", "blocks.0.norm.bias"]),
        ("layer_2.decay", 2, 0.25, 0.25, ["blocks.1.fc.weight"]),
        ("layer_2.no_decay", 2, 0.25, 0.25, ["blocks.1.fc.bias", "blocks.1.norm.weight", "blocks.1.norm.bias"]),
        ("layer_3.decay", 3, 0.5, 0.5, ["blocks.2.fc.weight"]),
        ("layer_3.no_decay", 3, 0.5, 0.5, ["blocks.2.fc.bias", "blocks.2.norm.weight", "blocks.2.norm.bias"]),
        # the head's weight is the embedding's tensor: it takes the layer of its first name, tokens.weight
        ("layer_4.no_decay", 4, 1.0, 1.0, ["norm.weight", "norm.bias", "head.bias"]),
    ]
    for group in groups:
        assert (group["weight_decay"] > 0) is group["name"].endswith(".decay")
        assert "/" not in group["name"]
    torch.optim.AdamW(groups, lr=1.0)  # torch takes them as they are


def test_layer_decay_report_shows_each_tensors_layer_and_lr() -> None:
    report = lit_decay.explain(Layered(), weight_decay=0.1, lr=1e-3, layer_decay=0.5)
    assert report.layering == (
        "Layer-wise lr decay 0.5: layer 0 before the blocks, layers 1-3 the blocks (blocks.{0..2}), layer 4 after "
        "them; lr = base lr * 0.5 ** (4 - layer)"
    )
    text = str(report)
    assert report.layering in text.splitlines()
    assert re.search(r"^\s+group\s+lr\s+τ", text, re.M)
    assert re.search(
        r"^blocks\.1\.fc\.weight\s+\(4, 4\)\s+16\s+layer_2\.decay\s+2\s+0\.00025\s+ndim=2 weight$", text, re.M
    )
    assert re.search(r"^head\.bias\s+\(10,\)\s+10\s+layer_4\.no_decay\s+4\s+0\.001\s+bias$", text, re.M)
    data = json.loads(json.dumps(report.to_dict()))
    for row in data["parameters"]:
        assert set(row) == {"name", "shape", "numel", "group", "reason", "aliases"}
    assert [(g["name"], g["layer"], g["lr"]) for g in data["groups"]][:2] == [
        ("layer_0.decay", 0, 1e-3 * 0.5**4),
        ("layer_0.no_decay", 0, 1e-3 * 0.5**4),
    ]
    assert data["layering"] == report.layering
    markdown = report.to_markdown()
    assert "| name | shape | numel | group | layer | lr | reason |" in markdown
    assert {r.name: r.group for r in report.rows} == {
        n: g["name"]
        for g in lit_decay.param_groups(Layered(), weight_decay=0.1, lr=1e-3, layer_decay=0.5)
        for n, _ in g["params"]
    }


def test_layer_decay_multiplies_an_overrides_lr_scale_and_splits_it_by_layer() -> None:
    overrides = [{"pattern": "*.norm.*", "name": "norms", "lr_scale": 10.0, "weight_decay": 0.0}]
    groups = lit_decay.param_groups(Layered(), weight_decay=0.1, lr=1.0, layer_decay=0.5, overrides=overrides)
    norms = [(g["name"], g["lr"]) for g in groups if g["name"].endswith(".norms")]
    assert norms == [("layer_1.norms", 1.25), ("layer_2.norms", 2.5), ("layer_3.norms", 5.0)]
    # the final norm (norm.*) is not matched by "*.norm.*": it stays in layer 4's no_decay group
    assert [n for n, _ in groups[-1]["params"]] == ["norm.weight", "norm.bias", "head.bias"]


def test_layer_decay_of_one_keeps_every_lr_and_still_names_the_layers() -> None:
    groups = lit_decay.param_groups(Layered(), weight_decay=0.1, lr=1e-3, layer_decay=1.0)
    assert {g["lr"] for g in groups} == {1e-3}
    assert [g["layer"] for g in groups] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_frozen_blocks_still_count_as_layers() -> None:
    model = Layered()
    model.blocks[0].requires_grad_(False)
    groups = lit_decay.param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)
    assert [g["name"] for g in groups][:3] == ["layer_0.decay", "layer_0.no_decay", "layer_2.decay"]
    assert groups[2]["lr"] == 0.25


class EncoderDecoder(nn.Module):
    """Two stacks side by side, as T5 and BART have, with a norm between them; blocks hold inner lists."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.ModuleDict({"block": nn.ModuleList(Block() for _ in range(2)), "final_norm": nn.LayerNorm(4)})
        self.decoder = nn.ModuleDict({"block": nn.Sequential(*(Block() for _ in range(3)))})
        for block in self.decoder["block"]:
            block.experts = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(4))  # inside a block: no stack
        self.head = nn.Linear(4, 10, bias=False)


def test_stacks_side_by_side_are_numbered_one_after_the_other() -> None:
    from lit_decay.rules import find_layers

    layers = find_layers(EncoderDecoder(), decay=0.5)
    assert layers.stacks == (("encoder.block", 2), ("decoder.block", 3))
    assert layers.blocks == 5
    expected = {
        "embed.weight": 0,
        "encoder.block.1.fc.weight": 2,
        "encoder.final_norm.weight": 2,  # between the stacks: with the block before it
        "decoder.block.0.norm.bias": 3,
        "decoder.block.2.experts.3.0.weight": 5,
        "head.weight": 6,
    }
    assert {name: layers.of_name[name] for name in expected} == expected
    assert layers.factor(6) == 1.0 and layers.factor(0) == 0.5**6


def test_blocks_are_found_through_wrappers() -> None:
    model = Layered()
    compiled = torch.compile(model)
    names = [g["name"] for g in lit_decay.param_groups(compiled, weight_decay=0.1, lr=1.0, layer_decay=0.5)]
    assert names == [g["name"] for g in lit_decay.param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)]


@pytest.mark.parametrize(
    ("value", "error", "shown"),
    [
        (0.0, ValueError, "got 0.0"),
        (1.5, ValueError, "got 1.5"),
        (-0.5, ValueError, "got -0.5"),
        (math.nan, ValueError, "got nan"),
        ("0.75", TypeError, "got '0.75' of type str"),
        (True, TypeError, "got True of type bool"),
    ],
)
def test_bad_layer_decay(value: Any, error: type[Exception], shown: str) -> None:
    for build in (lit_decay.param_groups, lit_decay.explain):
        with pytest.raises(error, match=rf"layer_decay must be a number in \(0, 1\].*{re.escape(shown)}"):
            build(Layered(), weight_decay=0.1, lr=1e-3, layer_decay=value)


def test_layer_decay_needs_lr() -> None:
    with pytest.raises(ValueError, match=r"layer_decay=0\.75 needs lr="):
        lit_decay.param_groups(Layered(), weight_decay=0.1, layer_decay=0.75)


@pytest.mark.parametrize(
    "module",
    [
        small_model(),  # a Sequential of different layers
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),  # layers, not blocks
        nn.ModuleDict({"blocks": nn.ModuleList([Block()]), "head": nn.Linear(4, 2)}),  # one block repeats nothing
    ],
    ids=["mixed", "layers", "one-block"],
)
def test_layer_decay_without_repeated_blocks_says_what_it_looked_for(module: nn.Module) -> None:
    with pytest.raises(
        ValueError, match=r"layer_decay=0\.75 needs the model's repeated blocks, but \w+ has none"
    ) as error:
        lit_decay.explain(module, lr=1e-3, layer_decay=0.75)
    assert "encoder.layer.N, h.N, layers.N, blocks.N" in str(error.value)


def test_grouping_options_keep_their_positional_order() -> None:
    options = GroupingOptions(0.1, "decoupled", False, True, (), 1e-3)
    assert options.layer_decay is None
    layered = plan(Layered(), GroupingOptions(0.1, "decoupled", False, True, (), 1.0, 0.5))
    assert [g["layer"] for g in layered.groups()][-1] == 4
