"""A decoder-only transformer in the nanoGPT mould, in plain PyTorch.

    tokens (B, T) -> wte(tokens) + wpe(positions) -> dropout
                  -> n_layer x Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))
                  -> ln_f -> lm_head (weight tied to wte.weight) -> logits (B, T, vocab)

``CausalSelfAttention``: one fused projection ``c_attn`` (C -> 3C) gives q, k, v; heads of C/n_head
channels attend causally (``F.scaled_dot_product_attention``); ``c_proj`` (C -> C) mixes the heads.
``MLP``: ``c_fc`` (C -> 4C), GELU, ``c_proj`` (4C -> C). These four nn.Linear layers act on 3-D
activations (B, T, C) and are the ones a coding plan codes; embeddings, LayerNorms and the tied head
stay on the master (the head's weight is the embedding's, which is looked up, not multiplied).

``share_blocks=True`` builds one Block and applies it ``n_layer`` times (cross-layer weight sharing):
every module of that block is then used ``n_layer`` times per forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sazd.models.task import NEXT_TOKEN


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Next-token model over ``vocab_size`` tokens with a context of ``block_size`` positions."""

    task = NEXT_TOKEN

    def __init__(self, vocab_size: int, block_size: int, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
                 dropout: float = 0.0, share_blocks: bool = False) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"hidden: channels {n_embd} must be divisible by heads {n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout!r} must be in [0, 1)")
        self.block_size, self.n_layer = block_size, n_layer
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        blocks = 1 if share_blocks else n_layer
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one tensor embeds and scores tokens
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"GPT: expected integer tokens of shape (batch, time), got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        T = idx.shape[1]
        if self.block_size < T:
            raise ValueError(f"GPT: {T} positions exceed the context of {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i in range(self.n_layer):
            x = self.h[i % len(self.h)](x)
        return self.lm_head(self.ln_f(x))
