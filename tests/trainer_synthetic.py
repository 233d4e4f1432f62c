"""Synthetic new-format preference records for the trainer tests, measured by an "NLL oracle".

A record is built as the shadow scorer builds one: a real LifetimeTree over a random lifetime, the
served tiling (the coarsest tiling filled newest first within the budget), LensNet's inputs for
its units (`encode_units`), and the one-unit changes `unit_edits` picks (by the retrieval prior's
relevance, then at random), each measured by the oracle

    nll = BASE_NLL + NLL_PER_LOD * lod(needle's unit) + NLL_PER_ROW * rows
          + DISTRACTOR_NLL * [the distractor's block is shown raw] + noise (std NLL_NOISE).

The needle is the vocabulary's last id and the distractor the one before it: a `tokens` gist shows
its block's highest ids, so every unit over either shows it in its content. The query names the
needle, the distractor, or both (a third of the records each). Naming the needle, retrieval finds
it and the prior is right; naming only the distractor, the prior points at a block whose raw
tokens hurt (a lexical distractor) and misses the needle; naming both, the prior scores the two
alike. What the prior misses, LensNet can learn from the units' content: expand the needle's unit,
collapse (never expand) the distractor's.

Baselines (`retrieval`, `uniform`, `recency`) are measured by the same oracle, for evaluation.
`lifetime` and `block` build long sessions (a 1M-token tree takes a fraction of a second)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens_serve.core.context import Tiling, coarsest_tiling, fill_newest_first, raw_from
from lens_serve.core.counterfactual import UnitChoice, unit_edits, unit_relevance
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNetConfig, build_gistnet
from lens_serve.core.lensnet import unit_inputs
from lens_serve.core.policies import recency, retrieval, uniform
from lens_serve.core.retrieval import RetrievalConfig, prior_scores, retrieved_blocks
from lens_serve.core.tree import LifetimeTree
from lens_serve.store.preferences import spec_from_tiling, spec_from_working_context
from lens_serve.store.record_units import encode_units
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.core_helpers import random_table

BLOCK = 4
TAIL = 16
ROWS = 1
BASE_NLL = 2.0
NLL_PER_LOD = 0.5
NLL_PER_ROW = 0.02
DISTRACTOR_NLL = 0.4
NLL_NOISE = 0.01
"""Std of the measurement noise added to every NLL (nats): unrelated changes move a real NLL."""
CHOICE = UnitChoice(prior_units=3, lens_units=0, random_units=5)
"""Measured units per record: the prior's three most relevant, five at random."""


@dataclass(frozen=True)
class Oracle:
    needle_at: int  # token position of the needle
    distractor_at: int  # token position of the distractor
    rng: np.random.Generator  # draws the measurement noise

    def nll(self, tiling: Tiling) -> float:
        needle = tiling.units[_unit_at(tiling, self.needle_at)]
        distractor = tiling.units[_unit_at(tiling, self.distractor_at)]
        shown = DISTRACTOR_NLL if distractor[0] <= 0 else 0.0
        noise = float(self.rng.normal(0.0, NLL_NOISE))
        rows = NLL_PER_ROW * tiling.rows
        return BASE_NLL + NLL_PER_LOD * max(needle[0], 0) + rows + shown + noise


def _unit_at(tiling: Tiling, position: int) -> int:
    """Position in `tiling.units` of the timeline unit covering token `position`."""
    for k, unit in enumerate(tiling.units):
        start, end = tiling.unit_span(unit)
        if unit[0] >= 0 and start <= position < end:
            return k
    raise ValueError(f"token {position} is in no unit (the needle must precede the partial block)")


def _tree(tokens: np.ndarray, table: EmbeddingTable, block: int) -> LifetimeTree:
    config = GistNetConfig(
        kind="tokens", block_size=block, rows=ROWS, hidden_size=table.hidden_size
    )
    tree = LifetimeTree(build_gistnet(config, table), table)
    tree.append(tokens)
    return tree


def needle_record(
    seed: int,
    *,
    table: EmbeddingTable | None = None,
    model: str = "",
    lifetime: int | None = None,
    block: int = BLOCK,
    slack: int = 24,
) -> pb.PreferenceRecord:
    """A new-format record for `table`'s model (default: tests/core_helpers.random_table).
    lifetime: tokens (default 160-320 at random); slack: budget rows above the coarsest tiling."""
    table = table or random_table()
    vocab = table.vocab_size
    needle, distractor = vocab - 1, vocab - 2
    rng = np.random.default_rng(seed)
    n = lifetime or int(rng.integers(160, 320))
    tokens = rng.integers(3, vocab - 2, n)
    first_raw = raw_from(n, TAIL, block)
    needle_at = int(rng.integers(0, first_raw // 2))
    distractor_at = int(rng.integers(first_raw // 2, first_raw))  # another block, older than tail
    tokens[needle_at], tokens[distractor_at] = needle, distractor
    tree = _tree(tokens, table, block)
    names = [(needle,), (distractor,), (needle, distractor)][int(rng.integers(3))]
    query = np.concatenate([names, rng.integers(3, vocab - 2, 3)]).astype(np.int64)

    levels = tree.levels
    coarse = coarsest_tiling(n, TAIL, levels, block, ROWS)
    budget = coarse.rows + slack
    served = fill_newest_first(coarse, budget)
    blocks = retrieved_blocks(tree, query, TAIL, RetrievalConfig())
    counts = [tree.node_count(k) for k in range(levels + 1)]
    relevance = unit_relevance(served, tree.index.bm25(query))  # (U,)
    edits = unit_edits(served, budget, TAIL, counts, relevance, None, CHOICE, rng)

    inputs = unit_inputs(tree, served, TAIL, query)  # U' = units (+ partial block)
    oracle = Oracle(needle_at, distractor_at, rng)
    served_nll = oracle.nll(served)
    variants = [pb.ShadowVariant(spec=spec_from_tiling(served), mean_nll=served_nll, kind="served")]
    for kind, tiling in (
        ("retrieval", retrieval(coarse, blocks, budget)),
        ("uniform", uniform(coarse, budget, TAIL, levels)),
    ):
        variants.append(
            pb.ShadowVariant(spec=spec_from_tiling(tiling), mean_nll=oracle.nll(tiling), kind=kind)
        )
    # Recency spends the whole budget on the newest tokens and loses the needle.
    recency_nll = BASE_NLL + NLL_PER_LOD * (levels + 1) + NLL_PER_ROW * budget
    recency_spec = spec_from_working_context(recency(n, budget, block, ROWS))
    variants.append(pb.ShadowVariant(spec=recency_spec, mean_nll=recency_nll, kind="recency"))

    return pb.PreferenceRecord(
        model=model,
        gistnet_version=tree.gistnet.version,
        lens_version="lens-synthetic",
        block_size=block,
        gist_rows=ROWS,
        tail=TAIL,
        budget=budget,
        window_start=0,
        target_token_ids=[1, 2, 3],
        variants=variants,
        seed=seed,
        query_token_ids=query.tolist(),
        lifetime=n,
        units=encode_units(tree, served, inputs, prior_scores(served, blocks)),
        unit_gains=[
            pb.UnitGain(
                unit=e.position,
                edit=e.edit,
                source=e.source,
                probability=e.probability,
                mean_nll=oracle.nll(e.tiling),
                funding_collapses=e.funding,
            )
            for e in edits
        ],
    )


def old_format_record(seed: int) -> pb.PreferenceRecord:
    """A record as servers wrote them before per-unit gains: the lifetime and whole variants."""
    record = needle_record(seed)
    record.ClearField("units")
    record.ClearField("unit_gains")
    record.lifetime_token_ids.extend(np.random.default_rng(seed).integers(3, 100, record.lifetime))
    return record
