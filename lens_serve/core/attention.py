"""The transformer block GistNet and LensNet share: pre-norm, non-causal self-attention + MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, W); valid (B, T) bool marks real positions (padding is never attended to)."""
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=-1)  # 3 x (B, T, W)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        mask = None if valid is None else valid[:, None, None, :]  # (B, 1, 1, T)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, W/H)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out
