"""Which parameter lands in which group, and why: one small module per rule, with exact name sets and reasons."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lit_decay
from lit_decay.rules import clean_name, unwrap


def decisions(module: nn.Module, **options: Any) -> dict[str, tuple[str, str]]:
    """{first name: (group, reason)} for every trainable tensor, from explain()."""
    return {row.name: (row.group, row.reason) for row in lit_decay.explain(module, **options).rows}


def group_names(module: nn.Module, **options: Any) -> dict[str, set[str]]:
    """{group: names} from param_groups(), the form the optimizer receives."""
    options.setdefault("weight_decay", 0.1)
    return {g["name"]: {name for name, _ in g["params"]} for g in lit_decay.param_groups(module, **options)}


def assert_split(module: nn.Module, decay: set[str], no_decay: set[str], **options: Any) -> None:
    groups = group_names(module, **options)
    assert groups.get("decay", set()) == decay
    assert groups.get("no_decay", set()) == no_decay
    assert set(groups) <= {"decay", "no_decay"}


# --- plain torch layers -------------------------------------------------------------------------------------------


def test_linear() -> None:
    assert decisions(nn.Linear(3, 2)) == {"weight": ("decay", "ndim=2 weight"), "bias": ("no_decay", "bias")}
    assert_split(nn.Linear(3, 2, bias=False), {"weight"}, set())


@pytest.mark.parametrize(
    ("layer", "ndim"), [(nn.Conv1d(2, 3, 3), 3), (nn.Conv2d(2, 3, 3), 4), (nn.ConvTranspose2d(2, 3, 3), 4)]
)
def test_convolutions(layer: nn.Module, ndim: int) -> None:
    assert decisions(layer) == {"weight": ("decay", f"ndim={ndim} weight"), "bias": ("no_decay", "bias")}


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.InstanceNorm1d(4, affine=True),
        nn.InstanceNorm2d(4, affine=True),
        nn.InstanceNorm3d(4, affine=True),
        nn.LayerNorm(4),
        nn.LayerNorm((2, 4)),  # 2-D weight: excluded for being a norm, not for its ndim
        nn.GroupNorm(2, 4),
    ],
    ids=lambda m: type(m).__name__,
)
def test_torch_norms_with_weight_and_bias(norm: nn.Module) -> None:
    reason = f"normalization layer {type(norm).__name__}"
    assert decisions(norm) == {"weight": ("no_decay", reason), "bias": ("no_decay", reason)}
    assert_split(norm, set(), {"weight", "bias"})
    # The norm rule comes before the 1-D rule, so exclude_1d=False must not pull norm weights into decay.
    assert_split(norm, set(), {"weight", "bias"}, exclude_1d=False)


def test_rmsnorm() -> None:
    assert decisions(nn.RMSNorm(4)) == {"weight": ("no_decay", "normalization layer RMSNorm")}


def test_lazy_batchnorm_after_materialising() -> None:
    norm = nn.LazyBatchNorm1d()
    norm(torch.randn(4, 3))
    assert decisions(norm) == {
        "weight": ("no_decay", "normalization layer BatchNorm1d"),
        "bias": ("no_decay", "normalization layer BatchNorm1d"),
    }


def test_lazy_linear_after_materialising_decays_its_weight() -> None:
    layer = nn.LazyLinear(3)
    layer(torch.randn(2, 5))
    assert_split(layer, {"weight"}, {"bias"})


def test_uninitialised_lazy_parameter_is_refused_not_silently_undecayed() -> None:
    # An UninitializedParameter looks 1-D (torch.Size([0])); grouping it by ndim would keep a Linear weight out of
    # decay without a word. Building groups before the dry run must fail and say what to do.
    with pytest.raises(ValueError, match=r"(?is)weight.*(lazy|uninitiali[sz]ed)|(lazy|uninitiali[sz]ed).*weight"):
        lit_decay.param_groups(nn.LazyLinear(3), weight_decay=0.1)


def test_multihead_attention() -> None:
    attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert decisions(attention) == {
        "in_proj_weight": ("decay", "ndim=2 weight"),
        "in_proj_bias": ("no_decay", "bias"),
        "bias_k": ("no_decay", "bias"),
        "bias_v": ("no_decay", "bias"),
        "out_proj.weight": ("decay", "ndim=2 weight"),
        "out_proj.bias": ("no_decay", "bias"),
    }


def test_multihead_attention_with_separate_projections() -> None:
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert_split(
        attention,
        {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"},
        {"in_proj_bias", "out_proj.bias"},
    )


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers(cls: type[nn.Module]) -> None:
    found = decisions(cls(4, 8, num_layers=2, bidirectional=True))
    weights = {f"weight_{k}_l{i}{s}" for k in ("ih", "hh") for i in (0, 1) for s in ("", "_reverse")}
    biases = {f"bias_{k}_l{i}{s}" for k in ("ih", "hh") for i in (0, 1) for s in ("", "_reverse")}
    assert found == {
        **dict.fromkeys(weights, ("decay", "ndim=2 weight")),
        **dict.fromkeys(biases, ("no_decay", "bias")),
    }


def test_lstm_projection_weight_is_decayed() -> None:
    assert_split(
        nn.LSTM(4, 8, proj_size=3), {"weight_ih_l0", "weight_hh_l0", "weight_hr_l0"}, {"bias_ih_l0", "bias_hh_l0"}
    )


@pytest.mark.parametrize("layer", [nn.Embedding(10, 4), nn.EmbeddingBag(10, 4)], ids=lambda m: type(m).__name__)
def test_embeddings(layer: nn.Module) -> None:
    assert decisions(layer) == {"weight": ("decay", "embedding")}
    assert decisions(layer, exclude_embeddings=True) == {"weight": ("no_decay", "embedding (exclude_embeddings=True)")}
    assert_split(layer, set(), {"weight"}, exclude_embeddings=True)


@pytest.mark.parametrize("num_parameters", [1, 5])
def test_prelu_and_exclude_1d(num_parameters: int) -> None:
    prelu = nn.PReLU(num_parameters)
    assert decisions(prelu) == {"weight": ("no_decay", "ndim=1 parameter")}
    assert decisions(prelu, exclude_1d=False) == {"weight": ("decay", "ndim=1 parameter (exclude_1d=False)")}


class Scaled(nn.Module):
    """Parameters set directly on the root: a 2-D mixing matrix and a scalar temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(3, 3))
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.layer_scale = nn.Parameter(torch.ones(3))


def test_parameters_on_the_root_module() -> None:
    assert decisions(Scaled()) == {
        "mix": ("decay", "ndim=2 weight"),
        "temperature": ("no_decay", "ndim=0 parameter"),
        "layer_scale": ("no_decay", "ndim=1 parameter"),
    }
    assert decisions(Scaled(), exclude_1d=False) == {
        "mix": ("decay", "ndim=2 weight"),
        "temperature": ("decay", "ndim=0 parameter (exclude_1d=False)"),
        "layer_scale": ("decay", "ndim=1 parameter (exclude_1d=False)"),
    }


# --- a model's own classes ----------------------------------------------------------------------------------------


class MyRMSNorm(nn.Module):
    """A norm that subclasses nothing from torch's norms: recognised by its class name only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.gain_matrix = nn.Parameter(torch.ones(dim, dim))  # 2-D, still the norm's own


class AdaptiveNorm(nn.Module):
    """A class whose name contains Norm and which also holds a child Linear (e.g. adaLN's modulation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.modulation = nn.Linear(dim, 2 * dim)


def test_custom_norm_class_by_name() -> None:
    assert decisions(nn.Sequential(nn.Linear(4, 4, bias=False), MyRMSNorm(4))) == {
        "0.weight": ("decay", "ndim=2 weight"),
        "1.weight": ("no_decay", "normalization layer MyRMSNorm"),
        "1.gain_matrix": (
            "no_decay",
            "normalization layer MyRMSNorm by class name only, yet ndim=2: add an override if this is a weight matrix",
        ),
    }


def test_only_direct_parameters_of_a_norm_are_excluded() -> None:
    assert decisions(AdaptiveNorm(4)) == {
        "scale": ("no_decay", "normalization layer AdaptiveNorm"),
        "modulation.weight": ("decay", "ndim=2 weight"),
        "modulation.bias": ("no_decay", "bias"),
    }


# --- tied weights -------------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(4, 10, bias=False)
            self.tok = nn.Embedding(10, 4)
        else:
            self.tok = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tok.weight


def test_tied_embedding_is_one_row_with_its_alias() -> None:
    model = TiedLM()
    report = lit_decay.explain(model, weight_decay=0.1)
    assert [(r.name, r.group, r.reason, r.aliases) for r in report.rows] == [
        ("tok.weight", "decay", "embedding", ("head.weight",))
    ]
    assert report.group_of("head.weight") == "decay"
    groups = lit_decay.param_groups(model, weight_decay=0.1)
    assert [(g["name"], [n for n, _ in g["params"]]) for g in groups] == [("decay", ["tok.weight"])]
    assert groups[0]["params"][0][1] is model.tok.weight
    assert "tied to head.weight" in str(report)


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_embedding_excluded_through_any_alias(head_first: bool) -> None:
    report = lit_decay.explain(TiedLM(head_first), weight_decay=0.1, exclude_embeddings=True)
    assert len(report.rows) == 1
    (row,) = report.rows
    assert row.group == "no_decay"
    assert "embedding (exclude_embeddings=True)" in row.reason
    if head_first:  # decided by the embedding name, which is the alias here
        assert (row.name, row.aliases) == ("head.weight", ("tok.weight",))
        assert row.reason == "embedding (exclude_embeddings=True) (via alias tok.weight)"
    else:
        assert (row.name, row.aliases, row.reason) == (
            "tok.weight",
            ("head.weight",),
            "embedding (exclude_embeddings=True)",
        )


class BiasAlias(nn.Module):
    """A 2-D tensor shared by a Linear weight and a relative-position table whose name ends in ``_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.rel = nn.Module()
        self.rel.attn_bias = self.proj.weight


def test_tie_with_a_bias_like_alias_is_excluded() -> None:
    report = lit_decay.explain(BiasAlias(), weight_decay=0.1)
    assert [(r.name, r.group, r.reason, r.aliases) for r in report.rows] == [
        ("proj.weight", "no_decay", "bias (via alias rel.attn_bias)", ("rel.attn_bias",))
    ]


def test_same_module_registered_twice() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = lit_decay.explain(model)
    assert [(r.name, r.group, r.aliases) for r in report.rows] == [
        ("0.weight", "decay", ("2.weight",)),
        ("0.bias", "no_decay", ("2.bias",)),
    ]


# --- frozen parameters --------------------------------------------------------------------------------------------


def test_frozen_submodule_is_absent_and_listed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = lit_decay.param_groups(model, weight_decay=0.1)
    in_groups = {name for g in groups for name, _ in g["params"]}
    assert in_groups == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert all(t.requires_grad for g in groups for _, t in g["params"])
    report = lit_decay.explain(model)
    assert [(f.name, f.shape, f.numel) for f in report.frozen] == [("0.weight", (4, 4), 16), ("0.bias", (4,), 4)]
    assert {r.name for r in report.rows} == in_groups


# --- wrappers and no_weight_decay() -------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rel_pos = nn.Parameter(torch.zeros(4, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def no_weight_decay(self) -> set[str]:
        return {"rel_pos", "proj.bias"}


class ViTLike(nn.Module):
    """timm's convention: ``no_weight_decay()`` names relative to the module that declares them."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.encoder = Encoder()
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.norm(self.encoder.proj(x)))


VIT_DECISIONS = {
    "pos_embed": ("no_decay", "no_weight_decay() of the root module"),
    "cls_token": ("no_decay", "no_weight_decay() of the root module"),
    "encoder.rel_pos": ("no_decay", "no_weight_decay() of encoder"),
    "encoder.proj.weight": ("decay", "ndim=2 weight"),
    "encoder.proj.bias": ("no_decay", "no_weight_decay() of encoder"),  # beats the bias rule
    "encoder.norm.weight": ("no_decay", "normalization layer LayerNorm"),
    "encoder.norm.bias": ("no_decay", "normalization layer LayerNorm"),
    "head.weight": ("decay", "ndim=2 weight"),
    "head.bias": ("no_decay", "bias"),
}


class MyDataParallel(nn.Module):
    """A look-alike of DDP from some other library: no parameters of its own, the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def check_wrapped(wrapped: nn.Module, inner: nn.Module) -> None:
    assert unwrap(wrapped) is inner
    assert decisions(wrapped) == VIT_DECISIONS
    report = lit_decay.explain(wrapped)
    assert report.model == "ViTLike"
    names = {name for g in lit_decay.param_groups(wrapped, weight_decay=0.1) for name, _ in g["params"]}
    assert names == set(VIT_DECISIONS)
    assert not any("module." in n or "_orig_mod" in n for n in names)


def test_no_weight_decay_unwrapped() -> None:
    assert decisions(ViTLike()) == VIT_DECISIONS


def test_no_weight_decay_through_distributed_data_parallel(tmp_path: Any) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = ViTLike()
        check_wrapped(nn.parallel.DistributedDataParallel(model), model)
    finally:
        dist.destroy_process_group()


def test_no_weight_decay_through_data_parallel() -> None:
    model = ViTLike()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DataParallel on a machine without GPUs just wraps, and may say so
        wrapped = nn.DataParallel(model)
    check_wrapped(wrapped, model)


def test_no_weight_decay_through_duck_typed_data_parallel() -> None:
    model = ViTLike()
    check_wrapped(MyDataParallel(model), model)


def test_no_weight_decay_through_torch_compile() -> None:
    model = ViTLike()
    check_wrapped(torch.compile(model), model)


def test_nested_wrappers() -> None:
    model = ViTLike()
    check_wrapped(MyDataParallel(torch.compile(model)), model)


def test_compiled_submodule_keeps_user_names() -> None:
    model = ViTLike()
    model.encoder = torch.compile(model.encoder)
    assert decisions(model) == VIT_DECISIONS


def test_no_weight_decay_prefix_and_pattern() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
            self.gates = nn.ParameterList(nn.Parameter(torch.ones(3, 3)) for _ in range(2))

        def no_weight_decay(self) -> list[str]:
            return ["blocks.1", "gates.*"]

    assert decisions(Model()) == {
        "blocks.0.weight": ("decay", "ndim=2 weight"),
        "blocks.0.bias": ("no_decay", "bias"),
        "blocks.1.weight": ("no_decay", "no_weight_decay() of the root module"),
        "blocks.1.bias": ("no_decay", "no_weight_decay() of the root module"),
        "gates.0": ("no_decay", "no_weight_decay() of the root module"),
        "gates.1": ("no_decay", "no_weight_decay() of the root module"),
    }


def test_no_weight_decay_beats_norm_rule() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(3)

        def no_weight_decay(self) -> set[str]:
            return {"norm.weight"}

    assert decisions(Model()) == {
        "norm.weight": ("no_decay", "no_weight_decay() of the root module"),
        "norm.bias": ("no_decay", "normalization layer LayerNorm"),
    }


def test_user_submodule_called_module_is_not_unwrapped() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    holder = Holder()
    assert unwrap(holder) is holder
    assert set(decisions(holder)) == {"module.weight", "module.bias"}


def test_data_parallel_named_class_with_own_parameters_is_not_unwrapped() -> None:
    class OddDataParallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2, 2))

    model = OddDataParallel()
    assert unwrap(model) is model
    assert set(decisions(model)) == {"scale", "module.weight", "module.bias"}


def test_unwrap_leaves_plain_modules_alone() -> None:
    for module in (nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), ViTLike()):
        assert unwrap(module) is module


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("blocks.0._checkpoint_wrapped_module.attn.weight", "blocks.0.attn.weight"),
        ("_orig_mod.head.weight", "head.weight"),
        ("encoder._orig_mod.layers.0._fsdp_wrapped_module.weight", "encoder.layers.0.weight"),
        ("module.weight", "module.weight"),  # a user's own submodule may be called "module"
        ("weight", "weight"),
        ("orig_mod.weight", "orig_mod.weight"),
    ],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


# --- overrides ----------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.emb = nn.Embedding(5, 4)
        self.temp = nn.Parameter(torch.tensor(1.0))

    def no_weight_decay(self) -> set[str]:
        return {"body.weight"}


def test_override_beats_every_other_rule() -> None:
    overrides = [{"pattern": "*", "name": "everything"}]
    found = decisions(Net(), overrides=overrides, exclude_embeddings=True)
    assert found == dict.fromkeys(
        ["body.weight", "body.bias", "norm.weight", "norm.bias", "head.weight", "head.bias", "emb.weight", "temp"],
        ("everything", "override 'everything' (*)"),
    )


def test_first_matching_override_wins() -> None:
    overrides = [
        {"pattern": "head.*", "name": "head", "lr_scale": 10.0},
        {"pattern": "*.weight", "name": "weights", "weight_decay": 0.5},
        {"pattern": "norm.*", "name": "norm"},
    ]
    found = decisions(Net(), overrides=overrides)
    assert found == {
        "body.weight": ("weights", "override 'weights' (*.weight)"),
        "body.bias": ("no_decay", "bias"),
        "norm.weight": ("weights", "override 'weights' (*.weight)"),
        "norm.bias": ("norm", "override 'norm' (norm.*)"),
        "head.weight": ("head", "override 'head' (head.*)"),
        "head.bias": ("head", "override 'head' (head.*)"),
        "emb.weight": ("weights", "override 'weights' (*.weight)"),
        "temp": ("no_decay", "ndim=0 parameter"),
    }


def test_override_name_defaults_to_pattern() -> None:
    assert decisions(nn.Sequential(nn.Linear(2, 2)), overrides=[{"pattern": "0.b*"}])["0.bias"] == (
        "0.b*",
        "override '0.b*' (0.b*)",
    )


def test_override_matching_a_tie_through_its_alias() -> None:
    report = lit_decay.explain(TiedLM(), overrides=[{"pattern": "head.*", "name": "head"}])
    assert [(r.name, r.group, r.reason) for r in report.rows] == [
        ("tok.weight", "head", "override 'head' (head.*) (via alias head.weight)")
    ]


def test_rule_numbers_follow_the_design_order() -> None:
    from lit_decay import rules

    assert (
        rules.RULE_OVERRIDE,
        rules.RULE_NO_WEIGHT_DECAY,
        rules.RULE_NORMALIZATION,
        rules.RULE_BIAS,
        rules.RULE_EMBEDDING,
        rules.RULE_1D,
        rules.RULE_DEFAULT,
    ) == (2, 3, 4, 5, 6, 7, 8)
    placements, frozen = rules.place_parameters(Net(), overrides=rules.parse_overrides([{"pattern": "head.weight"}]))
    assert frozen == []
    assert {p.name: p.rule for p in placements} == {
        "body.weight": rules.RULE_NO_WEIGHT_DECAY,
        "body.bias": rules.RULE_BIAS,
        "norm.weight": rules.RULE_NORMALIZATION,
        "norm.bias": rules.RULE_NORMALIZATION,
        "head.weight": rules.RULE_OVERRIDE,
        "head.bias": rules.RULE_BIAS,
        "emb.weight": rules.RULE_EMBEDDING,
        "temp": rules.RULE_1D,
    }


@pytest.mark.parametrize(
    ("leaf", "expected"),
    [
        ("bias", True),
        ("in_proj_bias", True),
        ("bias_ih_l0", True),
        ("bias_k", True),
        ("q_bias", True),
        ("relative_position_bias_table", True),
        ("attn_bias_scale", True),
        ("weight", False),
        ("bias-table", False),
        ("biased_weight", False),
        ("unbiased", False),
        ("biases", False),
    ],
)
def test_is_bias_name(leaf: str, expected: bool) -> None:
    from lit_decay.rules import is_bias_name

    assert is_bias_name(leaf) is expected


def test_is_normalization() -> None:
    from lit_decay.rules import is_normalization

    assert all(is_normalization(m) for m in (nn.BatchNorm2d(2), nn.GroupNorm(1, 2), MyRMSNorm(2), AdaptiveNorm(2)))
    assert not any(is_normalization(m) for m in (nn.Linear(2, 2), nn.Embedding(2, 2), nn.PReLU(), Scaled()))
    named_norm_but_weights = (ScaledNormedEmbedding(3, 2), WeightNormLinear(2, 2), NormConv2d(1, 1, 1))
    assert not any(is_normalization(m) for m in named_norm_but_weights)


# --- the rules sharpened against published recipes ------------------------------------------------------------------


class ScaledNormedEmbedding(nn.Embedding):
    """An embedding table whose class name contains "Norm" (transformers has several ``*NormedEmbedding``s)."""


class WeightNormLinear(nn.Linear):
    """A linear layer whose class name contains "Norm"."""


class NormConv2d(nn.Conv2d):
    """A convolution whose class name contains "Norm"."""


def test_embedding_linear_and_conv_subclasses_named_norm_are_not_normalization_layers() -> None:
    model = nn.ModuleDict(
        {"tokens": ScaledNormedEmbedding(10, 4), "proj": WeightNormLinear(4, 4), "conv": NormConv2d(4, 4, 3)}
    )
    assert decisions(model) == {
        "tokens.weight": ("decay", "embedding"),
        "proj.weight": ("decay", "ndim=2 weight"),
        "proj.bias": ("no_decay", "bias"),
        "conv.weight": ("decay", "ndim=4 weight"),
        "conv.bias": ("no_decay", "bias"),
    }
    assert decisions(model, exclude_embeddings=True)["tokens.weight"] == (
        "no_decay",
        "embedding (exclude_embeddings=True)",
    )


class MambaMixer(nn.Module):
    """The parameters of transformers' ``MambaMixer`` (mamba_ssm's ``Mamba``), without the ``_no_weight_decay`` mark."""

    def __init__(self, d_inner: int = 6, d_state: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(3, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, 4, groups=d_inner)
        self.dt_proj = nn.Linear(2, d_inner)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))


class Mamba2Mixer(MambaMixer):
    """transformers' ``Mamba2Mixer`` keeps 1-D ``A_log``, ``D`` and ``dt_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(6))
        self.dt_bias = nn.Parameter(torch.zeros(6))


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_mamba_a_log_and_d_are_not_decayed(exclude_1d: bool) -> None:
    found = decisions(nn.ModuleDict({"mixer": MambaMixer()}), exclude_1d=exclude_1d)
    assert found["mixer.A_log"] == ("no_decay", "Mamba A_log of MambaMixer (mamba_ssm marks it _no_weight_decay)")
    assert found["mixer.D"] == ("no_decay", "Mamba D of MambaMixer (mamba_ssm marks it _no_weight_decay)")
    assert found["mixer.in_proj.weight"] == found["mixer.dt_proj.weight"] == ("decay", "ndim=2 weight")
    assert found["mixer.conv1d.weight"] == ("decay", "ndim=3 weight")
    assert found["mixer.dt_proj.bias"] == found["mixer.conv1d.bias"] == ("no_decay", "bias")

    found = decisions(Mamba2Mixer(), exclude_1d=exclude_1d)
    assert found["A_log"] == ("no_decay", "Mamba A_log of Mamba2Mixer (mamba_ssm marks it _no_weight_decay)")
    assert found["D"][0] == "no_decay"
    assert found["dt_bias"] == ("no_decay", "bias")


def test_a_log_and_d_outside_a_mamba_module_follow_the_other_rules() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.A_log = nn.Parameter(torch.zeros(3, 3))
            self.D = nn.Parameter(torch.ones(3))

    assert decisions(Gate(), exclude_1d=False) == {
        "A_log": ("decay", "ndim=2 weight"),
        "D": ("decay", "ndim=1 parameter (exclude_1d=False)"),
    }


def test_no_weight_decay_mark_on_a_tensor() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight._no_weight_decay = True  # type: ignore[attr-defined]  # mamba_ssm's convention
    model[0].weight._no_weight_decay = False  # type: ignore[attr-defined]
    assert decisions(model) == {
        "0.weight": ("decay", "ndim=2 weight"),
        "0.bias": ("no_decay", "bias"),
        "1.weight": ("no_decay", "marked _no_weight_decay (mamba_ssm convention)"),
        "1.bias": ("no_decay", "bias"),
    }
    overridden = decisions(model, overrides=[{"pattern": "1.weight", "name": "mixer"}])
    assert overridden["1.weight"] == ("mixer", "override 'mixer' (1.weight)")


class SwinAttention(nn.Module):
    """Swin's relative position table (a raw 2-D parameter) and BEiT-style ``q_bias``/``v_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.qkv = nn.Linear(4, 12, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(4))
        self.v_bias = nn.Parameter(torch.zeros(4))


class T5Attention(nn.Module):
    """T5's relative attention bias: an ``nn.Embedding`` whose *module* is named ``relative_attention_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4, bias=False)
        self.relative_attention_bias = nn.Embedding(32, 2)
        self.token_embeddings = nn.Embedding(10, 4)  # a plain table next to it keeps the embedding rule


@pytest.mark.parametrize("exclude_embeddings", [False, True])
def test_attention_bias_tables_are_not_decayed(exclude_embeddings: bool) -> None:
    options = {"exclude_embeddings": exclude_embeddings, "exclude_1d": False}
    assert decisions(SwinAttention(), **options) == {
        "relative_position_bias_table": ("no_decay", "bias table (name part 'bias')"),
        "qkv.weight": ("decay", "ndim=2 weight"),
        "q_bias": ("no_decay", "bias"),
        "v_bias": ("no_decay", "bias"),
    }
    table = "embedding (exclude_embeddings=True)" if exclude_embeddings else "embedding"
    assert decisions(T5Attention(), **options) == {
        "q.weight": ("decay", "ndim=2 weight"),
        "relative_attention_bias.weight": (
            "no_decay",
            "bias table (embedding relative_attention_bias, name part 'bias')",
        ),
        "token_embeddings.weight": ("no_decay" if exclude_embeddings else "decay", table),
    }


class RawEmbeddings(nn.Module):
    """timm's and transformers' raw embedding parameters, with no ``no_weight_decay()``, beside embedding tables."""

    TOKENS = ("cls_token", "dist_token", "distillation_token", "reg_token", "register_tokens", "mask_token")
    POSITIONS = ("pos_embed", "absolute_pos_embed", "position_embeddings")

    def __init__(self) -> None:
        super().__init__()
        for name in self.TOKENS:
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, 4)))
        for name in self.POSITIONS:
            setattr(self, name, nn.Parameter(torch.zeros(1, 5, 4)))
        self.register_tokens = nn.Parameter(torch.zeros(1, 4, 4))  # DINOv2's: several tokens
        self.prompt_tokens = nn.Parameter(torch.zeros(1, 3, 4))  # no conventional name: an ordinary weight
        # BERT's tables: an nn.Embedding called position_embeddings is a table, not a raw parameter.
        self.text = nn.ModuleDict({"position_embeddings": nn.Embedding(8, 4), "word_embeddings": nn.Embedding(9, 4)})


RAW_TOKENS = {name: ("no_decay", f"token embedding ({name})") for name in RawEmbeddings.TOKENS}
RAW_POSITIONS = {name: ("no_decay", f"position embedding ({name})") for name in RawEmbeddings.POSITIONS}


@pytest.mark.parametrize("options", [{}, {"exclude_1d": False}], ids=["default", "decay_1d"])
def test_raw_token_and_position_embeddings_are_not_decayed_and_tables_are(options: dict[str, bool]) -> None:
    assert decisions(RawEmbeddings(), **options) == {
        **RAW_TOKENS,
        **RAW_POSITIONS,
        "prompt_tokens": ("decay", "ndim=3 weight"),
        "text.position_embeddings.weight": ("decay", "embedding"),
        "text.word_embeddings.weight": ("decay", "embedding"),
    }


def test_exclude_embeddings_takes_the_tables_out_and_leaves_the_tokens_as_they_are() -> None:
    table = ("no_decay", "embedding (exclude_embeddings=True)")
    assert decisions(RawEmbeddings(), exclude_embeddings=True) == {
        **RAW_TOKENS,
        **RAW_POSITIONS,
        "prompt_tokens": ("decay", "ndim=3 weight"),
        "text.position_embeddings.weight": table,
        "text.word_embeddings.weight": table,
    }
    # A no_weight_decay() declaration still comes first (rule 3), and an override before it (rule 2).
    assert decisions(ViTLike())["cls_token"] == ("no_decay", "no_weight_decay() of the root module")
    overridden = decisions(RawEmbeddings(), overrides=[{"pattern": "cls_token", "name": "tokens"}])["cls_token"]
    assert overridden == ("tokens", "override 'tokens' (cls_token)")


# --- rule 7: vectors once size-1 dimensions are dropped -----------------------------------------------------------


class GRN(nn.Module):
    """ConvNeXt-V2's global response normalization as transformers writes it (``ConvNextV2GRN``): ``(1, 1, 1, C)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, channels))


class ScaledStdConv2d(nn.Conv2d):
    """An NFNet weight-standardised convolution (timm's ``ScaledStdConv2d``): a per-channel ``gain``, ``(C, 1, 1, 1)``.

    Its shape is timm's (``timm/layers/std_conv.py``); DeepMind's NFNet recipe keeps every ``gain`` out of decay.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))


class PerChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grn = GRN(8)
        self.conv = ScaledStdConv2d(3, 8)
        self.depthwise = nn.Conv2d(8, 8, 1, groups=8, bias=False)  # (C, 1, 1, 1): a convolution's kernel
        self.score = nn.Linear(8, 1, bias=False)  # (1, C): a linear layer's weight
        self.narrow = nn.Conv2d(8, 1, 1, bias=False)  # (1, C, 1, 1)
        self.one = nn.Embedding(1, 8)  # (1, C): an embedding table of one row
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.temperature = nn.Parameter(torch.ones(1, 1))
        self.matrix = nn.Parameter(torch.ones(1, 8, 8))


def test_per_channel_tensors_are_vectors_but_layer_weights_are_not() -> None:
    layer_weights = {
        "conv.weight": ("decay", "ndim=4 weight"),
        "depthwise.weight": ("decay", "ndim=4 weight"),
        "score.weight": ("decay", "ndim=2 weight"),
        "narrow.weight": ("decay", "ndim=4 weight"),
        "one.weight": ("decay", "embedding"),
        "matrix": ("decay", "ndim=3 weight"),
    }
    assert decisions(PerChannel()) == {
        "grn.weight": ("no_decay", "per-channel (1, 1, 1, C) parameter"),
        "grn.bias": ("no_decay", "bias"),
        "conv.gain": ("no_decay", "per-channel (C, 1, 1, 1) parameter"),
        "conv.bias": ("no_decay", "bias"),
        "scale": ("no_decay", "per-channel (1, C, 1, 1) parameter"),
        "temperature": ("no_decay", "per-channel (1, 1) parameter"),
        **layer_weights,
    }
    assert decisions(PerChannel(), exclude_1d=False) == {
        "grn.weight": ("decay", "per-channel (1, 1, 1, C) parameter (exclude_1d=False)"),
        "grn.bias": ("no_decay", "bias"),
        "conv.gain": ("decay", "per-channel (C, 1, 1, 1) parameter (exclude_1d=False)"),
        "conv.bias": ("no_decay", "bias"),
        "scale": ("decay", "per-channel (1, C, 1, 1) parameter (exclude_1d=False)"),
        "temperature": ("decay", "per-channel (1, 1) parameter (exclude_1d=False)"),
        **layer_weights,
    }
    from lit_decay import rules

    placements, _ = rules.place_parameters(PerChannel())
    assert {p.name: p.rule for p in placements}["grn.weight"] == rules.RULE_1D


def test_a_norm_by_class_name_with_a_per_channel_scale_is_no_check_case() -> None:
    class ChannelNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(1, 8, 1, 1))

    report = lit_decay.explain(nn.ModuleDict({"norm": ChannelNorm()}))
    assert report.rows[0].reason == "normalization layer ChannelNorm"
    assert report.norm_by_name == ()


def test_a_parametrized_linear_weight_stays_a_weight() -> None:
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Linear(8, 1))
    parametrizations.weight_norm(model[0])  # original0 is the norm, (1, 1); original1 the direction, (1, 8)
    assert decisions(model) == {
        "0.bias": ("no_decay", "bias"),
        "0.parametrizations.weight.original0": ("decay", "ndim=2 weight (parametrized 0.weight)"),
        "0.parametrizations.weight.original1": ("decay", "ndim=2 weight (parametrized 0.weight)"),
    }


# --- the reach of the name heuristics, made visible ------------------------------------------------------------------


class WeightNormalizedLinear(nn.Module):
    """Not a normalization layer, though "Norm" is in its class name: a plain module owning a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.gain = nn.Parameter(torch.ones(3))


def test_norm_by_class_name_on_a_matrix_says_so_and_is_counted() -> None:
    model = nn.ModuleDict({"proj": WeightNormalizedLinear(), "norm": nn.LayerNorm((2, 3)), "rms": MyRMSNorm(3)})
    report = lit_decay.explain(model)
    reasons = {row.name: row.reason for row in report.rows}
    assert reasons["proj.weight"] == (
        "normalization layer WeightNormalizedLinear by class name only, yet ndim=2: "
        "add an override if this is a weight matrix"
    )
    # 1-D parameters of a name-matched class and torch's own norms, whatever their ndim, are not flagged.
    assert reasons["proj.gain"] == "normalization layer WeightNormalizedLinear"
    assert reasons["norm.weight"] == reasons["norm.bias"] == "normalization layer LayerNorm"
    assert report.norm_by_name == ("proj.weight", "rms.gain_matrix")
    note = (
        "Check: 2 tensor(s) with ndim >= 2 kept out of decay only because their module's class name contains 'Norm' "
        "(proj.weight, rms.gain_matrix); add an override for any that is a weight matrix"
    )
    assert note in report.summary().splitlines()
    assert note in report.to_markdown().splitlines()
    # The override the note asks for takes the matrix back, and the note goes.
    fixed = lit_decay.explain(model, overrides=[{"pattern": "proj.weight", "name": "matrix"}])
    assert fixed.group_of("proj.weight") == "matrix"
    assert fixed.norm_by_name == ("rms.gain_matrix",)
    assert "Check:" not in str(lit_decay.explain(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm((2, 2)))))


class Typo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.encoder = Encoder()
        self.encoder.no_weight_decay = lambda: {"rel_pos", "proj.bais"}  # type: ignore[method-assign]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embd", "encoder"}


def test_unmatched_no_weight_decay_names_warn_with_the_nearest_names() -> None:
    with pytest.warns(UserWarning) as caught:
        found = decisions(Typo())
    messages = sorted(str(w.message) for w in caught if "no_weight_decay()" in str(w.message))
    assert messages == [
        "no_weight_decay() of encoder (Encoder) returned 'proj.bais', matching no parameter, so nothing is kept out "
        "of decay for it (a typo?); nearest parameter names: proj.bias, proj.weight",
        "no_weight_decay() of the root module (Typo) returned 'pos_embd', matching no parameter, so nothing is kept "
        "out of decay for it (a typo?); nearest parameter names: pos_embed",
    ]
    assert caught[0].filename == __file__  # points at the caller's line
    assert found["pos_embed"] == ("no_decay", "position embedding (pos_embed)")  # rule 6 catches it anyway


def test_no_weight_decay_names_that_match_do_not_warn() -> None:
    model = ViTLike()
    model.encoder.requires_grad_(False)  # a name matching a frozen parameter is no typo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lit_decay.explain(model)
        lit_decay.explain(ViTLike())


class TimmViT(nn.Module):
    """timm's ``VisionTransformer.no_weight_decay()`` returns ``{'pos_embed', 'cls_token', 'reg_token',
    'dist_token'}`` whether or not the model has them (``timm/models/vision_transformer.py``); DeiT without
    distillation and ViT without registers have neither of the last two."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}


def test_timm_superset_names_are_listed_not_warned() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = lit_decay.explain(TimmViT())
    assert report.unmatched_no_weight_decay == ("dist_token", "reg_token")
    assert report.to_dict()["unmatched_no_weight_decay"] == ["dist_token", "reg_token"]
    note = (
        "no_weight_decay() names matching no parameter (nothing is kept out of decay for them): dist_token, reg_token"
    )
    assert note in report.summary().splitlines()
    assert note in str(report).splitlines()
    assert note in report.to_markdown().splitlines()
    assert decisions(TimmViT())["cls_token"] == ("no_decay", "no_weight_decay() of the root module")
    assert lit_decay.explain(ViTLike()).unmatched_no_weight_decay == ()
    assert "no_weight_decay() names" not in str(lit_decay.explain(ViTLike()))


def test_a_typo_is_still_named_beside_absent_timm_tokens() -> None:
    class Typo(TimmViT):
        def no_weight_decay(self) -> set[str]:
            return {"pos_embd", "cls_token", "reg_token", "dist_token"}

    with pytest.warns(UserWarning) as caught:
        report = lit_decay.explain(Typo())
    assert [str(w.message) for w in caught] == [
        "no_weight_decay() of the root module (Typo) returned 'pos_embd', matching no parameter, so nothing is kept "
        "out of decay for it (a typo?); nearest parameter names: pos_embed"
    ]
    assert report.unmatched_no_weight_decay == ("dist_token", "pos_embd", "reg_token")


@pytest.mark.parametrize(
    ("entry", "typo"),
    [("pos_embd", True), ("cls_tokn", True), ("head.bais", True), ("dist_token", False), ("reg_token", False)],
)
def test_what_counts_as_a_typo(entry: str, typo: bool) -> None:
    class Declares(TimmViT):
        def no_weight_decay(self) -> set[str]:
            return {entry}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lit_decay.explain(Declares())
    assert len([w for w in caught if "no_weight_decay()" in str(w.message)]) == int(typo)


# --- parametrized tensors (torch.nn.utils.parametrize) ---------------------------------------------------------------


class Positive(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def test_parametrized_tensors_get_the_rules_of_the_parameter_they_stand_for() -> None:
    from torch.nn.utils import parametrizations, parametrize

    model = nn.ModuleDict(
        {"proj": nn.Linear(4, 4), "norm": nn.LayerNorm((2, 4)), "tok": nn.Embedding(6, 4), "conv": nn.Conv1d(2, 2, 3)}
    )
    parametrize.register_parametrization(model["proj"], "bias", Positive())
    parametrize.register_parametrization(model["proj"], "weight", Positive())
    parametrize.register_parametrization(model["norm"], "weight", Positive())
    parametrize.register_parametrization(model["tok"], "weight", Positive())
    parametrizations.weight_norm(model["conv"])  # stored as original0 (g) and original1 (v)
    found = decisions(model, exclude_1d=False, exclude_embeddings=True)
    assert found == {
        "proj.parametrizations.bias.original": ("no_decay", "bias (parametrized proj.bias)"),
        "proj.parametrizations.weight.original": ("decay", "ndim=2 weight (parametrized proj.weight)"),
        "norm.bias": ("no_decay", "normalization layer ParametrizedLayerNorm"),
        "norm.parametrizations.weight.original": (
            "no_decay",
            "normalization layer ParametrizedLayerNorm (parametrized norm.weight)",
        ),
        "tok.parametrizations.weight.original": (
            "no_decay",
            "embedding (exclude_embeddings=True) (parametrized tok.weight)",
        ),
        "conv.bias": ("no_decay", "bias"),
        "conv.parametrizations.weight.original0": ("decay", "ndim=3 weight (parametrized conv.weight)"),
        "conv.parametrizations.weight.original1": ("decay", "ndim=3 weight (parametrized conv.weight)"),
    }


def test_no_weight_decay_may_name_the_parameter_a_parametrization_stands_for() -> None:
    from torch.nn.utils import parametrize

    model = ViTLike()
    parametrize.register_parametrization(model, "pos_embed", Positive())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "pos_embed" matches: no unmatched-name warning
        found = decisions(model)
    assert found["parametrizations.pos_embed.original"] == (
        "no_decay",
        "no_weight_decay() of the root module (parametrized pos_embed)",
    )


def test_a_module_called_parametrizations_is_not_taken_for_one() -> None:
    holder = nn.Module()
    holder.original = nn.Parameter(torch.ones(3))
    model = nn.ModuleDict({"parametrizations": nn.ModuleDict({"bias": holder})})
    assert decisions(model, exclude_1d=False) == {
        "parametrizations.bias.original": ("decay", "ndim=1 parameter (exclude_1d=False)")
    }
