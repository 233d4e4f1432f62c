"""LensNet: a small non-causal transformer that scores the units of a working context.

Each unit (a raw block, a gist, or the trailing partial block) becomes one token of LensNet's input:
its content (the mean of its rows' embeddings, projected down) plus its LOD, span size, size in
rows, distance from the newest token and how much of the query's rare vocabulary its span holds
(see `block_index`). Attention is non-causal, so every unit sees the tail (the
query). The head gives one signed score per unit: > 0 asks to expand it, < 0 allows collapsing it.
The head starts at zero, so an untrained LensNet changes nothing: the policy falls back to the
newest-first tiling instead of acting on noise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lens_serve.core import checkpoint
from lens_serve.core.attention import Block
from lens_serve.core.context import Tiling
from lens_serve.core.tree import LifetimeTree

CHECKPOINT_STEM = "lensnet"
N_FEATURES = 7
# The default query, when a request names none: the newest tokens, not the whole raw tail. In the
# loop bench's needle records the asked fact's block had the highest match of all older blocks in
# 90% of records with the newest 32 tokens, 84% with 64 and 57% with the 128-token tail (older tail
# tokens are document words that match all over the lifetime).
QUERY_TOKENS = 32


@dataclass(frozen=True)
class LensNetConfig:
    hidden_size: int = 576
    """The base model's embedding width (input of the down-projection)."""
    width: int = 64
    """LensNet's internal width."""
    layers: int = 2
    """Transformer layers."""
    heads: int = 4
    """Attention heads."""
    max_lod: int = 8
    """Largest LOD with its own embedding (coarser ones share the last)."""
    seed: int = 0
    """Initialisation seed: the same seed gives the same initial weights and version."""

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")


class LensNet(nn.Module):
    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = config
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            w = config.width
            self.content = nn.Sequential(
                nn.LayerNorm(config.hidden_size), nn.Linear(config.hidden_size, w)
            )
            self.lod = nn.Embedding(config.max_lod + 1, w)
            self.features = nn.Linear(N_FEATURES, w)
            self.blocks = nn.ModuleList(Block(w, config.heads) for _ in range(config.layers))
            self.norm = nn.LayerNorm(w)
            self.head = nn.Linear(w, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        finally:
            torch.random.set_rng_state(rng_state)
        self.eval()

    def forward(
        self, content: torch.Tensor, lods: torch.Tensor, features: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """content (B, U, D), lods (B, U) int, features (B, U, F), valid (B, U) bool -> (B, U)."""
        lod = lods.clamp(0, self.config.max_lod)
        x = self.content(content.float()) + self.lod(lod) + self.features(features)  # (B, U, W)
        for block in self.blocks:
            x = block(x, valid)
        scores: torch.Tensor = self.head(self.norm(x)).squeeze(-1)  # (B, U)
        return scores

    @property
    def version(self) -> str:
        return checkpoint.content_version("lens", self.config, checkpoint.weights_bytes(self))


class UnitInputs:
    """LensNet's input for one tiling: its units plus the trailing partial block (if any)."""

    def __init__(self, content: torch.Tensor, lods: torch.Tensor, features: torch.Tensor) -> None:
        self.content = content  # (U', D) mean row embedding per unit
        self.lods = lods  # (U',)
        self.features = features  # (U', F)

    def __len__(self) -> int:
        return int(self.lods.shape[0])


def unit_inputs(
    tree: LifetimeTree, tiling: Tiling, tail: int, query: np.ndarray | None = None
) -> UnitInputs:
    """Summarise every unit of `tiling` (plus the partial block) for LensNet. `query`: token ids
    of what the request asks (None: the newest QUERY_TOKENS tokens)."""
    b, n = tree.block_size, tiling.lifetime
    # A recalled block (lod RECALL) reads like a raw block: LOD 0, its tokens' mean embedding.
    lods = np.maximum([u[0] for u in tiling.units], 0).astype(np.int64)  # (U,)
    index = np.array([u[1] for u in tiling.units], dtype=np.int64)  # (U,)
    content = torch.zeros(len(lods), tree.table.hidden_size)  # (U, D)
    raw = lods == 0
    if raw.any():
        positions = (index[raw, None] * b + np.arange(b)).reshape(-1)  # (R*B,)
        embeds = tree.token_embeds(positions).float().view(int(raw.sum()), b, -1)  # (R, B, D)
        content[torch.from_numpy(raw)] = embeds.mean(dim=1)
    for lod in np.unique(lods[~raw]).tolist():
        mask = lods == lod
        content[torch.from_numpy(mask)] = tree.gist_embeds(lod, index[mask]).float().mean(dim=1)
    size = np.power(b, np.maximum(lods, 1))  # tokens per unit
    starts, rows = index * size, np.where(raw, b, tiling.gist_rows)
    if tiling.loose_start < n:  # the trailing partial block: context only, never edited
        partial = tree.token_embeds(np.arange(tiling.loose_start, n)).float().mean(dim=0)
        content = torch.cat([content, partial[None]])
        lods = np.append(lods, 0)
        starts, size = (
            np.append(starts, tiling.loose_start),
            np.append(size, n - tiling.loose_start),
        )
        rows = np.append(rows, n - tiling.loose_start)
    ends = starts + size
    log_n = math.log1p(max(n, 1))
    match = query_match(tree, starts, ends, query)  # (U',)
    if tiling.loose_start < n:
        match[-1] = 1.0  # the trailing partial block is part of the query itself
    features = np.stack(
        [
            np.log1p(size) / log_n,  # span size
            rows / b,  # rows taken
            np.log1p(n - ends) / log_n,  # distance from the newest token
            starts / max(n, 1),  # relative position in the lifetime
            (ends > n - tail).astype(np.float64),  # overlaps the raw tail
            np.log1p(n - starts) / log_n,  # age of the oldest covered token
            match,  # IDF-weighted share of the query's (newest tokens') words in the span
        ],
        axis=1,
    )  # (U', F)
    return UnitInputs(content, torch.from_numpy(lods), torch.from_numpy(features).float())


def default_query(tree: LifetimeTree) -> np.ndarray:
    """The query of a request that names none: the newest QUERY_TOKENS tokens."""
    n = tree.lifetime
    return tree.tokens(max(n - QUERY_TOKENS, 0), n)


def query_match(
    tree: LifetimeTree, starts: np.ndarray, ends: np.ndarray, query: np.ndarray | None = None
) -> np.ndarray:
    """(U,) match of the spans [starts, ends) with `query` (None: `default_query`)."""
    words = default_query(tree) if query is None else query
    return tree.index.query_match(words, starts, ends)


def tiling_query_match(
    tree: LifetimeTree, tiling: Tiling, query: np.ndarray | None = None
) -> np.ndarray:
    """(U,) query match of each unit of `tiling` (the partial block not included)."""
    spans = np.array([tiling.unit_span(u) for u in tiling.units], dtype=np.int64).reshape(-1, 2)
    return query_match(tree, spans[:, 0], spans[:, 1], query)


@torch.inference_mode()
def score_units(net: LensNet, inputs: UnitInputs) -> np.ndarray:
    """(U',) scores, float32."""
    valid = torch.ones(1, len(inputs), dtype=torch.bool)
    scores = net(inputs.content[None], inputs.lods[None], inputs.features[None], valid)
    out: np.ndarray = scores[0].numpy().astype(np.float32)
    return out


def save_lensnet(net: LensNet, directory: Path) -> None:
    checkpoint.write_files(directory, CHECKPOINT_STEM, net.config, checkpoint.weights_bytes(net))


def load_lensnet(directory: Path) -> LensNet:
    raw, weights = checkpoint.read_files(directory, CHECKPOINT_STEM)
    return lensnet_from_bytes(raw, weights)


def lensnet_from_bytes(raw_config: dict[str, object], weights: bytes) -> LensNet:
    net = LensNet(checkpoint.config_from_dict(LensNetConfig, raw_config))
    checkpoint.load_state(net, weights)
    net.eval()
    return net
