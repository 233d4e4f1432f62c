"""The evaluation gate: is a new LensNet at least as good as the current one and the prior on
held-out records?

Measurements on the held-out slice (every k-th record by a hash of its stream id, so the split is
the same on every trainer and every restart), with s the `lens` scores (retrieval prior + LensNet's
residual) of each record's measured units and t their values (trainer.examples):
- ndcg: per record, NDCG of the measured units ranked by s with relevance t - min(t), then the
  mean over the records whose values spread at least `DECISIVE_GAP` (the others are near-ties no
  feature predicts: a target the context barely affects). Gains are linear in t, so a record's
  NDCG does not depend on its scale. Tied scores count as the mean of their orders (the prior
  gives most units the same score): neither the luck of a sort nor a constant is rewarded;
- agreement: the fraction of within-record unit pairs whose values differ by at least
  `DECISIVE_GAP` that s orders the right way (ties disagree), reported beside NDCG;
- loss: the training loss (trainer.train) on the labelled held-out records;
- drift: the mean |residual| over the units no gain was measured for. No measurement says those
  should move, yet they are most of what the allocator ranks: a LensNet that moved them far
  reorders the working context unchecked (one that did lost facts the prior alone found);
- baseline gaps: mean nll(baseline) - nll(served) per baseline kind (> 0: the served WC was better).
A new version is judged once at least `min_held_out` held-out records have a decisive spread, and
passes if its NDCG is at least the prior's alone (a residual must not make retrieval worse) and
the current version's, and its drift is at most `max_drift`."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lens_serve.core.lensnet import LensNet
from trainer.examples import Example
from trainer.train import (
    LossConfig,
    collate,
    measured_scores,
    record_losses,
    scores,
    unmeasured,
)

# Examples per LensNet forward: bounds the padded (B, U, D) batch's memory.
_EVAL_CHUNK = 32
DECISIVE_GAP = 0.05
"""nats: units (and records) whose values differ by less are near-ties (see the docstring)."""
_TIE = 1e-6  # score differences this small are float noise of equal scores


def is_held_out(entry_id: str, every: int) -> bool:
    """Deterministic 1-in-`every` split by stream id (independent of arrival order)."""
    digest = hashlib.sha256(entry_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


@dataclass(frozen=True)
class GateReport:
    ndcg: float  # mean over the ranked records; what the gate uses (0 when none)
    ranked_records: int  # records whose values spread >= DECISIVE_GAP
    agreement: float  # over decisive within-record unit pairs (0 when none)
    decisive_pairs: int
    loss: float  # mean training loss over labelled records; nan when none
    records: int
    units: int  # measured units in all records
    drift: float = 0.0  # mean |lens - prior| over the unmeasured units (0 for the prior alone)
    baseline_gaps: dict[str, float] = field(default_factory=dict)
    """kind -> mean nll(kind) - nll(served) over the records that measured that baseline."""

    def as_dict(self) -> dict[str, float | int]:
        """Flat, for JSON: the baseline gaps become `served_vs_<kind>`."""
        out: dict[str, float | int] = {
            "ndcg": self.ndcg,
            "ranked_records": self.ranked_records,
            "agreement": self.agreement,
            "decisive_pairs": self.decisive_pairs,
            "loss": self.loss,
            "records": self.records,
            "units": self.units,
            "drift": self.drift,
        }
        out.update({f"served_vs_{k}": gap for k, gap in sorted(self.baseline_gaps.items())})
        return out


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    new: GateReport
    current: GateReport
    judged: bool = True
    """False when the held-out slice was still too small to judge the new weights' quality."""
    prior: GateReport | None = None


@torch.inference_mode()
def evaluate(
    net: LensNet | None, examples: Sequence[Example], loss: LossConfig | None = None
) -> GateReport:
    """`net`'s report on `examples`; None measures the retrieval prior alone."""
    loss = loss or LossConfig()
    if net is not None:
        net.eval()
    ndcgs: list[float] = []
    losses: list[float] = []
    agreed = pairs = units = 0
    drift_sum, drift_units = 0.0, 0
    for start in range(0, len(examples), _EVAL_CHUNK):
        chunk = examples[start : start + _EVAL_CHUNK]
        batch = collate(chunk)
        unit_scores = scores(net, batch)  # (B, U)
        per_record = record_losses(unit_scores, batch, loss)  # (B,)
        losses += per_record[batch.labelled].tolist()
        free = unmeasured(batch)  # (B, U)
        drift_sum += float((unit_scores - batch.prior)[free].abs().sum())
        drift_units += int(free.sum())
        s_all = measured_scores(unit_scores, batch).numpy()  # (B, M)
        for row, ex in enumerate(chunk):
            m = len(ex.measured)
            units += m
            s, t = s_all[row, :m], ex.value.astype(np.float64)
            a, p = pair_agreement(s, t)
            agreed, pairs = agreed + a, pairs + p
            if m >= 2 and ex.spread >= DECISIVE_GAP:
                ndcgs.append(ndcg(s, t))
    return GateReport(
        ndcg=float(np.mean(ndcgs)) if ndcgs else 0.0,
        ranked_records=len(ndcgs),
        agreement=agreed / pairs if pairs else 0.0,
        decisive_pairs=pairs,
        loss=float(np.mean(losses)) if losses else math.nan,
        records=len(examples),
        units=units,
        drift=drift_sum / drift_units if drift_units else 0.0,
        baseline_gaps=baseline_gaps(examples),
    )


def ndcg(s: np.ndarray, t: np.ndarray) -> float:
    """NDCG of items ranked by scores s (M,), relevance t - min(t) (M,); tied scores share the
    mean gain of their positions. 0 when every relevance is 0."""
    rel = np.asarray(t, dtype=np.float64) - float(np.min(t))
    discount = 1.0 / np.log2(np.arange(len(rel)) + 2.0)  # (M,)
    ideal = float(np.sort(rel)[::-1] @ discount)
    if ideal <= 0:
        return 0.0
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
    ranked_s, ranked_rel = np.asarray(s, dtype=np.float64)[order], rel[order]
    dcg, i = 0.0, 0
    while i < len(order):  # each run of tied scores: its mean gain at each of its positions
        j = i + 1
        while j < len(order) and ranked_s[i] - ranked_s[j] <= _TIE:
            j += 1
        dcg += float(ranked_rel[i:j].mean()) * float(discount[i:j].sum())
        i = j
    return dcg / ideal


def pair_agreement(s: np.ndarray, t: np.ndarray) -> tuple[int, int]:
    """(pairs s orders right, pairs) over unit pairs whose values differ by >= DECISIVE_GAP."""
    dt = t[:, None] - t[None, :]  # (M, M): > 0 where the row unit is worth more
    ds = s[:, None] - s[None, :]  # (M, M)
    decisive = dt >= DECISIVE_GAP
    return int((decisive & (ds > _TIE)).sum()), int(decisive.sum())


def baseline_gaps(examples: Sequence[Example]) -> dict[str, float]:
    """kind -> mean nll(kind) - nll(served), over the examples that measured it."""
    gaps: dict[str, list[float]] = defaultdict(list)
    for ex in examples:
        for kind, nll in ex.baselines.items():
            gaps[kind].append(nll - ex.served_nll)
    return {kind: float(np.mean(g)) for kind, g in sorted(gaps.items())}


def decide(
    new: GateReport,
    current: GateReport,
    prior: GateReport,
    min_records: int = 1,
    max_drift: float = math.inf,
) -> GateDecision:
    if new.ranked_records < min_records:
        return GateDecision(
            False,
            f"{new.ranked_records} held-out records with decisive per-unit gains, the gate "
            f"needs {min_records}",
            new,
            current,
            judged=False,
            prior=prior,
        )
    if new.drift > max_drift:
        return GateDecision(
            False,
            f"residual drift {new.drift:.2f} on unmeasured held-out units > {max_drift:.2f}",
            new,
            current,
            prior=prior,
        )
    if new.ndcg < prior.ndcg:
        return GateDecision(
            False,
            f"held-out NDCG {new.ndcg:.3f} < the prior's {prior.ndcg:.3f}",
            new,
            current,
            prior=prior,
        )
    if new.ndcg < current.ndcg:
        return GateDecision(
            False,
            f"held-out NDCG {new.ndcg:.3f} < current {current.ndcg:.3f}",
            new,
            current,
            prior=prior,
        )
    return GateDecision(True, "ok", new, current, prior=prior)
