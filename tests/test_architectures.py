"""Real architectures nobody here wrote: Hugging Face transformers models built from small configs (no download).

Which parameters are norms, biases and projections is found here by walking ``model.named_modules()`` with
isinstance and class names, independently of lit_decay's own rules; lit_decay must agree. Every tensor of every
architecture is also checked against the rules as they were before they were sharpened against the published
recipes, with exactly the listed tensors moved.

This file also makes the comparison table of docs/grouping.md (lit_decay vs the Hugging Face Trainer vs timm vs
nanoGPT); ``PYTHONPATH=. python tests/test_architectures.py`` rewrites it after a change.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lit_decay

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers.pytorch_utils import Conv1D  # noqa: E402

TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
PROJECTIONS = (nn.Linear, Conv1D, nn.Conv2d)


def is_norm_here(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, TORCH_NORMS) or name.endswith(("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm"))


def is_bias_here(leaf: str) -> bool:
    return leaf == "bias" or leaf.startswith("bias_") or leaf.endswith("_bias")


def check_model(model: nn.Module, **options: Any) -> lit_decay.GroupingReport:
    """Norm and bias parameters are not decayed, projection weights are, every tensor is placed once."""
    report = lit_decay.explain(model, weight_decay=0.1, **options)
    norms = biases = projections = 0
    # A tied output head shares its tensor with the embedding table, and goes with it under exclude_embeddings.
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    excluded_tables = tables if options.get("exclude_embeddings") else set()
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
            name = f"{path}.{leaf}" if path else leaf
            if not tensor.requires_grad:
                continue
            if id(tensor) in excluded_tables:
                assert report.group_of(name) == "no_decay", name
                continue
            if is_norm_here(module):
                norms += 1
                assert report.group_of(name) == "no_decay", name
            elif is_bias_here(leaf):
                biases += 1
                assert report.group_of(name) == "no_decay", name
            elif isinstance(module, PROJECTIONS) and leaf == "weight":
                projections += 1
                assert report.group_of(name) == "decay", name
    assert norms and projections, "the walk found nothing to check"

    unique = {id(p): p for p in model.parameters() if p.requires_grad}  # Whisper's sinusoidal positions are frozen
    assert len(report.rows) == len(unique)
    groups = lit_decay.param_groups(model, weight_decay=0.1, **options)
    placed = [t for g in groups for _, t in g["params"]]
    assert len(placed) == len({id(t) for t in placed}) == len(unique)
    assert {r.name: r.group for r in report.rows} == {n: g["name"] for g in groups for n, _ in g["params"]}
    return report


def rows_of(report: lit_decay.GroupingReport) -> dict[str, Any]:
    return {r.name: r for r in report.rows}


# --- small configs ------------------------------------------------------------------------------------------------

SMALL = {"vocab_size": 99, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}


def bert_model() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, **SMALL))


def bert_mlm() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, **SMALL))


def gpt2_small() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4))


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **SMALL))


def qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(hidden_size=32, num_key_value_heads=2, **SMALL))


def t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return transformers.T5ForConditionalGeneration(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    return transformers.ViTModel(config)


def vit_with_mask_token() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    return transformers.ViTModel(config, use_mask_token=True)


def swin() -> nn.Module:
    config = transformers.SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2
    )
    config.use_absolute_embeddings = True
    return transformers.SwinModel(config, use_mask_token=True)


def mamba() -> nn.Module:
    config = transformers.MambaConfig(vocab_size=99, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
    return transformers.MambaForCausalLM(config)


def mamba2() -> nn.Module:
    config = transformers.Mamba2Config(
        vocab_size=99, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, head_dim=8, num_heads=4, n_groups=1
    )
    return transformers.Mamba2ForCausalLM(config)


def clip() -> nn.Module:
    text = {
        "vocab_size": 99,
        "hidden_size": 16,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }
    vision = {
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": 16,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


def convnext() -> nn.Module:
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2)
    return transformers.ConvNextModel(config)


SEQ2SEQ = {
    "vocab_size": 99,
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
}


def bart() -> nn.Module:
    return transformers.BartForConditionalGeneration(transformers.BartConfig(max_position_embeddings=32, **SEQ2SEQ))


def whisper() -> nn.Module:
    config = transformers.WhisperConfig(
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        **SEQ2SEQ,
    )
    return transformers.WhisperForConditionalGeneration(config)


def deberta() -> nn.Module:
    config = transformers.DebertaConfig(
        hidden_size=16, relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"], **SMALL
    )
    return transformers.DebertaModel(config)


def deberta_v2() -> nn.Module:
    config = transformers.DebertaV2Config(
        hidden_size=16,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        **SMALL,
    )
    return transformers.DebertaV2Model(config)


def wav2vec2() -> nn.Module:
    config = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8, 8),
        conv_stride=(2, 2),
        conv_kernel=(3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    return transformers.Wav2Vec2Model(config)


def gemma() -> nn.Module:
    config = transformers.GemmaConfig(hidden_size=16, num_key_value_heads=2, head_dim=4, **SMALL)
    return transformers.GemmaForCausalLM(config)


def mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(hidden_size=16, num_key_value_heads=2, **SMALL))


class NormedEmbeddingLM(nn.Module):
    """transformers' ``InklingNormedEmbedding``: an ``nn.Embedding`` subclass (with an RMSNorm inside it)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.inkling.modeling_inkling import InklingNormedEmbedding

        self.embed_tokens = InklingNormedEmbedding(99, 16, padding_idx=0, norm_eps=1e-6)
        self.lm_head = nn.Linear(16, 99, bias=False)


def torch_transformer() -> nn.Module:
    return nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, batch_first=True
    )


def batchnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


VIT_SIZES = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
}


def vit_classifier() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3, **VIT_SIZES))


def deit_with_teacher() -> nn.Module:
    config = transformers.DeiTConfig(num_labels=3, **VIT_SIZES)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def beit() -> nn.Module:
    config = transformers.BeitConfig(
        vocab_size=99,
        use_mask_token=True,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=True,
        **VIT_SIZES,
    )
    return transformers.BeitModel(config)


def convnext_v2() -> nn.Module:
    config = transformers.ConvNextV2Config(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2, num_labels=3
    )
    return transformers.ConvNextV2ForImageClassification(config)


class ScaledStdConv2d(nn.Conv2d):
    """An NFNet weight-standardised convolution, with timm's per-channel ``gain`` of shape ``(C, 1, 1, 1)``
    (``timm/layers/std_conv.py``); DeepMind's NFNet recipe keeps every parameter named ``gain`` out of decay
    (``nfnets/experiment.py``, ``_make_opt``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))


class GRN(nn.Module):
    """Global response normalization with its scale and shift as transformers' ``ConvNextV2GRN`` stores them:
    ``(1, 1, 1, C)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, channels))


class NFBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ScaledStdConv2d(channels, channels)
        self.grn = GRN(channels)
        self.conv2 = ScaledStdConv2d(channels, channels)
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0))  # timm's NormFreeBlock


class NormFreeNet(nn.Module):
    """A toy with NFNet-style gains, ConvNeXt-V2-style GRNs, a classifier and a ``Linear(d, 1)`` score head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 8)
        self.blocks = nn.Sequential(NFBlock(8), NFBlock(8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)
        self.score = nn.Linear(8, 1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert_model,
    "bert_mlm": bert_mlm,
    "gpt2": gpt2_small,
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "gemma": gemma,
    "t5": t5,
    "bart": bart,
    "deberta": deberta,
    "deberta_v2": deberta_v2,
    "whisper": whisper,
    "wav2vec2": wav2vec2,
    "vit": vit,
    "vit_mask_token": vit_with_mask_token,
    "swin": swin,
    "clip": clip,
    "convnext": convnext,
    "mamba": mamba,
    "mamba2": mamba2,
    "normed_embedding": NormedEmbeddingLM,
    "torch_transformer": torch_transformer,
    "batchnorm_cnn": batchnorm_cnn,
    "vit_classifier": vit_classifier,
    "deit_teacher": deit_with_teacher,
    "beit": beit,
    "convnext_v2": convnext_v2,
    "norm_free": NormFreeNet,
}


@pytest.mark.parametrize("build", list(MODELS.values()), ids=list(MODELS))
def test_norms_and_biases_are_not_decayed_and_projections_are(build: Callable[[], nn.Module]) -> None:
    check_model(build())


@pytest.mark.parametrize("build", list(MODELS.values()), ids=list(MODELS))
def test_norms_and_biases_stay_out_with_every_option(build: Callable[[], nn.Module]) -> None:
    report = check_model(build(), exclude_embeddings=True, exclude_1d=False)
    for row in report.rows:
        if "embedding" in row.reason:
            assert row.group == "no_decay", row


def test_gpt2_tied_head() -> None:
    model = gpt2_small()
    assert model.lm_head.weight is model.transformer.wte.weight
    rows = rows_of(check_model(model))
    assert "lm_head.weight" not in rows
    wte = rows["transformer.wte.weight"]
    assert (wte.group, wte.reason, wte.aliases) == ("decay", "embedding", ("lm_head.weight",))
    assert rows["transformer.h.0.attn.c_attn.weight"].reason == "ndim=2 weight"
    assert rows["transformer.h.1.mlp.c_proj.bias"].reason == "bias"
    assert rows["transformer.ln_f.weight"].reason == "normalization layer LayerNorm"

    excluded = rows_of(lit_decay.explain(model, exclude_embeddings=True))["transformer.wte.weight"]
    assert (excluded.group, excluded.reason) == ("no_decay", "embedding (exclude_embeddings=True)")


def test_t5_shared_embedding_and_norms() -> None:
    model = t5()
    rows = rows_of(check_model(model))
    shared = rows["shared.weight"]
    assert shared.group == "decay"
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(shared.aliases)
    assert set(shared.aliases) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert not ({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} & set(rows))
    norm_rows = [r for r in rows.values() if "layer_norm" in r.name]
    assert norm_rows
    assert {(r.group, r.reason) for r in norm_rows} == {("no_decay", "normalization layer T5LayerNorm")}
    # T5's relative position table is an nn.Embedding whose *module* is called ..._bias: an additive attention-bias
    # table, kept out of decay as Swin's and BEiT's tables are, with or without exclude_embeddings.
    for stack in ("encoder", "decoder"):
        relative = rows[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        assert (relative.group, relative.reason) == (
            "no_decay",
            "bias table (embedding relative_attention_bias, name part 'bias')",
        )


@pytest.mark.parametrize(("build", "norm"), [(llama, "LlamaRMSNorm"), (qwen2, "Qwen2RMSNorm")])
def test_llama_style_rms_norms(build: Callable[[], nn.Module], norm: str) -> None:
    rows = rows_of(check_model(build()))
    for name in (
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    ):
        assert (rows[name].group, rows[name].reason) == ("no_decay", f"normalization layer {norm}")
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert rows[f"model.layers.0.self_attn.{projection}.weight"].group == "decay"
    assert rows["lm_head.weight"].group == "decay"


def test_qwen2_attention_biases() -> None:
    rows = rows_of(check_model(qwen2()))
    biases = {name for name in rows if name.endswith("_proj.bias")}
    assert biases == {f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")}
    assert {(rows[n].group, rows[n].reason) for n in biases} == {("no_decay", "bias")}


def test_bert_mlm_ties() -> None:
    rows = rows_of(check_model(bert_mlm()))
    words = rows["bert.embeddings.word_embeddings.weight"]
    assert (words.group, words.aliases) == ("decay", ("cls.predictions.decoder.weight",))
    bias = rows["cls.predictions.bias"]
    assert (bias.group, bias.reason, bias.aliases) == ("no_decay", "bias", ("cls.predictions.decoder.bias",))
    assert rows["bert.embeddings.LayerNorm.weight"].reason == "normalization layer LayerNorm"


# --- the sharpened rules: exactly these tensors moved, every other tensor kept its group ------------------------------

ALL_OUT = {"exclude_embeddings": True, "exclude_1d": False}
# model -> (fnmatch pattern, group with the default options, group with ALL_OUT) for each tensor the sharpened rules
# moved under at least one of the two option sets, with the recipe that says so.
MOVED: dict[str, list[tuple[str, str, str]]] = {
    # An additive attention-bias table (Swin's optimizer.py skips it; timm's no_weight_decay() lists it).
    "t5": [("*.relative_attention_bias.weight", "no_decay", "no_decay")],
    "swin": [
        ("*.relative_position_bias_table", "no_decay", "no_decay"),
        # Raw token and position parameters: timm's Swin/ViT recipes keep them out (HF and nanoGPT decay them).
        ("embeddings.position_embeddings", "no_decay", "no_decay"),
        ("embeddings.mask_token", "no_decay", "no_decay"),
    ],
    "vit": [
        ("embeddings.cls_token", "no_decay", "no_decay"),
        ("embeddings.position_embeddings", "no_decay", "no_decay"),
    ],
    "vit_mask_token": [
        ("embeddings.cls_token", "no_decay", "no_decay"),
        ("embeddings.mask_token", "no_decay", "no_decay"),
        ("embeddings.position_embeddings", "no_decay", "no_decay"),
    ],
    # mamba_ssm sets _no_weight_decay on both; transformers' port drops the mark.
    "mamba": [("*.mixer.A_log", "no_decay", "no_decay"), ("*.mixer.D", "no_decay", "no_decay")],
    "mamba2": [("*.mixer.A_log", "no_decay", "no_decay"), ("*.mixer.D", "no_decay", "no_decay")],
    # An embedding table despite the "Norm" in its class name.
    "normed_embedding": [("embed_tokens.weight", "decay", "no_decay")],
    "vit_classifier": [
        ("vit.embeddings.cls_token", "no_decay", "no_decay"),
        ("vit.embeddings.position_embeddings", "no_decay", "no_decay"),
    ],
    "deit_teacher": [
        ("deit.embeddings.cls_token", "no_decay", "no_decay"),
        ("deit.embeddings.distillation_token", "no_decay", "no_decay"),
        ("deit.embeddings.position_embeddings", "no_decay", "no_decay"),
    ],
    "beit": [
        ("embeddings.cls_token", "no_decay", "no_decay"),
        ("embeddings.mask_token", "no_decay", "no_decay"),
        ("embeddings.position_embeddings", "no_decay", "no_decay"),
        ("*.relative_position_bias_table", "no_decay", "no_decay"),
    ],
    # Per-channel (1, 1, 1, C) and (C, 1, 1, 1) scales: vectors once their size-1 dimensions are dropped (rule 7).
    "convnext_v2": [("*.grn.weight", "no_decay", "decay")],
    "norm_free": [("*gain", "no_decay", "decay"), ("*.grn.weight", "no_decay", "decay")],
}


def previous_group(aliases: list[tuple[str, nn.Module]], tensor: torch.Tensor, options: dict[str, bool]) -> str:
    """The grouping before the rules were sharpened, restated here: norms by type or class name, biases by
    ``bias``/``bias_*``/``*_bias``, embedding tables by type, then ndim."""

    def excluded(name: str, owner: nn.Module) -> bool:
        leaf = name.rpartition(".")[2]
        if isinstance(owner, TORCH_NORMS) or "Norm" in type(owner).__name__:
            return True
        if leaf == "bias" or leaf.startswith("bias_") or leaf.endswith("_bias"):
            return True
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
            return options.get("exclude_embeddings", False)
        return options.get("exclude_1d", True) and tensor.ndim <= 1

    return "no_decay" if any(excluded(name, owner) for name, owner in aliases) else "decay"


def names_by_tensor(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    found: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
            found.setdefault(id(tensor), []).append((f"{path}.{leaf}" if path else leaf, module))
    return found


def check_only_moved(model: nn.Module, moved: Iterable[tuple[str, str, str]], options: dict[str, bool]) -> int:
    """Every tensor is where the previous rules put it, except those ``moved`` lists; returns how many moved."""
    report = lit_decay.explain(model, weight_decay=0.1, **options)
    found = {row.name: row.group for row in report.rows}
    tensors = {id(p): p for p in model.parameters()}
    expected: dict[str, str] = {}
    for key, aliases in names_by_tensor(model).items():
        if tensors[key].requires_grad:
            expected[aliases[0][0]] = previous_group(aliases, tensors[key], options)
    moved = list(moved)
    for pattern, default_group, all_out_group in moved:
        matched = fnmatch.filter(expected, pattern)
        assert matched, f"{pattern} matches no tensor of {type(model).__name__}"
        for name in matched:
            expected[name] = all_out_group if options else default_group
    assert found == expected
    return sum(len(fnmatch.filter(expected, pattern)) for pattern, _, _ in moved)


@pytest.mark.parametrize("options", [{}, ALL_OUT], ids=["default", "all_out"])
@pytest.mark.parametrize("name", list(MODELS))
def test_only_the_sharpened_cases_moved(name: str, options: dict[str, bool]) -> None:
    check_only_moved(MODELS[name](), MOVED.get(name, []), options)


FULL_SIZE: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # model -> (its published size, built on the meta device; how many tensors the sharpened rules move)
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config()), 2),  # t5-small
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig()), 2),  # vit-base-patch16-224
    "swin": (lambda: transformers.SwinModel(transformers.SwinConfig()), 12),  # swin-tiny: one table per block
    "mamba": (
        lambda: transformers.MambaForCausalLM(
            transformers.MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280)
        ),
        48,
    ),  # mamba-130m
}


@pytest.mark.parametrize("options", [{}, ALL_OUT], ids=["default", "all_out"])
@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_models_on_the_meta_device(name: str, options: dict[str, bool]) -> None:
    build, count = FULL_SIZE[name]
    with torch.device("meta"):
        model = build()
    moved = [m for m in MOVED[name] if fnmatch.filter(dict(model.named_parameters()), m[0])]
    assert check_only_moved(model, moved, options) == count


def test_reasons_of_the_moved_tensors() -> None:
    rows = rows_of(lit_decay.explain(swin()))
    table = rows["encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"]
    assert (table.group, table.reason) == ("no_decay", "bias table (name part 'bias')")
    assert rows["embeddings.position_embeddings"].reason == "position embedding (position_embeddings)"
    for options in ({}, {"exclude_embeddings": True}):
        rows = rows_of(lit_decay.explain(vit_with_mask_token(), **options))
        assert rows["embeddings.cls_token"].reason == "token embedding (cls_token)"
        assert rows["embeddings.mask_token"].reason == "token embedding (mask_token)"
        assert rows["embeddings.position_embeddings"].reason == "position embedding (position_embeddings)"
    rows = rows_of(lit_decay.explain(mamba(), exclude_1d=False))
    assert rows["backbone.layers.1.mixer.A_log"].reason == (
        "Mamba A_log of MambaMixer (mamba_ssm marks it _no_weight_decay)"
    )
    assert rows["backbone.layers.1.mixer.D"].reason == "Mamba D of MambaMixer (mamba_ssm marks it _no_weight_decay)"
    rows = rows_of(lit_decay.explain(mamba2(), exclude_1d=False))
    assert rows["backbone.layers.0.mixer.A_log"].group == rows["backbone.layers.0.mixer.D"].group == "no_decay"
    rows = rows_of(lit_decay.explain(NormedEmbeddingLM()))
    assert (rows["embed_tokens.weight"].group, rows["embed_tokens.weight"].reason) == ("decay", "embedding")
    assert rows["embed_tokens.embed_norm.weight"].reason == "normalization layer InklingRMSNorm"


# --- vision models: every tensor, from tables written against the model classes ---------------------------------------

NORM = "normalization layer LayerNorm"
# The transformer tensors of HF ViT, DeiT and BEiT blocks, whichever model holds them.
VIT_BLOCK = [
    ("*.layernorm*", "no_decay", NORM),
    ("*.bias", "no_decay", "bias"),
    ("*.patch_embeddings.projection.weight", "decay", "ndim=4 weight"),
    ("*.weight", "decay", "ndim=2 weight"),  # attention and MLP projections, classifiers
]
# model -> [(fnmatch pattern, group, reason)]: the first pattern matching a tensor's name says where it goes; every
# pattern must match a tensor. The same with exclude_embeddings=True (no table here) and with exclude_1d=False except
# for the per-channel and 1-D parameters named in VECTORS.
EVERY_TENSOR: dict[str, list[tuple[str, str, str]]] = {
    "vit_classifier": [
        ("vit.embeddings.cls_token", "no_decay", "token embedding (cls_token)"),
        ("vit.embeddings.position_embeddings", "no_decay", "position embedding (position_embeddings)"),
        *VIT_BLOCK,
    ],
    "deit_teacher": [
        ("deit.embeddings.cls_token", "no_decay", "token embedding (cls_token)"),
        ("deit.embeddings.distillation_token", "no_decay", "token embedding (distillation_token)"),
        ("deit.embeddings.position_embeddings", "no_decay", "position embedding (position_embeddings)"),
        *VIT_BLOCK,
    ],
    "beit": [
        ("embeddings.cls_token", "no_decay", "token embedding (cls_token)"),
        ("embeddings.mask_token", "no_decay", "token embedding (mask_token)"),
        ("embeddings.position_embeddings", "no_decay", "position embedding (position_embeddings)"),
        ("layers.*.lambda_[12]", "no_decay", "ndim=1 parameter"),  # layer scale
        ("*.relative_position_bias_table", "no_decay", "bias table (name part 'bias')"),
        *VIT_BLOCK,
    ],
    "convnext_v2": [
        ("*.grn.weight", "no_decay", "per-channel (1, 1, 1, C) parameter"),
        ("*.grn.bias", "no_decay", "bias"),
        ("convnextv2.layernorm.*", "no_decay", NORM),
        ("*layernorm.*", "no_decay", "normalization layer ConvNextV2LayerNorm"),
        ("*.downsampling_layer.0.*", "no_decay", "normalization layer ConvNextV2LayerNorm"),
        ("*.bias", "no_decay", "bias"),
        ("*.patch_embeddings.weight", "decay", "ndim=4 weight"),
        ("*.downsampling_layer.1.weight", "decay", "ndim=4 weight"),
        ("*.dwconv.weight", "decay", "ndim=4 weight"),  # (C, 1, 7, 7): a depthwise kernel, not a vector
        ("*.weight", "decay", "ndim=2 weight"),  # pwconv1, pwconv2 (Linear), classifier
    ],
    "norm_free": [
        ("*.gain", "no_decay", "per-channel (C, 1, 1, 1) parameter"),
        ("blocks.*.skipinit_gain", "no_decay", "ndim=0 parameter"),
        ("*.grn.weight", "no_decay", "per-channel (1, 1, 1, C) parameter"),
        ("norm.*", "no_decay", NORM),
        ("*.bias", "no_decay", "bias"),
        ("score.weight", "decay", "ndim=2 weight"),  # Linear(8, 1): a (1, C) weight, still a linear layer's
        ("head.weight", "decay", "ndim=2 weight"),
        ("*.weight", "decay", "ndim=4 weight"),
    ],
}
VECTORS = ("*.gain", "*skipinit_gain", "*.grn.weight", "layers.*.lambda_[12]")


def expected_from(table: list[tuple[str, str, str]], names: list[str], decay_1d: bool) -> dict[str, tuple[str, str]]:
    expected: dict[str, tuple[str, str]] = {}
    used: set[str] = set()
    for name in names:
        pattern, group, reason = next(entry for entry in table if fnmatch.fnmatchcase(name, entry[0]))
        used.add(pattern)
        if decay_1d and any(fnmatch.fnmatchcase(name, vector) for vector in VECTORS):
            group, reason = "decay", f"{reason} (exclude_1d=False)"
        expected[name] = (group, reason)
    assert used == {pattern for pattern, _, _ in table}, "a pattern of the table matches no tensor"
    return expected


@pytest.mark.parametrize("options", [{}, {"exclude_embeddings": True}, {"exclude_1d": False}], ids=str)
@pytest.mark.parametrize("name", list(EVERY_TENSOR))
def test_every_tensor_of_the_vision_models(name: str, options: dict[str, bool]) -> None:
    model = MODELS[name]()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no no_weight_decay() here, and nothing to warn about
        report = lit_decay.explain(model, **options)
    found = {row.name: (row.group, row.reason) for row in report.rows}
    assert found == expected_from(EVERY_TENSOR[name], names, decay_1d=options.get("exclude_1d") is False)


# --- layer-wise learning-rate decay against timm's rule -------------------------------------------------------------

# timm's MATCH_PREV_GROUP (timm/models/_manipulate.py): a matcher suffix that joins the previous layer.
MATCH_PREV_GROUP = 99999


def timm_layer_scales(model: nn.Module, group_matcher: dict[str, Any], layer_decay: float) -> dict[str, float]:
    """{parameter name: lr scale} by timm's ``param_groups_layer_decay`` (``timm/optim/_param_groups.py``), written
    again from its source: layer ids from ``group_parameters(model, model.group_matcher(coarse=False),
    reverse=True)`` (``group_with_matcher`` in ``timm/models/_manipulate.py``: each regex's ordinal, then its
    captured numbers, then its suffix; unmatched names last; a MATCH_PREV_GROUP suffix stays in the previous
    layer), then ``layer_decay ** (layer_max - layer_id)`` with ``layer_max = num_layers - 1``."""
    compiled: list[tuple[re.Pattern[str], tuple[float, ...], tuple[float, ...] | None]] = []
    for ordinal, spec in enumerate(group_matcher.values()):
        for regex, suffix in spec if isinstance(spec, list) else [(spec, None)]:
            compiled.append((re.compile(regex), (ordinal,), suffix))

    def ordinals(name: str) -> tuple[float, ...]:
        for regex, prefix, suffix in compiled:
            match = regex.match(name)
            if match:
                return tuple(float(x) for part in (prefix, match.groups(), suffix) if part for x in part)
        return (math.inf,)

    by_ordinals: dict[tuple[float, ...], list[str]] = {}
    for name, _ in model.named_parameters():
        by_ordinals.setdefault(ordinals(name), []).append(name)
    layer_id: dict[str, int] = {}
    current = -1
    for key in sorted(by_ordinals):
        if current < 0 or key[-1] != MATCH_PREV_GROUP:
            current += 1
        layer_id.update(dict.fromkeys(by_ordinals[key], current))
    layer_max = max(layer_id.values())
    return {name: layer_decay ** (layer_max - layer) for name, layer in layer_id.items()}


def lrs_by_name(groups: list[dict[str, Any]]) -> dict[str, float]:
    return {name: group["lr"] for group in groups for name, _ in group["params"]}


# timm's ViT matcher (``VisionTransformer.group_matcher``) in the names of transformers' ViT, and the same for BERT:
# the embeddings a stem, each block its own layer, everything else (final norm, pooler, head) after them.
HF_VIT_MATCHER = {"stem": r"^vit\.embeddings", "blocks": [(r"^vit\.layers\.(\d+)", None)]}
HF_BERT_MATCHER = {"stem": r"^embeddings", "blocks": [(r"^encoder\.layer\.(\d+)", None)]}


def vit_four_blocks() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(**{**VIT_SIZES, "num_hidden_layers": 4}))


def bert_four_blocks() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, **{**SMALL, "num_hidden_layers": 4}))


@pytest.mark.parametrize(
    ("build", "matcher", "stacks"),
    [
        (vit_four_blocks, HF_VIT_MATCHER, (("vit.layers", 4),)),
        (bert_four_blocks, HF_BERT_MATCHER, (("encoder.layer", 4),)),
    ],
    ids=["vit", "bert"],
)
@pytest.mark.parametrize("layer_decay", [0.75, 0.5, 1.0])
def test_layer_decay_gives_timms_learning_rates(
    build: Callable[[], nn.Module], matcher: dict[str, Any], stacks: tuple[tuple[str, int], ...], layer_decay: float
) -> None:
    model = build()
    lr = 3e-4
    groups = lit_decay.param_groups(model, weight_decay=0.05, lr=lr, layer_decay=layer_decay)
    scales = timm_layer_scales(model, matcher, layer_decay)
    found = lrs_by_name(groups)
    assert set(found) == set(scales)
    for name, scale in scales.items():
        assert found[name] == pytest.approx(lr * scale), name
    assert len({g["layer"] for g in groups}) == 4 + 2
    assert lit_decay.explain(model, lr=lr, layer_decay=layer_decay).layering.count("{0..3}") == 1
    from lit_decay.rules import find_layers

    assert find_layers(model, decay=layer_decay).stacks == stacks


def test_timms_own_vit_matcher_keeps_the_final_norm_with_the_last_block() -> None:
    """timm's ``VisionTransformer.group_matcher`` adds ``(r'^norm', (99999,))``: the final norm joins the last block
    (one factor below the head). lit_decay, as BEiT's ``get_num_layer_for_vit`` and the contract, puts it after the
    blocks with the head: that tensor, and only it, differs."""
    model = vit_classifier()
    timm_vit = {**HF_VIT_MATCHER, "blocks": [*HF_VIT_MATCHER["blocks"], (r"^vit\.layernorm", (MATCH_PREV_GROUP,))]}
    scales = timm_layer_scales(model, timm_vit, 0.5)
    found = lrs_by_name(lit_decay.param_groups(model, weight_decay=0.05, lr=1.0, layer_decay=0.5))
    differing = {name for name, scale in scales.items() if found[name] != pytest.approx(scale)}
    assert differing == {"vit.layernorm.weight", "vit.layernorm.bias"}
    assert (scales["vit.layernorm.weight"], found["vit.layernorm.weight"]) == (0.5, 1.0)


@pytest.mark.parametrize(
    ("name", "stacks", "layers"),
    [
        (
            "gpt2",
            (("transformer.h", 2),),
            {"transformer.wte.weight": 0, "transformer.h.1.attn.c_attn.weight": 2, "transformer.ln_f.weight": 3},
        ),
        (
            "llama",
            (("model.layers", 2),),
            {
                "model.embed_tokens.weight": 0,
                "model.layers.0.self_attn.q_proj.weight": 1,
                "model.norm.weight": 3,
                "lm_head.weight": 3,
            },
        ),
        (
            "bert_mlm",
            (("bert.encoder.layer", 2),),
            {
                "bert.embeddings.word_embeddings.weight": 0,
                "bert.encoder.layer.1.output.dense.weight": 2,
                "cls.predictions.transform.dense.weight": 3,
            },
        ),
        # T5's encoder then decoder, one after the other; the encoder's final norm goes with its last block.
        (
            "t5",
            (("encoder.block", 2), ("decoder.block", 2)),
            {
                "shared.weight": 0,
                "encoder.block.1.layer.1.DenseReluDense.wi.weight": 2,
                "encoder.final_layer_norm.weight": 2,
                "decoder.block.0.layer.1.EncDecAttention.q.weight": 3,
                "decoder.final_layer_norm.weight": 5,
            },
        ),
        (
            "beit",
            (("layers", 2),),
            {
                "embeddings.cls_token": 0,
                "layers.1.relative_position_bias.relative_position_bias_table": 2,
                "pooler.layernorm.weight": 3,
            },
        ),
        (
            "convnext_v2",
            (("convnextv2.encoder.stages", 2),),
            {
                "convnextv2.embeddings.layernorm.weight": 0,
                "convnextv2.encoder.stages.1.layers.0.grn.weight": 2,
                "classifier.weight": 3,
            },
        ),
    ],
)
def test_blocks_are_found_without_configuration(
    name: str, stacks: tuple[tuple[str, int], ...], layers: dict[str, int]
) -> None:
    model = MODELS[name]()
    groups = lit_decay.param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)
    layer_of = {n: g["layer"] for g in groups for n, _ in g["params"]}
    for tensor_name, layer in layers.items():
        assert layer_of[tensor_name] == layer, tensor_name
    from lit_decay.rules import find_layers

    assert find_layers(model, decay=0.5).stacks == stacks


def test_tied_head_takes_the_layer_of_its_first_name() -> None:
    model = gpt2_small()
    groups = lit_decay.param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)
    (embedding,) = [g for g in groups if "transformer.wte.weight" in dict(g["params"])]
    assert (embedding["name"], embedding["layer"], embedding["lr"]) == ("layer_0.decay", 0, 0.125)
    assert all("lm_head.weight" not in dict(g["params"]) for g in groups)


def test_vit_base_on_the_meta_device_has_twelve_blocks() -> None:
    with torch.device("meta"):
        model = transformers.ViTModel(transformers.ViTConfig())
    report = lit_decay.explain(model, lr=1e-3, layer_decay=0.65)
    assert (
        report.layering is not None
        and "layers 1-12 the blocks (layers.{0..11}), layer 13 after them" in report.layering
    )
    assert {g.layer for g in report.groups} == set(range(14))
    lrs = {g.layer: g.scaled_lr(1e-3) for g in report.groups}
    assert lrs[13] == 1e-3 and lrs[0] == pytest.approx(1e-3 * 0.65**13)


# --- lit_decay vs the Hugging Face Trainer vs timm vs nanoGPT, for docs/grouping.md -------------------------------

FAMILIES = {
    "bert": "BERT (`BertModel`)",
    "gpt2": "GPT-2 (`GPT2LMHeadModel`)",
    "llama": "Llama (`LlamaForCausalLM`)",
    "qwen2": "Qwen2 (`Qwen2ForCausalLM`)",
    "mistral": "Mistral (`MistralForCausalLM`)",
    "gemma": "Gemma (`GemmaForCausalLM`)",
    "t5": "T5 (`T5ForConditionalGeneration`)",
    "bart": "BART (`BartForConditionalGeneration`)",
    "deberta": "DeBERTa (`DebertaModel`)",
    "deberta_v2": "DeBERTa v2/v3 (`DebertaV2Model`)",
    "whisper": "Whisper (`WhisperForConditionalGeneration`)",
    "wav2vec2": "wav2vec 2.0 (`Wav2Vec2Model`)",
    "vit_mask_token": "ViT (`ViTModel`, with mask token)",
    "vit_classifier": "ViT (`ViTForImageClassification`)",
    "deit_teacher": "DeiT (`DeiTForImageClassificationWithTeacher`)",
    "beit": "BEiT (`BeitModel`, mask token, absolute and relative positions)",
    "swin": "Swin (`SwinModel`, absolute positions, mask token)",
    "clip": "CLIP (`CLIPModel`)",
    "convnext": "ConvNeXt (`ConvNextModel`)",
    "convnext_v2": "ConvNeXt-V2 (`ConvNextV2ForImageClassification`)",
    "norm_free": "NFNet-style gains and GRN (toy)",
    "mamba": "Mamba (`MambaForCausalLM`)",
    "mamba2": "Mamba2 (`Mamba2ForCausalLM`)",
    "normed_embedding": "`*NormedEmbedding` LM",
    "torch_transformer": "torch `nn.Transformer`",
    "batchnorm_cnn": "Conv + BatchNorm CNN",
}
TOOLS = ("HF Trainer", "timm", "nanoGPT")


def others_decay(model: nn.Module) -> dict[str, dict[str, bool]]:
    """{tool: {first name: decayed?}} for the trainable tensors, each tool's rule applied to ``model``.

    - HF Trainer: transformers' own ``Trainer.get_decay_parameter_names`` (``transformers/trainer.py``: LayerNorm
      instances and names containing "bias", "layernorm", "rmsnorm", or a "norm"/"_norm" segment are not decayed);
    - timm's ``param_groups_weight_decay`` (``timm/optim/_param_groups.py``): not decayed when ``ndim <= 1``, the name
      ends in ".bias", or the name is in the model's ``no_weight_decay()``;
    - nanoGPT's ``GPT.configure_optimizers`` (``model.py``): decayed when ``dim() >= 2``.
    """
    hf = set(transformers.Trainer.get_decay_parameter_names(None, model))  # the method reads nothing from self
    declared = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "HF Trainer": {n: n in hf for n, _ in named},
        "timm": {n: not (p.ndim <= 1 or n.endswith(".bias") or n in declared) for n, p in named},
        "nanoGPT": {n: p.dim() >= 2 for n, p in named},
    }


def _collapse(names: Iterable[str]) -> str:
    """Layer indices folded into ``*`` so a model's repeated tensors read as one pattern."""
    patterns = sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", name) for name in names})
    return ", ".join(f"`{p}`" for p in patterns) or "—"


def comparison_markdown() -> str:
    """The two tables of docs/grouping.md's comparison section, computed from the models of this file."""
    counts = [
        "| architecture | tensors | lit_decay | HF Trainer | timm | nanoGPT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    differences = [
        "| architecture | tool | decays what lit_decay does not | does not decay what lit_decay does |",
        "|---|---|---|---|",
    ]
    for key, family in FAMILIES.items():
        model = MODELS[key]()
        ours = {row.name: row.group == "decay" for row in lit_decay.explain(model).rows}
        others = others_decay(model)
        assert all(set(decided) == set(ours) for decided in others.values())
        not_decayed = [sum(not d for d in ours.values())] + [sum(not d for d in others[t].values()) for t in TOOLS]
        counts.append(f"| {family} | {len(ours)} | " + " | ".join(map(str, not_decayed)) + " |")
        for tool in TOOLS:
            more = [n for n, d in others[tool].items() if d and not ours[n]]
            fewer = [n for n, d in others[tool].items() if not d and ours[n]]
            if more or fewer:
                differences.append(f"| {family} | {tool} | {_collapse(more)} | {_collapse(fewer)} |")
    return "\n".join([*counts, "", *differences])


DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "grouping.md"
BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"


def _replace_block(page: str, block: str) -> str:
    before, _, rest = page.partition(BEGIN)
    _, _, after = rest.partition(END)
    return f"{before}{BEGIN}\n{block}\n{END}{after}"


def test_docs_comparison_table_is_current() -> None:
    page = DOCS_PAGE.read_text()
    assert BEGIN in page and END in page
    assert _replace_block(page, comparison_markdown()) == page, (
        "docs/grouping.md's comparison is stale: run `PYTHONPATH=. python tests/test_architectures.py`"
    )


# --- GPT-2 at its real size: the report as one would paste it into a bug report -------------------------------------


@pytest.fixture(scope="module")
def gpt2_124m() -> nn.Module:
    # The meta device gives shapes without memory or init time; grouping needs nothing more.
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12))


def test_gpt2_124m_report_reads_like_a_table(gpt2_124m: nn.Module) -> None:
    assert all(p.is_meta for p in gpt2_124m.parameters())
    report = check_model(gpt2_124m)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "GPT2LMHeadModel: 148 trainable tensors (124,439,808 elements), 0 frozen (0 elements)"
    assert re.fullmatch(r"\s+decay\s+decoupled\s+0\.1\s+50\s+124,318,464", lines[2])
    assert re.fullmatch(r"\s+no_decay\s+none\s+0\s+98\s+121,344", lines[3])
    header = lines.index(next(line for line in lines if line.startswith("name ")))
    assert header == 5 and lines[4] == ""
    table = lines[header + 1 :]
    assert len(table) == len(report.rows) == 148
    for line, row in zip(table, report.rows):
        assert line.split()[0] == row.name
        assert row.reason in line
    assert re.fullmatch(
        r"transformer\.wte\.weight\s+\(50257, 768\)\s+38,597,376\s+decay\s+embedding; tied to lm_head\.weight",
        table[0],
    )
    assert re.fullmatch(
        r"transformer\.h\.11\.ln_2\.bias\s+\(768,\)\s+768\s+no_decay\s+normalization layer LayerNorm",
        next(line for line in table if line.startswith("transformer.h.11.ln_2.bias")),
    )
    assert all(p.is_meta for p in gpt2_124m.parameters())


if __name__ == "__main__":
    DOCS_PAGE.write_text(_replace_block(DOCS_PAGE.read_text(), comparison_markdown()))
    sys.stdout.write(f"rewrote the comparison tables of {DOCS_PAGE}\n")
