"""LensNet's pairwise preference loss and optimizer step (no I/O).

Loss (MegaContext §4.5 step 8, Bradley-Terry / logistic): for each pair, over the worse variant's
targeted units, mean of softplus(-sign(t) * s / τ) * |t|, where s is LensNet's signed unit score;
then the mean over pairs, so a pair weighs the same however many units it touches. Agreement is
the fraction of pairs whose targeted units' mean of s * sign(t) is positive (ties disagree, so an
untrained zero-head LensNet scores 0)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lens_serve.core.lensnet import N_FEATURES, LensNet
from trainer.examples import Example


@dataclass(frozen=True)
class Batch:
    """Variants of several examples, padded to the longest, and the pairs defined on them."""

    content: torch.Tensor  # (V, U, D) float32
    lods: torch.Tensor  # (V, U) int64
    features: torch.Tensor  # (V, U, F) float32
    valid: torch.Tensor  # (V, U) bool: real units
    prior: torch.Tensor  # (V, U) float32: the retrieval prior's scores (0 on padding)
    pair_variant: torch.Tensor  # (P,) int64: row in V of each pair's scored variant
    targets: torch.Tensor  # (P, U) float32: signed targets, 0 = no target / padding
    gaps: torch.Tensor  # (P,) float32: each pair's NLL gap, nats
    variant_index: list[tuple[int, int]]  # (example, variant) of each row in V

    @property
    def pairs(self) -> int:
        return int(self.targets.shape[0])


def collate(examples: Sequence[Example], *, all_variants: bool = False) -> Batch:
    """Batch the variants that some pair targets (or every variant, for evaluation)."""
    index: list[tuple[int, int]] = []
    row_of: dict[tuple[int, int], int] = {}
    for e, ex in enumerate(examples):
        wanted = range(len(ex.variants)) if all_variants else sorted({p.scored for p in ex.pairs})
        for v in wanted:
            row_of[(e, v)] = len(index)
            index.append((e, v))
    width = max((len(examples[e].variants[v].rows) for e, v in index), default=1)
    dim = examples[0].content.shape[1] if examples else 1
    n = len(index)
    content = torch.zeros(n, width, dim)  # (V, U, D)
    lods = torch.zeros(n, width, dtype=torch.long)  # (V, U)
    features = torch.zeros(n, width, N_FEATURES)  # (V, U, F)
    valid = torch.zeros(n, width, dtype=torch.bool)  # (V, U)
    prior = torch.zeros(n, width)  # (V, U)
    for row, (e, v) in enumerate(index):
        ex = examples[e]
        units = torch.from_numpy(ex.variants[v].rows)  # (U_v,)
        u = len(units)
        content[row, :u] = ex.content[units].float()
        lods[row, :u] = ex.lods[units]
        features[row, :u] = ex.features[units]
        prior[row, :u] = ex.prior[units]
        valid[row, :u] = True
    pair_rows: list[int] = []
    targets = []
    gaps = []
    for e, ex in enumerate(examples):
        for pair in ex.pairs:
            gaps.append(pair.gap)
            padded = np.zeros(width, dtype=np.float32)  # (U,)
            padded[: len(pair.targets)] = pair.targets
            targets.append(padded)
            pair_rows.append(row_of[(e, pair.scored)])
    return Batch(
        content=content,
        lods=lods,
        features=features,
        valid=valid,
        prior=prior,
        pair_variant=torch.tensor(pair_rows, dtype=torch.long),
        targets=torch.from_numpy(np.stack(targets)) if targets else torch.zeros(0, width),
        gaps=torch.tensor(gaps, dtype=torch.float32),
        variant_index=index,
    )


def scores(net: LensNet | None, batch: Batch) -> torch.Tensor:
    """(V, U) `lens` scores of every batched variant: the retrieval prior plus LensNet's residual
    (None: the prior alone). Padding rows are garbage; mask them."""
    if net is None:
        return batch.prior
    out: torch.Tensor = net(batch.content, batch.lods, batch.features, batch.valid) + batch.prior
    return out


_TIE = 1e-6  # margins this small are float noise of equal sides, not a preference


def preference_loss(
    unit_scores: torch.Tensor, batch: Batch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, agreement) over the batch's pairs; both scalars. unit_scores is (V, U)."""
    s = unit_scores[batch.pair_variant]  # (P, U): each pair's scored-variant scores
    sign, weight = batch.targets.sign(), batch.targets.abs()  # (P, U) each
    per_unit = F.softplus(-sign * s / temperature) * weight  # (P, U), 0 where untargeted
    loss = per_unit.sum(dim=1).mean()  # each side of a pair carries its strength once
    agreement = agrees(unit_scores, batch).float().mean()
    return loss, agreement


def agrees(unit_scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(P,) bool: does LensNet rank each pair's expand side above its collapse side?"""
    s = unit_scores[batch.pair_variant]  # (P, U)
    # (P,): mean score of the units to expand minus that of the units to collapse, times strength
    margin = (s * batch.targets).sum(dim=1)
    return margin > _TIE  # a tie (a constant score's 0) never agrees


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    agreement: float
    pairs: int
    grad_norm: float


class PreferenceTrainer:
    """AdamW on LensNet with gradient clipping. Deterministic given the seed and the batches."""

    def __init__(
        self,
        net: LensNet,
        *,
        lr: float,
        temperature: float,
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        seed: int = 0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        torch.manual_seed(seed)  # nothing here draws today; keeps future dropout reproducible
        self.net = net
        self.temperature = temperature
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.steps = 0

    def step(self, batch: Batch) -> StepMetrics:
        if batch.pairs == 0:
            raise ValueError("a training batch needs at least one pair")
        self.net.train()
        try:
            loss, agreement = preference_loss(scores(self.net, batch), batch, self.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            self.optimizer.step()
        finally:
            self.net.eval()
        self.steps += 1
        return StepMetrics(loss.item(), agreement.item(), batch.pairs, norm.item())
