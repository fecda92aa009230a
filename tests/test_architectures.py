"""Real architectures nobody here wrote: Hugging Face transformers models built from small configs (no download).

Which parameters are norms, biases and projections is found here by walking ``model.named_modules()`` with
isinstance and class names, independently of lit_decay's own rules; lit_decay must agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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

    unique = {id(p): p for p in model.parameters()}
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


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert_model,
    "bert_mlm": bert_mlm,
    "gpt2": gpt2_small,
    "llama": llama,
    "qwen2": qwen2,
    "t5": t5,
    "vit": vit,
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
    # T5's relative position table is an nn.Embedding whose *module* is called ..._bias: the bias rule goes by the
    # parameter's leaf name ("weight"), so it is an embedding.
    relative = rows["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert (relative.group, relative.reason) == ("decay", "embedding")


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
