"""LensNet's loss on per-unit values, and the optimizer step (no I/O).

Per labelled record, with s the `lens` scores (retrieval prior + residual) of its measured units
and t their values (trainer.examples):
- listwise (ListNet): the cross-entropy between softmax(t / τ_t) (τ_t the record's scale:
  advantage normalisation) and log_softmax(s / temperature). It weighs units by how much they
  are worth: the needle's unit far above the rest;
- pairwise (logistic), times `pair_weight`: the mean of softplus(-(s_a - s_b) / temperature) over
  the unit pairs with t_a - t_b >= `pair_gap`. Every decisive pair counts the same, so the small
  but consistent differences (a collapse that frees rows, an expand that costs some) are ranked
  too: with τ_t set by the needle they are near-ties for the listwise term;
- sign (logistic), times `sign_weight`: the mean of softplus(-sign(t) s / temperature) over the
  units with |t| >= `pair_gap`. The first two terms teach only the order of a record's units
  (adding a constant to its scores changes neither), but the allocator acts on the level too: it
  expands a unit only above `FocusConfig.expand_threshold`, and a negative score is what allows a
  collapse. This term puts units worth showing finer above 0 and the others below;
- residual (squared), times `residual_weight`: the mean of (s - prior)^2 over the record's units
  it did not measure. A record measures 8 of its 100-250 units; the other terms leave the rest
  free, and they are most of what the allocator ranks. Without it the residual drifts up
  everywhere (the sign term's easiest way to lift the few needles) and reorders the units no
  record spoke for.
The record losses are averaged, so a record weighs the same however many units it measured.
docs/experiments.md has what each term measurably adds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lens_serve.core.lensnet import N_FEATURES, LensNet
from trainer.examples import Example

_MASKED = -1e9  # logit of a padding entry: exp() of it is 0, and unlike -inf it never makes NaN


@dataclass(frozen=True)
class Batch:
    """Records padded to the longest tiling, and their measured units padded to the most."""

    content: torch.Tensor  # (B, U, D) float32
    lods: torch.Tensor  # (B, U) int64
    features: torch.Tensor  # (B, U, F) float32
    valid: torch.Tensor  # (B, U) bool: real units
    prior: torch.Tensor  # (B, U) float32: the retrieval prior's scores (0 on padding)
    measured: torch.Tensor  # (B, M) int64: positions in U of the measured units (0 on padding)
    measured_valid: torch.Tensor  # (B, M) bool
    value: torch.Tensor  # (B, M) float32: the measured units' values (0 on padding)
    scale: torch.Tensor  # (B,) float32: each record's τ_t
    labelled: torch.Tensor  # (B,) bool: records the loss ranks

    @property
    def records(self) -> int:
        return int(self.valid.shape[0])

    @property
    def labelled_records(self) -> int:
        return int(self.labelled.sum())


def collate(examples: Sequence[Example]) -> Batch:
    n = len(examples)
    width = max((len(ex.lods) for ex in examples), default=1)
    most = max((len(ex.measured) for ex in examples), default=1)
    dim = examples[0].content.shape[1] if examples else 1
    content = torch.zeros(n, width, dim)  # (B, U, D)
    lods = torch.zeros(n, width, dtype=torch.long)  # (B, U)
    features = torch.zeros(n, width, N_FEATURES)  # (B, U, F)
    valid = torch.zeros(n, width, dtype=torch.bool)  # (B, U)
    prior = torch.zeros(n, width)  # (B, U)
    measured = torch.zeros(n, most, dtype=torch.long)  # (B, M)
    measured_valid = torch.zeros(n, most, dtype=torch.bool)  # (B, M)
    value = torch.zeros(n, most)  # (B, M)
    for row, ex in enumerate(examples):
        u, m = len(ex.lods), len(ex.measured)
        content[row, :u] = ex.content.float()
        lods[row, :u] = ex.lods
        features[row, :u] = ex.features
        prior[row, :u] = ex.prior
        valid[row, :u] = True
        measured[row, :m] = torch.from_numpy(ex.measured)
        measured_valid[row, :m] = True
        value[row, :m] = torch.from_numpy(ex.value)
    return Batch(
        content=content,
        lods=lods,
        features=features,
        valid=valid,
        prior=prior,
        measured=measured,
        measured_valid=measured_valid,
        value=value,
        scale=torch.tensor([ex.scale for ex in examples], dtype=torch.float32),
        labelled=torch.tensor([ex.labelled for ex in examples], dtype=torch.bool),
    )


def scores(net: LensNet | None, batch: Batch) -> torch.Tensor:
    """(B, U) `lens` scores of every unit: the retrieval prior plus LensNet's residual (None: the
    prior alone). Padding entries are garbage; mask them."""
    if net is None:
        return batch.prior
    out: torch.Tensor = net(batch.content, batch.lods, batch.features, batch.valid) + batch.prior
    return out


def measured_scores(unit_scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, M) the scores of each record's measured units, from (B, U) unit scores."""
    return unit_scores.gather(1, batch.measured)


def listwise_losses(unit_scores: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """(B,) ListNet cross-entropy of every record (meaningful where batch.labelled)."""
    mask = batch.measured_valid  # (B, M)
    target = F.softmax((batch.value / batch.scale[:, None]).masked_fill(~mask, _MASKED), dim=1)
    logits = (measured_scores(unit_scores, batch) / temperature).masked_fill(~mask, _MASKED)
    log_q = F.log_softmax(logits, dim=1)  # (B, M)
    return -(target * log_q).masked_fill(~mask, 0.0).sum(dim=1)


def pairwise_losses(
    unit_scores: torch.Tensor, batch: Batch, temperature: float, gap: float
) -> torch.Tensor:
    """(B,) mean logistic loss over each record's unit pairs whose values differ by >= gap (0 for
    a record without one)."""
    s = measured_scores(unit_scores, batch) / temperature  # (B, M)
    dt = batch.value[:, :, None] - batch.value[:, None, :]  # (B, M, M): row unit worth more
    both = batch.measured_valid[:, :, None] & batch.measured_valid[:, None, :]  # (B, M, M)
    decisive = (both & (dt >= gap)).float()  # (B, M, M)
    per_pair = F.softplus(s[:, None, :] - s[:, :, None])  # (B, M, M): -(s_row - s_col)
    return (per_pair * decisive).sum(dim=(1, 2)) / decisive.sum(dim=(1, 2)).clamp(min=1.0)


def sign_losses(
    unit_scores: torch.Tensor, batch: Batch, temperature: float, gap: float
) -> torch.Tensor:
    """(B,) mean logistic loss of each record's units with |t| >= gap on the sign of t (0 for a
    record without one)."""
    s = measured_scores(unit_scores, batch) / temperature  # (B, M)
    decisive = (batch.measured_valid & (batch.value.abs() >= gap)).float()  # (B, M)
    per_unit = F.softplus(-batch.value.sign() * s)  # (B, M)
    return (per_unit * decisive).sum(dim=1) / decisive.sum(dim=1).clamp(min=1.0)


def unmeasured(batch: Batch) -> torch.Tensor:
    """(B, U) bool: the real units of each record that no gain was measured for."""
    # Padding points at unit 0 with weight 0, so summing (not assigning) keeps a measured unit 0.
    hits = torch.zeros(batch.valid.shape).scatter_add(
        1, batch.measured, batch.measured_valid.float()
    )
    return batch.valid & (hits == 0)  # (B, U)


def residual_losses(unit_scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) mean squared residual (`lens` score - prior) over each record's unmeasured units."""
    free = unmeasured(batch)  # (B, U)
    residual = (unit_scores - batch.prior).masked_fill(~free, 0.0)  # (B, U)
    return residual.square().sum(dim=1) / free.sum(dim=1).clamp(min=1)


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 1.0
    """Scores are divided by it in both terms."""
    pair_weight: float = 1.0
    """Weight of the pairwise term (0: listwise only)."""
    pair_gap: float = 0.05
    """nats: unit pairs whose values differ by less, and units worth less either way, are
    near-ties the pairwise and sign terms ignore."""
    sign_weight: float = 1.0
    """Weight of the sign term (0: order only, the scores' level is left free)."""
    residual_weight: float = 0.1
    """Weight of the residual term (0: the residual is free where no unit was measured)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        weights = (self.pair_weight, self.pair_gap, self.sign_weight, self.residual_weight)
        if min(weights) < 0:
            raise ValueError("pair_weight, pair_gap, sign_weight and residual_weight must be >= 0")


def record_losses(unit_scores: torch.Tensor, batch: Batch, config: LossConfig) -> torch.Tensor:
    """(B,) each record's loss (meaningful where batch.labelled). unit_scores: (B, U)."""
    out = listwise_losses(unit_scores, batch, config.temperature)
    if config.pair_weight > 0:
        pairs = pairwise_losses(unit_scores, batch, config.temperature, config.pair_gap)
        out = out + config.pair_weight * pairs
    if config.sign_weight > 0:
        signs = sign_losses(unit_scores, batch, config.temperature, config.pair_gap)
        out = out + config.sign_weight * signs
    if config.residual_weight > 0:
        out = out + config.residual_weight * residual_losses(unit_scores, batch)
    return out


def loss(unit_scores: torch.Tensor, batch: Batch, config: LossConfig) -> torch.Tensor:
    """Scalar: the mean loss over the batch's labelled records."""
    return record_losses(unit_scores, batch, config)[batch.labelled].mean()


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    records: int  # labelled records the step ranked
    grad_norm: float


class PreferenceTrainer:
    """AdamW on LensNet with gradient clipping. Deterministic given the seed and the batches."""

    def __init__(
        self,
        net: LensNet,
        *,
        lr: float,
        loss: LossConfig | None = None,
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)  # nothing here draws today; keeps future dropout reproducible
        self.net = net
        self.loss = loss or LossConfig()
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.steps = 0

    def step(self, batch: Batch) -> StepMetrics:
        if batch.labelled_records == 0:
            raise ValueError("a training batch needs at least one labelled record")
        self.net.train()
        try:
            value = loss(scores(self.net, batch), batch, self.loss)
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()  # type: ignore[no-untyped-call]
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            self.optimizer.step()
        finally:
            self.net.eval()
        self.steps += 1
        return StepMetrics(value.item(), batch.labelled_records, norm.item())
