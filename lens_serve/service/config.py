"""Server settings: every field is also an environment variable `LENS_<FIELD>`; CLI flags override.

Bad combinations are refused at start-up with a message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lens_serve.core.gist_kinds import GIST_KINDS
from lens_serve.engine.config import EngineConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LENS_", frozen=True, extra="forbid")

    model: str = "smollm2-135m"
    """Model name (`tiny`, `smollm2-135m`, prepared by `lens-serve models prepare`) or directory."""
    models_dir: Path | None = None
    """Where prepared models live (default: ./models)."""
    host: str = "127.0.0.1"
    """Interface the gRPC server binds."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (printed in the `listening on` line)."""
    redis_url: str = ""
    """Redis for sessions, preferences and weights; empty starts a private redis-server."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Prometheus /metrics port; 0 disables the endpoint."""
    otel_endpoint: str = ""
    """OpenTelemetry collector (OTLP/gRPC, e.g. http://otel-collector:4317) to send a span per call
    to, with choose_wc, engine and shadow spans under it; empty: tracing off. The standard OTEL_*
    variables tune the exporter and sampler (docs/deployment.md, "Tracing")."""
    http_port: int = Field(0, ge=0, le=65535)
    """OpenAI-compatible HTTP port (/v1/models, /v1/completions, /v1/chat/completions) on `host`,
    beside gRPC, with the same tokens, limits and TLS; 0 disables it."""

    wc_budget: int = Field(1024, ge=2)
    """Default working-context budget in rows (requests may ask for another)."""
    max_wc_budget: int = Field(4096, ge=2)
    """Largest budget a request may ask for (bounded by the engine's max_model_len too)."""
    tail: int = Field(128, ge=0)
    """Newest tokens always shown raw; must be below every budget."""
    block_size: int = Field(32, ge=2)
    """Tokens per LOD1 gist, gists per LOD2 gist."""
    gist_kind: str = "tokens"
    """GistNet kind: tokens (training-free default), mean, transformer."""
    gist_rows: int = Field(1, ge=1)
    """Working-context rows per gist."""
    lens_seed: int = 0
    """Seed of the initial LensNet when Redis names no published version."""

    max_tokens: int = Field(256, ge=1)
    """Default completion length when a request leaves max_tokens at 0."""
    max_completion_tokens: int = Field(4096, ge=1)
    """Largest max_tokens a request may ask for."""
    max_concurrency: int = Field(32, ge=1)
    """Generate/Score calls in flight; more are refused with RESOURCE_EXHAUSTED."""
    max_session_tokens: int = Field(2_000_000, ge=1)
    """Lifetime tokens a session may hold."""
    session_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    """Sessions expire this long after their last append."""
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    """How long an idempotency key's record is kept: a retry within it writes nothing twice."""
    tree_cache_bytes: int = Field(2 << 30, ge=0)
    """In-memory budget for cached session trees (least recently used are dropped)."""
    max_message_bytes: int = Field(16 << 20, ge=1024)
    """Largest gRPC message accepted or sent."""
    drain_seconds: float = Field(30.0, ge=0)
    """On SIGTERM: how long in-flight streams may finish before they are cancelled."""
    keepalive_time_s: float = Field(60.0, gt=0)
    """The server pings an idle connection this often, to find dead peers."""
    keepalive_timeout_s: float = Field(20.0, gt=0)
    """A ping unanswered for this long closes the connection."""
    min_client_ping_interval_s: float = Field(10.0, ge=0)
    """Clients may ping (keepalive) this often, also without calls in flight; more often gets a
    GOAWAY "too_many_pings". `lens_serve.client` pings every 30 s."""
    max_connection_age_s: float = Field(300.0, gt=0)
    """Connections are closed (GOAWAY) after this long, so clients of the headless Service
    re-resolve it and spread over new pods (docs/deployment.md)."""
    max_connection_age_grace_s: float | None = Field(None, ge=0)
    """How long calls on a connection past its age may finish (a long Generate stream); None:
    drain_seconds."""
    max_append_bytes: int = Field(16 << 20, ge=1)
    """Bytes of text one Append stream may carry; the stream is refused (RESOURCE_EXHAUSTED) as
    soon as it sends more. Its tokens are bounded by max_session_tokens."""

    max_model_len: int = Field(8192, ge=16)
    """Engine context length (prompt rows + completion)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Engine dtype. auto: bfloat16 on a GPU, float32 on a CPU (measured 3.5-4.5x faster than
    bfloat16 on CPUs without bf16 matrix instructions, and exact for teacher-forced scores)."""
    kv_cache_gib: float = Field(4.0, gt=0)
    """CPU engines: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    kv_block_size: int = Field(0, ge=0)
    """Tokens per KV-cache block. 0 = auto: 32 on a CPU (the least its attention kernel takes),
    vLLM's default (16) on a GPU. The prefix cache keeps whole blocks only; vLLM's CPU default of
    128 made every session turn recompute up to 127 rows (measured: turn >= 2 TTFT 0.78 s at 128,
    0.40 s at 32; full prefills equally fast)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """GPU engines: share of GPU memory vLLM may take."""
    step_rows: int = Field(0, ge=0)
    """Most rows one engine step processes; longer prefills are chunked. 0 = vLLM's default."""
    shared_step_rows: int = Field(0, ge=0)
    """Most rows of one prefill in a step other requests share; 0 = no cap. vLLM gives running
    requests a step's rows first, so without this a user request waits for a whole shadow
    prefill. 2 CPU cores, SmolLM2-135M, 640-row shadow variants back to back (bench/priority.py,
    one run): a one-token request took p50 2.40 s with vLLM's steps, 0.47 s with 128/64, and
    shadow throughput went from 0.34 to 0.33 variants/s. Not on by default: vLLM 0.32's CPU
    engine dies when the prefill of a request with a sampling seed is chunked (its CPU random
    generator cannot rewind), and small steps chunk most prefills."""
    enforce_eager: bool = False
    """Skip torch.compile / CUDA graphs (faster start, slower decode)."""

    tls_cert: Path | None = None
    """PEM certificate chain; with tls_key enables TLS."""
    tls_key: Path | None = None
    """PEM private key for tls_cert."""
    api_tokens: str = ""
    """Comma-separated bearer tokens accepted by LensServe; empty disables auth (local use)."""
    admin_token: str = ""
    """Bearer token for LensAdmin; empty disables the admin service."""

    prewarm_next_turn: bool = True
    """After a session turn, prefill this WC + the answer at low priority while the user reads,
    so the next turn (which usually extends exactly that prefix) finds it in the prefix cache."""

    shadow_rate: float = Field(0.0, ge=0, le=1)
    """Fraction of requests that get shadow variants scored and logged."""
    shadow_target: Literal["completion", "prompt"] = "completion"
    """What shadow variants are scored on: the completion, or the prompt's last tokens held out."""
    shadow_target_tokens: int = Field(32, ge=1)
    """prompt target: how many of the prompt's last tokens are held out."""
    shadow_units: int = Field(8, ge=0)
    """Units of the served working context changed one at a time and measured per shadow job:
    half the retrieval prior's top candidates, a quarter LensNet's, the rest at random."""
    shadow_variants: int = Field(0, ge=0)
    """Random multi-edit variants of the served working context per shadow job, measured for
    comparison only (the trainer learns from the per-unit gains)."""
    shadow_guided_share: float = Field(0.5, ge=0, le=1)
    """Share of a random edit's probability drawn toward spans that match the query (0: uniform)."""
    shadow_queue: int = Field(64, ge=1)
    """Shadow jobs waiting at most; more are dropped and counted."""
    prefs_maxlen: int = Field(100_000, ge=1)
    """Approximate cap on the lens:prefs stream (XADD MAXLEN ~)."""
    lens_poll_seconds: float = Field(1.0, gt=0)
    """How often lens:current is polled besides the lens:events subscription."""
    lens_retry_seconds: float = Field(0.5, gt=0)
    """First wait before the LensNet watcher subscribes again after losing Redis; it doubles on
    each failure in a row, up to lens_retry_max_seconds."""
    lens_retry_max_seconds: float = Field(5.0, gt=0)
    """Longest wait between the LensNet watcher's attempts to reach Redis again."""
    lens_unready_seconds: float = Field(30.0, gt=0)
    """Readiness (the LensServe health name) turns NOT_SERVING once the LensNet watcher has been
    cut off from Redis this long: the replica may be running a LensNet the fleet has left. It turns
    SERVING again when the watcher is back. Liveness does not change."""
    redis_socket_timeout_s: float = Field(5.0, gt=0)
    """Longest wait for a Redis reply before the command fails (and is retried by redis-py)."""
    redis_connect_timeout_s: float = Field(5.0, gt=0)
    """Longest wait to connect to Redis."""
    redis_health_check_s: int = Field(30, ge=0)
    """A Redis connection idle this long is PINGed before use, so a dead one (a restarted server,
    a dropped TCP connection) is replaced before a command is lost on it; 0 disables."""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.tail >= self.wc_budget:
            raise ValueError(f"tail ({self.tail}) must be below wc_budget ({self.wc_budget})")
        if self.wc_budget > self.max_wc_budget:
            raise ValueError(f"wc_budget ({self.wc_budget}) exceeds max_wc_budget")
        if self.max_wc_budget >= self.max_model_len:
            raise ValueError(
                f"max_wc_budget ({self.max_wc_budget}) must leave room for completions "
                f"below max_model_len ({self.max_model_len})"
            )
        if self.gist_kind not in GIST_KINDS:
            raise ValueError(f"gist_kind must be one of {GIST_KINDS}, got {self.gist_kind!r}")
        if self.block_size % self.gist_rows:
            raise ValueError(f"gist_rows ({self.gist_rows}) must divide block_size")
        if self.lens_retry_seconds > self.lens_retry_max_seconds:
            raise ValueError("lens_retry_seconds must not exceed lens_retry_max_seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    def engine_dtype(self) -> Literal["bfloat16", "float16", "float32"]:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if _on_gpu() else "float32"

    def engine_kv_block_size(self) -> int | None:
        if self.kv_block_size:
            return self.kv_block_size
        return None if _on_gpu() else 32

    def engine_config(self, model_dir: Path) -> EngineConfig:
        """How to start vLLM on the prepared model in `model_dir` with these settings."""
        return EngineConfig(
            model=str(model_dir),
            dtype=self.engine_dtype(),
            max_model_len=self.max_model_len,
            kv_cache_gib=self.kv_cache_gib,
            kv_block_size=self.engine_kv_block_size(),
            enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_batched_tokens=self.step_rows or None,
            long_prefill_tokens=self.shared_step_rows or None,
        )

    @property
    def tokens(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.api_tokens.split(",") if t.strip())

    def non_defaults(self) -> dict[str, object]:
        """Fields that differ from their defaults (logged once at start-up; secrets masked)."""
        out: dict[str, object] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value != info.default:
                out[name] = "***" if name in ("api_tokens", "admin_token") else value
        return out


def _on_gpu() -> bool:
    """What the `auto` settings depend on."""
    import torch  # deferred: only the server needs it

    return bool(torch.cuda.is_available())
