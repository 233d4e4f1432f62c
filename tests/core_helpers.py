"""Small builders shared by the core tests (random embedding tables, trees, choosers)."""

from __future__ import annotations

import numpy as np
import torch

from lens_serve.allocator import FocusConfig
from lens_serve.embedding import EmbeddingTable
from lens_serve.gistnet import GistKind, GistNetConfig, build_gistnet
from lens_serve.lensnet import LensNet, LensNetConfig
from lens_serve.policies import ContextChooser
from lens_serve.tree import LifetimeTree

HIDDEN = 16
VOCAB = 512


def random_table(seed: int = 0) -> EmbeddingTable:
    generator = torch.Generator().manual_seed(seed)
    return EmbeddingTable(torch.randn(VOCAB, HIDDEN, generator=generator))


def make_tree(
    lifetime: int,
    block_size: int = 4,
    rows: int = 1,
    kind: GistKind = "tokens",
    seed: int = 0,
    separator_id: int = -1,
) -> LifetimeTree:
    config = GistNetConfig(
        kind=kind,
        block_size=block_size,
        rows=rows,
        hidden_size=HIDDEN,
        width=16,
        separator_id=separator_id,
    )
    table = random_table(seed)
    tree = LifetimeTree(build_gistnet(config, table), table)
    tree.append(np.random.default_rng(seed).integers(0, VOCAB, lifetime))
    return tree


def random_lensnet(seed: int) -> LensNet:
    """A LensNet with a non-zero head, so its scores actually drive edits."""
    net = LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, heads=2, layers=1, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=generator))
        net.head.bias.fill_(0.2)
    return net


def chooser(seed: int = 0, focus: FocusConfig | None = None) -> ContextChooser:
    return ContextChooser(random_lensnet(seed), focus)


def node_counts(tree: LifetimeTree) -> list[int]:
    return [tree.node_count(k) for k in range(tree.levels + 1)]
