"""The evaluation gate: is a new LensNet at least as good as the current one on held-out records?

Two measurements on the held-out slice (every k-th record by a hash of its stream id, so the split
is the same on every trainer and every restart):
- agreement: the fraction of preference pairs whose targeted units LensNet scores the right way.
  The gate uses the *decisive* pairs, those whose NLLs differ by at least `DECISIVE_GAP`: most
  needle records' variants differ by hundredths of a nat, from edits far from anything the target
  depends on, and such near-ties are coin flips no feature predicts. Reported beside it: the
  agreement over all pairs, and weighted by each pair's strength (the share of the NLL at stake
  LensNet orders right);
- correlation: within each record, the Pearson correlation across its variants between LensNet's
  verdict on the variant's edits of the served WC (mean score of the served units the variant
  shows finer minus mean score of those it shows coarser) and the NLL the edits gained; then the
  mean over records. It must be positive: higher scores where expanding helped. MegaContext's
  scores ended up anti-correlated with the loss gap; this is the check that would have caught it.
  It is a polarity check, not a quality measure (that is agreement). Each record gets one vote:
  pooled over records, one needle record whose lucky variant gained 2 nats outweighed fifteen
  whose gains were hundredths, and loop run 4's gate refused 61 of 62 versions whose decisive
  agreement was 0.61-0.89 (the mean per record was positive on the same records).
Scores are `lens`'s: the retrieval prior plus LensNet's residual. A new version passes if there
are at least `min_held_out` held-out records, decisive agreement(new) >= decisive agreement of
both the current version and the prior alone (a residual must not make retrieval worse), and
correlation(new) > 0."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lens_serve.core.lensnet import LensNet
from trainer.examples import Example
from trainer.train import agrees, collate, preference_loss, scores

# Examples per LensNet forward: bounds the padded (V, U, D) batch's memory.
_EVAL_CHUNK = 32
DECISIVE_GAP = 0.05
"""nats: a pair whose mean NLLs differ by less is a near-tie (see the module docstring)."""


def is_held_out(entry_id: str, every: int) -> bool:
    """Deterministic 1-in-`every` split by stream id (independent of arrival order)."""
    digest = hashlib.sha256(entry_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


@dataclass(frozen=True)
class GateReport:
    decisive_agreement: float  # over pairs whose NLL gap is >= DECISIVE_GAP; what the gate uses
    decisive_pairs: int
    agreement: float  # over all pairs
    weighted_agreement: float  # pairs weighted by strength: the share of the NLL at stake
    correlation: float  # mean over records of the within-record score/NLL-gain correlation
    loss: float
    pairs: int
    edits: int
    records: int
    served_vs_recency: float  # mean nll(recency) - nll(served), nats; nan if no such record

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    new: GateReport
    current: GateReport
    judged: bool = True
    """False when the held-out slice was still too small to judge the new weights' quality."""


@torch.inference_mode()
def evaluate(net: LensNet | None, examples: Sequence[Example], temperature: float) -> GateReport:
    """`net`'s report on `examples`; None measures the retrieval prior alone."""
    if net is not None:
        net.eval()
    agree_sum = loss_sum = weighted_sum = strength_sum = decisive_sum = 0.0
    pairs = decisive_pairs = 0
    per_record: list[tuple[np.ndarray, np.ndarray]] = []  # (verdicts, gains) of each record
    for start in range(0, len(examples), _EVAL_CHUNK):
        chunk = examples[start : start + _EVAL_CHUNK]
        batch = collate(chunk, all_variants=True)
        if not batch.variant_index:
            continue
        s = scores(net, batch)  # (V, U)
        if batch.pairs:
            loss, _ = preference_loss(s, batch, temperature)
            strength = batch.targets.abs().sum(dim=1)  # (P,) the pair's normalised NLL gap, x2
            agreed = agrees(s, batch)  # (P,)
            weighted_sum += float((agreed * strength).sum())
            decisive = batch.gaps >= DECISIVE_GAP  # (P,)
            decisive_sum += float(agreed[decisive].sum())
            decisive_pairs += int(decisive.sum())
            strength_sum += float(strength.sum())
            agree_sum += float(agreed.sum())
            loss_sum += float(loss) * batch.pairs
            pairs += batch.pairs
        row = {key: r for r, key in enumerate(batch.variant_index)}
        for e, ex in enumerate(chunk):
            if len(ex.edits) < 2:
                continue  # nothing to compare within this record
            ref = s[row[(e, ex.reference)]].numpy()  # (U,) padded
            # LensNet's net vote for the variant's edits: mean score of what it expands minus
            # mean score of what it collapses, as the allocator weighs an expand against a collapse.
            verdict = np.array([ref[: len(edit.weights)] @ edit.weights for edit in ex.edits])
            gain = np.array([edit.gain for edit in ex.edits])  # (E,)
            per_record.append((verdict, gain))
    gaps = [
        ex.baselines["recency"] - ex.variants[ex.reference].nll
        for ex in examples
        if "recency" in ex.baselines
    ]
    return GateReport(
        decisive_agreement=decisive_sum / decisive_pairs if decisive_pairs else 0.0,
        decisive_pairs=decisive_pairs,
        agreement=agree_sum / pairs if pairs else 0.0,
        weighted_agreement=weighted_sum / strength_sum if strength_sum else 0.0,
        correlation=mean_within_record_correlation(per_record),
        loss=loss_sum / pairs if pairs else math.nan,
        pairs=pairs,
        edits=sum(len(gain) for _, gain in per_record),
        records=len(examples),
        served_vs_recency=float(np.mean(gaps)) if gaps else math.nan,
    )


def mean_within_record_correlation(records: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over records of pearson(verdicts, gains): one vote per record, whatever its scale."""
    if not records:
        return 0.0
    return float(np.mean([pearson(verdict.tolist(), gain.tolist()) for verdict, gain in records]))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 when undefined (fewer than 2 points or a constant side)."""
    if len(x) < 2:
        return 0.0
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 1e-12 else 0.0


def decide(
    new: GateReport, current: GateReport, prior: GateReport, min_records: int = 1
) -> GateDecision:
    if new.decisive_pairs == 0:
        return GateDecision(
            False, "no decisive held-out preference pairs yet", new, current, judged=False
        )
    if new.records < min_records:
        return GateDecision(
            False,
            f"{new.records} held-out records, the gate needs {min_records}",
            new,
            current,
            judged=False,
        )
    if new.correlation <= 0:
        return GateDecision(
            False,
            f"score/NLL-gain correlation {new.correlation:.3f} is not positive",
            new,
            current,
        )
    if new.decisive_agreement < prior.decisive_agreement:
        return GateDecision(
            False,
            f"held-out decisive agreement {new.decisive_agreement:.3f} < the prior's "
            f"{prior.decisive_agreement:.3f}",
            new,
            current,
        )
    if new.decisive_agreement < current.decisive_agreement:
        return GateDecision(
            False,
            f"held-out decisive agreement {new.decisive_agreement:.3f} < current "
            f"{current.decisive_agreement:.3f}",
            new,
            current,
        )
    return GateDecision(True, "ok", new, current)
