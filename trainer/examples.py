"""Preference record -> training example: LensNet's inputs for the served tiling and a value per
measured unit.

A record (one with `units`, see lens_serve/store/record_units.py) carries LensNet's inputs for
every unit of the served tiling and the measured effect of changing one unit at a time
(`unit_gains`), not the lifetime: its size is bounded by the budget whatever the session's length,
and the inputs come back with the embedding table alone (no tree, no GistNet). Records of the older
format (the lifetime and whole-tiling variants) and records without units (the served working
context was not a tiling) hold no per-unit gains: they are rejected with that reason, and the loop
counts them.

Target. For a measured unit, the gain g = nll(served) - nll(served with that one unit changed) is
> 0 when the change helped, and its value is
    t = g for an expand, -g for a collapse:
what showing the unit finer is worth. LensNet's `lens` score (retrieval prior + residual, > 0 =
expand) should order the measured units by t. Values of two records are not comparable (a target
the context barely affects moves by hundredths of a nat, a needle by nats), so each record carries
its scale τ_t = max(std(t), min_std) for the loss (advantage normalisation: every record teaches
on the same scale; the floor keeps noise-level spreads from being blown up to full strength).

variants[0] is the served working context (its NLL is the reference); the rest are baselines kept
for evaluation only."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lens_serve.core.embedding import EmbeddingTable
from lens_serve.store.record_units import PARTIAL_INDEX, UnitRecordError, decode_units
from lens_serve.v1 import lens_serve_pb2 as pb

EDITS = ("expand", "collapse")


class RecordError(ValueError):
    """A record this trainer cannot learn from; the message says why."""


@dataclass(frozen=True)
class TargetConfig:
    min_std: float = 0.25
    """Floor (nats) of a record's value std in advantage normalisation: spreads far below it are
    noise and teach weakly instead of being blown up to full strength."""
    min_gap: float = 1e-3
    """Records whose values spread less (nats) carry no label: nothing to rank."""


@dataclass(frozen=True)
class Example:
    entry_id: str
    content: torch.Tensor  # (U', D) float16: mean row embedding of each unit (+ partial block)
    lods: torch.Tensor  # (U',) int64
    features: torch.Tensor  # (U', F) float32
    prior: torch.Tensor  # (U',) float32: the retrieval prior (lens = prior + LensNet's residual,
    # so the residual is what training fits); 0 for the partial block
    measured: np.ndarray  # (M,) int64: positions in the units of the measured units
    value: np.ndarray  # (M,) float32: t of each measured unit, nats (see the module docstring)
    scale: float  # τ_t = max(std(value), min_std)
    labelled: bool  # M >= 2 and the values spread at least min_gap: the loss can rank them
    served_nll: float
    baselines: dict[str, float]  # kind -> mean NLL of its variants (evaluation only)

    @property
    def spread(self) -> float:
        return float(self.value.max() - self.value.min()) if len(self.value) else 0.0


def example_from_record(
    record: pb.PreferenceRecord,
    entry_id: str,
    table: EmbeddingTable,
    config: TargetConfig,
    model: str = "",
) -> Example:
    """Decode `record` (raises RecordError if it cannot be learned from)."""
    if not record.units:
        if record.lifetime_token_ids:
            raise RecordError(
                "old format: the record carries the lifetime and whole-tiling variants; this "
                "trainer learns from per-unit gains only"
            )
        raise RecordError(
            "no units: the served working context was not a tiling, so no per-unit gains"
        )
    if model and record.model and Path(record.model).name != Path(model).name:
        raise RecordError(f"model {record.model!r}: this trainer embeds with {model!r}")
    served_nll, baselines = _variant_nlls(record)
    try:
        inputs, prior = decode_units(list(record.units), table)
    except UnitRecordError as e:
        raise RecordError(str(e)) from e
    measured, value = _values(record, served_nll)
    spread = float(value.max() - value.min()) if len(value) else 0.0
    return Example(
        entry_id=entry_id,
        # float16 halves the replay buffer; LensNet normalises the content first, so the
        # rounding (~5e-4 relative) is far below what it can resolve.
        content=inputs.content.to(torch.float16),  # (U', D)
        lods=inputs.lods.long(),  # (U',)
        features=inputs.features.float(),  # (U', F)
        prior=torch.from_numpy(prior).float(),  # (U',)
        measured=measured,
        value=value,
        scale=max(float(value.std()) if len(value) else 0.0, config.min_std),
        labelled=len(value) >= 2 and spread >= config.min_gap,
        served_nll=served_nll,
        baselines=baselines,
    )


def _variant_nlls(record: pb.PreferenceRecord) -> tuple[float, dict[str, float]]:
    """(served NLL, mean NLL per baseline kind); the served variant must come first."""
    if not record.variants or record.variants[0].kind != "served":
        first = record.variants[0].kind if record.variants else None
        raise RecordError(f"variants[0] is {first!r}, not the served working context")
    for v in record.variants:
        if not math.isfinite(v.mean_nll):
            raise RecordError(f"variant {v.kind!r}: NLL {v.mean_nll} is not finite")
    by_kind: dict[str, list[float]] = defaultdict(list)
    for v in record.variants[1:]:
        by_kind[v.kind].append(float(v.mean_nll))
    return float(record.variants[0].mean_nll), {k: float(np.mean(n)) for k, n in by_kind.items()}


def _values(record: pb.PreferenceRecord, served_nll: float) -> tuple[np.ndarray, np.ndarray]:
    """((M,) positions, (M,) values): one per measured unit, repeated measurements averaged."""
    found: dict[int, list[float]] = defaultdict(list)
    for k, gain in enumerate(record.unit_gains):
        if gain.unit >= len(record.units) or record.units[gain.unit].index == PARTIAL_INDEX:
            raise RecordError(
                f"unit_gains[{k}].unit {gain.unit}: not a unit of the served tiling "
                f"({len(record.units)} inputs, the last may be the partial block)"
            )
        if gain.edit not in EDITS:
            raise RecordError(f"unit_gains[{k}].edit {gain.edit!r}: not one of {EDITS}")
        if not math.isfinite(gain.mean_nll):
            raise RecordError(f"unit_gains[{k}]: NLL {gain.mean_nll} is not finite")
        g = served_nll - gain.mean_nll  # > 0: the change helped
        found[gain.unit].append(g if gain.edit == "expand" else -g)
    positions = sorted(found)
    value = [float(np.mean(found[p])) for p in positions]
    return np.asarray(positions, dtype=np.int64), np.asarray(value, dtype=np.float32)
