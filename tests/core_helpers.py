"""Small builders shared by the core tests (random embedding tables, trees, choosers)."""

from __future__ import annotations

import numpy as np
import torch

from lens_serve.core.allocator import FocusConfig
from lens_serve.core.embedding import EmbeddingTable, ListTokens
from lens_serve.core.gist_kinds import GistKind
from lens_serve.core.gistnet import GistNetConfig, build_gistnet, gist_config
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import ContextChooser
from lens_serve.core.retrieval import RetrievalConfig
from lens_serve.core.tree import LifetimeTree

HIDDEN = 16
VOCAB = 512
LIST_SEPARATOR, LIST_OPENER, LIST_CLOSER = 11, (12,), (13, 14)  # stand for ",", "[", " ...]"


def random_table(seed: int = 0) -> EmbeddingTable:
    generator = torch.Generator().manual_seed(seed)
    return EmbeddingTable(torch.randn(VOCAB, HIDDEN, generator=generator))


def list_table(seed: int = 0) -> EmbeddingTable:
    """A random table whose made-up tokenizer lends `tokens` gists a list layout; even ids begin
    words."""
    word_starts = torch.arange(VOCAB) % 2 == 0  # (V,)
    marks = ListTokens(LIST_SEPARATOR, LIST_OPENER, LIST_CLOSER, word_starts)
    return EmbeddingTable(random_table(seed).weight, marks)


def make_tree(
    lifetime: int,
    block_size: int = 4,
    rows: int = 1,
    kind: GistKind = "tokens",
    seed: int = 0,
    separator_id: int = -1,
    listed: bool = False,
) -> LifetimeTree:
    """listed: a `tokens` tree laid out as gist_config does for a real tokenizer (list_table)."""
    config = GistNetConfig(
        kind=kind,
        block_size=block_size,
        rows=rows,
        hidden_size=HIDDEN,
        width=16,
        separator_id=separator_id,
    )
    table = list_table(seed) if listed else random_table(seed)
    if listed:
        config = gist_config(table, kind, block_size, rows)
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


def chooser(
    seed: int = 0, focus: FocusConfig | None = None, retrieval: RetrievalConfig | None = None
) -> ContextChooser:
    return ContextChooser(random_lensnet(seed), focus, retrieval)


NO_RETRIEVAL = RetrievalConfig(blocks=0, recall_blocks=0)
"""For tests of the allocator alone: no retrieval prior, no recalls."""


def node_counts(tree: LifetimeTree) -> list[int]:
    return [tree.node_count(k) for k in range(tree.levels + 1)]
