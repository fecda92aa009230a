"""Small plain ``nn.Module`` models shared by the examples, the docs and the CLI tests.

They carry no Lightning code so that any training loop (Lightning, Fabric, plain PyTorch) can wrap them, and
``lit-decay inspect examples.models:TinyGPT`` (or ``:tiny_vit``, a function building a Hugging Face model from a config)
works from the repository root.

Example:
    >>> import torch
    >>> from examples.models import MLP, TinyGPT
    >>> TinyGPT()(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 65])
    >>> MLP()(torch.zeros(4, 64)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` projection, as in nanoGPT."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=True)
        self.proj = nn.Linear(n_embd, n_embd, bias=True)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        heads = (batch, time, self.n_head, channels // self.n_head)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x MLP, each with a residual connection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A nanoGPT-style character language model whose ``lm_head`` weight is tied to the token embedding.

    Example:
        >>> model = TinyGPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
        >>> model.lm_head.weight is model.tok_emb.weight
        True
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2 does: one tensor, two names.
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, time, vocab_size)`` for token ids ``idx`` of shape ``(batch, time)``."""
        _, time = idx.shape
        if time > self.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size={self.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MLP(nn.Module):
    """Linear → BatchNorm1d → ReLU → Linear classifier for flattened 8×8 digit images.

    Example:
        >>> MLP(in_features=4, hidden=8, num_classes=3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def tiny_vit(num_hidden_layers: int = 2, hidden_size: int = 32, num_labels: int = 10) -> nn.Module:
    """A tiny Hugging Face ViT image classifier, built from a config as transformers builds any model (no download).

    A function returning a module, so ``lit-decay inspect examples.models:tiny_vit --init-args '{"num_labels": 3}'``
    works where the model class itself needs a config object that JSON cannot write. transformers is imported here,
    so the other models of this file need only torch.

    Example:
        >>> model = tiny_vit(num_hidden_layers=1, num_labels=3)
        >>> model(torch.zeros(2, 3, 32, 32)).logits.shape
        torch.Size([2, 3])
    """
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden_size,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)
