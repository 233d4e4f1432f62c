"""Preference record -> training example: LensNet inputs per variant and per-unit pair targets.

A record is self-contained (docs/design.md §2.5): its token window and GistNet name rebuild the
lifetime
tree, and each whole-lifetime variant's spec rebuilds its tiling and so its LensNet inputs. Variants
that do not cover the lifetime (the `recency` baseline) cannot be scored by LensNet; their NLLs are
kept for evaluation only.

Targets (MegaContext §4.5 steps 5-7, on units, with its sign bug fixed): for a pair (better B, worse
V) of variants with NLL gap Δ = nll(V) - nll(B) > 0, every unit u of V gets
  +s  if B shows u's start at a finer level (B expanded it: LensNet should ask to expand u),
  -s  if u lies inside a coarser unit of B (B collapsed it; u's whole sibling group lies inside
      that unit too, so the group gets the collapse target, as the allocator scores groups),
   0  if B has the same unit,
where s = tanh(Δ / sd / scale) and sd is the std of the record's variant NLLs (floored): advantage
normalisation per record, so every record teaches on the same scale while its larger gaps still
weigh more. The trailing partial block is context only and never gets a target.

Every pair also teaches its mirror on B's units: -1 where V shows B's unit finer (do not expand
it), +1 inside a coarser unit of V (do not collapse it). Without the mirror, a swap of two
same-level gists puts the expand target on a coarser unit than the collapse targets whichever
variant is better, so "score coarse units high, fine ones low" agreed with such pairs while knowing
nothing of their content; with it, that prior wins one half and loses the other.

Each side of a target vector (the units to expand, the units to collapse) shares s equally: a
unit's target is ±s / (units on its side). A collapse marks a whole sibling group, so unit by unit
the collapse side outnumbers the expand side (4.3 to 1 in bench/loop.py's needle records), and with
one vote per unit a constant negative score agreed with every held-out pair while ordering nothing
(score/NLL-gain correlation -0.05). Balanced, a constant score ties on every two-sided pair: only
ranking the expand side above the collapse side counts, which is what the allocator acts on."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lens_serve.core.context import Tiling, Unit
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gist_kinds import GistKind
from lens_serve.core.gistnet import GistNet, build_gistnet, gist_config
from lens_serve.core.lensnet import default_query, unit_inputs
from lens_serve.core.retrieval import RetrievalConfig, prior_scores, retrieved_blocks
from lens_serve.core.tree import LifetimeTree
from lens_serve.store.preferences import tiling_from_spec
from lens_serve.v1 import lens_serve_pb2 as pb

# GistNet kinds this trainer rebuilds from the record alone (no weights needed).
_REBUILDABLE_KINDS: tuple[GistKind, ...] = ("tokens", "mean")
# Key of the trailing partial block in an example's unit table (never a tree node).
_PARTIAL: Unit = (-1, 0)


class RecordError(ValueError):
    """A record this trainer cannot learn from; the message says why."""


@dataclass(frozen=True)
class TargetConfig:
    min_std: float = 0.25
    """Floor (nats) of a record's NLL std in advantage normalisation: gaps far below it are noise
    and get small weights instead of being blown up to full strength."""
    scale: float = 1.0
    """Pair strength = tanh(normalised gap / scale)."""
    min_gap: float = 1e-4
    """Pairs whose NLLs differ by less (nats) carry no preference."""
    max_pairs: int = 16
    """Preferences kept per record (each gives a pair and its mirror): the best variant against
    each other first, then the largest gaps."""


@dataclass(frozen=True)
class VariantExample:
    kind: str
    nll: float
    rows: np.ndarray  # (U',) int64: this variant's units (+ partial block) in the unit table


@dataclass(frozen=True)
class Pair:
    better: int  # index into Example.variants
    worse: int
    gap: float  # nll(worse) - nll(better), nats, > 0
    scored: int  # the variant whose units carry the targets: `worse`, or `better` (the mirror)
    targets: np.ndarray  # (U'_scored,) float32: sign * strength per unit of `scored`, 0 = none


@dataclass(frozen=True)
class Edit:
    """Variant `variant` seen as edits of the reference variant, for the gate's correlation."""

    variant: int
    gain: float  # nll(reference) - nll(variant): > 0 when the edits helped
    weights: np.ndarray  # (U'_reference,) float32: balanced_signs of the variant vs the reference


@dataclass(frozen=True)
class Example:
    entry_id: str
    content: torch.Tensor  # (N, D) float16: mean row embedding of each distinct unit
    lods: torch.Tensor  # (N,) int64
    features: torch.Tensor  # (N, F) float32
    prior: torch.Tensor  # (N,) float32: the retrieval prior's score of each unit (lens = prior +
    # LensNet's residual, so the residual is what training fits)
    variants: list[VariantExample]
    pairs: list[Pair]
    reference: int  # the served variant (else the first whole-lifetime one)
    edits: list[Edit]
    baselines: dict[str, float]  # NLLs of variants LensNet cannot score (evaluation only)


def unit_targets(worse: Tiling, better: Tiling) -> np.ndarray:
    """(U,) int8 over `worse`'s units: +1 where `better` is finer, -1 where coarser, else 0.

    Both tilings cover the same lifetime with aligned nodes, so at a unit's start `better` either
    has a unit (same, finer or coarser one) or sits inside a strictly larger, coarser unit."""
    at_start = {better.unit_span(u)[0]: u[0] for u in better.units}
    out = np.zeros(len(worse.units), dtype=np.int8)
    for k, unit in enumerate(worse.units):
        lod = at_start.get(worse.unit_span(unit)[0])
        if lod is None or lod > unit[0]:
            out[k] = -1  # inside a coarser unit of `better`: collapse (the group is inside too)
        elif lod < unit[0]:
            out[k] = 1  # `better` shows this span finer: expand
    return out


def balanced_signs(signs: np.ndarray) -> np.ndarray:
    """(U,) float32: +1/n+ on the n+ positive units, -1/n- on the n- negative ones, 0 elsewhere."""
    out = np.zeros(len(signs), dtype=np.float32)
    for side in (1, -1):
        chosen = signs == side
        if chosen.any():
            out[chosen] = side / chosen.sum()
    return out


def gistnet_for(record: pb.PreferenceRecord, table: EmbeddingTable) -> GistNet:
    """The GistNet that made the record's gists, rebuilt and checked against its version."""
    version = record.gistnet_version
    parts = version.split("-")
    kind = parts[1] if len(parts) == 3 and parts[0] == "gist" else ""
    if kind == "transformer":
        raise RecordError(f"gistnet {version!r}: trained GistNets are not supported yet")
    if kind not in _REBUILDABLE_KINDS:
        raise RecordError(
            f"gistnet {version!r}: not a gist-<kind>-<hash> version this trainer knows"
        )
    try:
        net = _build_gistnet(kind, record.block_size, record.gist_rows, table)
    except ValueError as e:
        raise RecordError(f"gistnet {version!r}: {e}") from e
    if net.version != version:
        raise RecordError(
            f"gistnet {version!r}: rebuilding {kind} with block_size {record.block_size}, "
            f"rows {record.gist_rows}, hidden {table.hidden_size} gives {net.version!r}"
        )
    return net


@functools.lru_cache(maxsize=16)
def _build_gistnet(kind: GistKind, block_size: int, rows: int, table: EmbeddingTable) -> GistNet:
    # Rebuilt as a server builds it (`gist_config`); the version hash covers every field.
    return build_gistnet(gist_config(table, kind, block_size, rows), table)


def example_from_record(
    record: pb.PreferenceRecord,
    entry_id: str,
    table: EmbeddingTable,
    config: TargetConfig,
    model: str = "",
) -> Example:
    """Rebuild `record` (raises RecordError if it cannot be learned from)."""
    if record.window_start != 0:
        raise RecordError(
            f"window_start {record.window_start}: this trainer rebuilds windows from token 0 only"
        )
    if model and record.model and Path(record.model).name != Path(model).name:
        raise RecordError(f"model {record.model!r}: this trainer embeds with {model!r}")
    gistnet = gistnet_for(record, table)
    lifetime, b, r = len(record.lifetime_token_ids), record.block_size, record.gist_rows
    tree = LifetimeTree(gistnet, table)
    try:
        tree.append(np.asarray(record.lifetime_token_ids, dtype=np.int64))
    except ValueError as e:
        raise RecordError(f"lifetime_token_ids: {e}") from e
    # The query the served WC was chosen for; records written before it was recorded: the newest
    # tokens, which is what their servers used.
    query = np.asarray(record.query_token_ids, dtype=np.int64) if record.query_token_ids else None
    blocks = retrieved_blocks(
        tree, default_query(tree) if query is None else query, record.tail, RetrievalConfig()
    )

    tilings: list[Tiling] = []
    variants: list[VariantExample] = []
    baselines: dict[str, float] = {}
    table_rows: dict[Unit, int] = {}
    content: list[torch.Tensor] = []
    lods: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    prior: list[float] = []
    for v in record.variants:
        if not math.isfinite(v.mean_nll):
            raise RecordError(f"variant {v.kind!r}: NLL {v.mean_nll} is not finite")
        try:
            tiling = tiling_from_spec(v.spec, lifetime, b, r)
        except ValueError as e:
            raise RecordError(f"variant {v.kind!r}: {e}") from e
        if tiling is None:
            baselines[v.kind] = float(v.mean_nll)
            continue
        if any(lod > tree.levels for lod, _ in tiling.units):
            raise RecordError(f"variant {v.kind!r}: a gist above the tree's top level")
        inputs = unit_inputs(tree, tiling, record.tail, query)  # U' = units (+ partial block)
        keys = [*tiling.units, _PARTIAL][: len(inputs)]
        unit_prior = [*prior_scores(tiling, blocks).tolist(), 0.0]  # the partial block: none
        rows = []
        for k, key in enumerate(keys):
            if key not in table_rows:
                table_rows[key] = len(table_rows)
                content.append(inputs.content[k])
                lods.append(inputs.lods[k])
                features.append(inputs.features[k])
                prior.append(unit_prior[k])
            rows.append(table_rows[key])
        tilings.append(tiling)
        variants.append(VariantExample(v.kind, float(v.mean_nll), np.asarray(rows, np.int64)))
    if not variants:
        raise RecordError("no variant covers the whole lifetime")

    kinds = [v.kind for v in variants]
    reference = kinds.index("served") if "served" in kinds else 0
    return Example(
        entry_id=entry_id,
        # float16 halves the replay buffer; LensNet normalises the content first, so the
        # rounding (~5e-4 relative) is far below what it can resolve.
        content=torch.stack(content).to(torch.float16),  # (N, D)
        lods=torch.stack(lods).long(),  # (N,)
        features=torch.stack(features).float(),  # (N, F)
        prior=torch.tensor(prior, dtype=torch.float32),  # (N,)
        variants=variants,
        pairs=build_pairs(tilings, [v.nll for v in variants], config),
        reference=reference,
        edits=_edits(tilings, variants, reference),
        baselines=baselines,
    )


def build_pairs(tilings: list[Tiling], nlls: list[float], config: TargetConfig) -> list[Pair]:
    """Preference pairs with per-unit targets on the worse variant (see the module docstring)."""
    if len(tilings) < 2:
        return []
    nll = np.asarray(nlls, dtype=np.float64)
    sigma = max(float(nll.std()), config.min_std)
    best = int(np.argmin(nll))
    candidates = [
        (w != best and b != best, -(nll[w] - nll[b]), b, w)  # best-vs-rest first, big gaps first
        for b in range(len(nll))
        for w in range(len(nll))
        if nll[w] - nll[b] > config.min_gap
    ]
    candidates.sort()
    pairs: list[Pair] = []
    for _, neg_gap, b, w in candidates:
        if len(pairs) >= 2 * config.max_pairs:
            break
        signs = unit_targets(tilings[w], tilings[b])
        if not signs.any():
            continue  # same tiling measured twice: nothing to prefer
        strength = math.tanh(-neg_gap / sigma / config.scale)
        # Toward `better` on the worse variant's units, and its mirror: away from `worse` on the
        # better variant's units (what the worse one shows finer must not be expanded, what it
        # shows coarser must not be collapsed).
        mirror = -unit_targets(tilings[b], tilings[w])
        for scored, unit_signs in ((w, signs), (b, mirror)):
            targets = np.zeros(_width(tilings[scored]), dtype=np.float32)  # partial block: 0
            targets[: len(unit_signs)] = balanced_signs(unit_signs) * strength
            pairs.append(Pair(b, w, float(-neg_gap), scored, targets))
    return pairs


def _edits(tilings: list[Tiling], variants: list[VariantExample], reference: int) -> list[Edit]:
    ref = tilings[reference]
    out = []
    for k, tiling in enumerate(tilings):
        if k == reference:
            continue
        signs = unit_targets(ref, tiling)
        if signs.any():
            padded = np.zeros(_width(ref), dtype=np.float32)  # (U'_ref,)
            padded[: len(signs)] = balanced_signs(signs)
            out.append(Edit(k, variants[reference].nll - variants[k].nll, padded))
    return out


def _width(tiling: Tiling) -> int:
    """LensNet entries of a tiling: its units plus the trailing partial block, if any."""
    return len(tiling.units) + (1 if tiling.loose_start < tiling.lifetime else 0)
