"""Trainer settings: every field is also an environment variable `LENS_TRAINER_<FIELD>`; CLI flags
override. Bad combinations are refused at start-up with a message naming the field."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.examples import TargetConfig
from trainer.train import LossConfig


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LENS_TRAINER_", frozen=True, extra="forbid")

    redis_url: str = ""
    """Redis holding `lens:prefs` and the published weights; required unless offline_dump is set
    (then it is optional and only used to publish)."""
    model: str = "smollm2-135m"
    """Base model name or directory: its embedding table feeds LensNet, as on the server."""
    models_dir: Path | None = None
    """Where prepared models live (default: $LENS_MODELS_DIR, else ./models)."""
    min_records: int = Field(default=64, ge=1)
    """Usable records to hold before the first training step."""
    steps_per_version: int = Field(default=200, ge=1)
    """Gate (and publish if it passes) every this many steps, never more often."""
    batch_size: int = Field(default=16, ge=1)
    """Records per training step (each brings its served tiling and measured units)."""
    lr: float = Field(default=3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient-norm clip."""
    temperature: float = Field(default=1.0, gt=0)
    """τ of the loss: `lens` scores are divided by it (trainer.train)."""
    pair_weight: float = Field(default=1.0, ge=0)
    """Weight of the pairwise term beside the listwise one (0: listwise only); see trainer.train
    for what it measurably adds."""
    pair_gap: float = Field(default=0.05, ge=0)
    """nats: unit pairs whose values differ by less, and units worth less either way, are ignored
    by the pairwise and sign terms."""
    sign_weight: float = Field(default=1.0, ge=0)
    """Weight of the sign term: scores above 0 where showing a unit finer helped, below where it
    hurt (the allocator acts on the level, not only the order); see trainer.train."""
    residual_weight: float = Field(default=0.1, ge=0)
    """Weight of the residual term: LensNet's residual stays near 0 (`lens` = the prior) on the
    units no measurement speaks for; see trainer.train."""
    seed: int = 0
    """Seed of the initial LensNet (when Redis names no current version) and of batch sampling."""
    claim_idle_ms: int = Field(default=60_000, ge=0)
    """Pending stream entries idle this long were left by a dead consumer and are claimed."""
    lock_ttl_ms: int = Field(default=30_000, ge=100)
    """Lease of `lens:trainer:lock`; renewed every third of it while the trainer runs."""
    held_out_every: int = Field(default=10, ge=2)
    """One record in this many (by stream-id hash) is held out for the gate, never trained on."""
    min_held_out: int = Field(default=4, ge=1)
    """Held-out records with decisive per-unit gains the gate needs before it may publish: on one
    or two records NDCG is a coin flip (a loop bench run published on one)."""
    max_drift: float = Field(default=1.0, gt=0)
    """The gate refuses weights whose mean |residual| on the held-out units no gain was measured
    for exceeds this (trainer.gate: drift; the prior scores its best block 1)."""
    restart_after_refusals: int = Field(default=3, ge=0)
    """After this many gates in a row refuse the trained weights on their held-out quality,
    training restarts from the current published weights with a fresh optimizer (0: never).
    Records arrive a few a minute and the trainer runs thousands of steps on them: in loop run 5
    held-out decisive agreement peaked at 0.78 (step 700) and drifted to 0.52-0.68 over the next
    5000 steps, all refused (pairwise targets, before per-unit gains). A restart is early stopping
    that keeps learning from newer records."""
    replay_size: int = Field(default=2000, ge=1)
    """Records kept in the replay buffer (and the durable `lens:trainer:replay` list)."""
    read_count: int = Field(default=64, ge=1)
    """Stream entries read per round trip."""
    max_steps: int = Field(default=0, ge=0)
    """Stop after this many steps (0: run until stopped; offline: one version's worth)."""
    offline_dump: Path | None = None
    """Train from this `lens-trainer dump` file instead of the stream."""
    log_every_s: float = Field(default=30.0, gt=0)
    """Seconds between progress lines."""
    min_nll_std: float = Field(default=0.25, gt=0)
    """Advantage normalisation floor (nats) of the spread of a record's per-unit values. A record
    whose units' gains differ by hundredths of a nat (none touched what the target depends on)
    teaches that much more weakly than one where a unit showed the answer (a gain of nats); with
    pairwise targets and a floor at the noise level (0.05) the many noise records outweighed the
    few informative ones."""
    min_gap: float = Field(default=1e-3, ge=0)
    """Records whose per-unit values spread less (nats) carry no label and are not trained on."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Serve Prometheus /metrics on this port (0: off)."""

    @model_validator(mode="after")
    def _check(self) -> TrainerSettings:
        if not self.redis_url and self.offline_dump is None:
            raise ValueError("redis_url: required unless offline_dump is set")
        if self.offline_dump is not None and not self.offline_dump.is_file():
            raise ValueError(f"offline_dump: {self.offline_dump} is not a file")
        return self

    @property
    def targets(self) -> TargetConfig:
        return TargetConfig(min_std=self.min_nll_std, min_gap=self.min_gap)

    @property
    def loss(self) -> LossConfig:
        return LossConfig(
            self.temperature,
            self.pair_weight,
            self.pair_gap,
            self.sign_weight,
            self.residual_weight,
        )

    def non_defaults(self) -> dict[str, object]:
        """Fields that differ from their defaults (logged once at start-up)."""
        return {
            name: getattr(self, name)
            for name, info in type(self).model_fields.items()
            if getattr(self, name) != info.default
        }
