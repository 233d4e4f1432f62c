"""Synthetic preference records for the trainer tests, measured by an "NLL oracle".

Each record's lifetime hides one needle token (the vocabulary's last id, so a `tokens` gist of any
block holding it shows it). The oracle's NLL falls the finer the needle's unit is shown:
    nll = BASE_NLL + NLL_PER_LOD * lod(needle's unit) + NLL_PER_ROW * rows.
Variants are the served newest-first tiling, random sampler edits of it, and edits that expand the
needle's path (paid for by random collapses elsewhere), plus a recency baseline.
Every row costs NLL_PER_ROW, so expanding anything but the needle hurts: a LensNet must tell the
needle's units (expand) from the rest (collapse); a constant score cannot agree with both."""

from __future__ import annotations

import numpy as np

from lens_serve.core.allocator import collapse_candidates
from lens_serve.core.context import (
    Tiling,
    children,
    coarsest_tiling,
    fill_newest_first,
    levels_for,
)
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNetConfig, build_gistnet, gist_config
from lens_serve.core.policies import recency
from lens_serve.core.sampler import sample_variant
from lens_serve.store.preferences import spec_from_tiling, spec_from_working_context
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.core_helpers import HIDDEN, VOCAB

BLOCK = 4
TAIL = 16
ROWS = 1
BASE_NLL = 2.0
NLL_PER_LOD = 0.5
NLL_PER_ROW = 0.02


def gistnet_version(hidden: int = HIDDEN, table: EmbeddingTable | None = None) -> str:
    """The `tokens` GistNet's version, as a server for `table`'s model (if given) names it."""
    if table is not None:
        return build_gistnet(gist_config(table, "tokens", BLOCK, ROWS), table).version
    return build_gistnet(GistNetConfig(block_size=BLOCK, rows=ROWS, hidden_size=hidden)).version


def unit_at(tiling: Tiling, position: int) -> int:
    """Index of the unit covering token `position` (-1 for the trailing partial block)."""
    for k, unit in enumerate(tiling.units):
        start, end = tiling.unit_span(unit)
        if start <= position < end:
            return k
    return -1


def expand_toward(tiling: Tiling, position: int, depth: int) -> Tiling:
    """Expand the unit covering `position` up to `depth` times (budget ignored)."""
    units = list(tiling.units)
    for _ in range(depth):
        k = unit_at(Tiling(units, tiling.lifetime, tiling.block_size, tiling.gist_rows), position)
        if k < 0 or units[k][0] == 0:
            break
        units[k : k + 1] = children(units[k], tiling.block_size)
    return Tiling(units, tiling.lifetime, tiling.block_size, tiling.gist_rows)


def fit_budget(
    tiling: Tiling, budget: int, keep: int, counts: list[int], rng: np.random.Generator
) -> Tiling:
    """Collapse random legal sibling groups not covering token `keep` until `budget` rows fit
    (how the allocator pays for an expand)."""
    while tiling.rows > budget:
        zeros = np.zeros(len(tiling.units))
        options = [
            c
            for c in collapse_candidates(tiling, zeros, counts, TAIL, zeros)
            if not any(
                tiling.unit_span(u)[0] <= keep < tiling.unit_span(u)[1]
                for u in tiling.units[c.position : c.position + c.length]
            )
        ]
        if not options:
            break
        c = options[int(rng.integers(len(options)))]
        units = list(tiling.units)
        units[c.position : c.position + c.length] = [c.parent]
        tiling = Tiling(units, tiling.lifetime, tiling.block_size, tiling.gist_rows)
    return tiling


def oracle_nll(tiling: Tiling, needle_at: int) -> float:
    k = unit_at(tiling, needle_at)
    lod = tiling.units[k][0] if k >= 0 else 0
    return BASE_NLL + NLL_PER_LOD * lod + NLL_PER_ROW * tiling.rows


def variant(tiling: Tiling, kind: str, nll: float) -> pb.ShadowVariant:
    return pb.ShadowVariant(spec=spec_from_tiling(tiling), mean_nll=nll, kind=kind)


def record_of(
    tokens: np.ndarray,
    variants: list[pb.ShadowVariant],
    budget: int,
    *,
    hidden: int = HIDDEN,
    table: EmbeddingTable | None = None,
    model: str = "",
    seed: int = 0,
) -> pb.PreferenceRecord:
    return pb.PreferenceRecord(
        model=model,
        gistnet_version=gistnet_version(hidden, table),
        lens_version="lens-synthetic",
        block_size=BLOCK,
        gist_rows=ROWS,
        tail=TAIL,
        budget=budget,
        lifetime_token_ids=tokens.tolist(),
        window_start=0,
        target_token_ids=[1, 2, 3],
        variants=variants,
        seed=seed,
    )


def needle_record(
    seed: int,
    *,
    table: EmbeddingTable | None = None,
    model: str = "",
    n_random: int = 4,
) -> pb.PreferenceRecord:
    """A record for `table`'s model (default: the random tables of tests/core_helpers.py)."""
    hidden, vocab = (table.hidden_size, table.vocab_size) if table else (HIDDEN, VOCAB)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(160, 320))
    tokens = rng.integers(3, vocab - 1, n)
    needle_at = int(rng.integers(0, (n - TAIL) // 2))
    tokens[needle_at] = vocab - 1
    levels = levels_for(n, BLOCK)
    coarse = coarsest_tiling(n, TAIL, levels, BLOCK, ROWS)
    budget = coarse.rows + 24
    served = fill_newest_first(coarse, budget)
    counts = [n // BLOCK**k for k in range(levels + 1)]
    tilings = [("served", served)]
    for _ in range(n_random):
        edits = int(rng.integers(1, 5))
        tilings.append(("random", sample_variant(served, budget, TAIL, counts, rng, edits).tiling))
    for depth in range(1, 4):
        expanded = expand_toward(served, needle_at, depth)
        tilings.append(("random", fit_budget(expanded, budget, needle_at, counts, rng)))
    variants = [variant(t, kind, oracle_nll(t, needle_at)) for kind, t in tilings]
    baseline = spec_from_working_context(recency(n, budget, BLOCK, ROWS))
    # Recency spends the whole budget on raw rows and loses the needle entirely.
    recency_nll = BASE_NLL + NLL_PER_LOD * (levels + 1) + NLL_PER_ROW * budget
    variants.append(pb.ShadowVariant(spec=baseline, mean_nll=recency_nll, kind="recency"))
    return record_of(tokens, variants, budget, hidden=hidden, table=table, model=model, seed=seed)
