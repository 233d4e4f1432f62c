"""Every Prometheus metric lens-serve exports, and nothing else (lens_<area>_<thing>_<unit>)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Calls carry go-grpc-prometheus's labels: grpc_service and grpc_method (the two parts of the path
# /lens_serve.v1.LensServe/Generate) and grpc_code (a status name: INVALID_ARGUMENT). Calls to the
# OpenAI-compatible endpoint have grpc_service="http", grpc_method="POST /v1/chat/completions".
RPC_STARTED_TOTAL = Counter(
    "lens_rpc_started_total",
    "RPCs started (the denominator of error rates: it counts streams still running, too)",
    ["grpc_service", "grpc_method"],
)
RPC_LATENCY_SECONDS = Histogram(
    "lens_rpc_latency_seconds",
    "Wall time of an RPC, by method",
    ["grpc_service", "grpc_method"],
    buckets=_LATENCY_BUCKETS,
)
RPC_ERRORS_TOTAL = Counter(
    "lens_rpc_errors_total",
    "RPCs that ended in an error, by method and status code",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPCS_IN_FLIGHT = Gauge("lens_rpcs_in_flight", "Generate and Score calls running now")
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "lens_generate_time_to_first_token_seconds",
    "From request arrival to the first streamed token",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN_SECONDS = Histogram(
    "lens_generate_time_per_output_token_seconds",
    "Per request: (last token - first token) / (generated tokens - 1)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1),
)
PROMPT_TOKENS_TOTAL = Counter(
    "lens_prompt_tokens_total", "Prompt tokens of Generate requests (appended to the session)"
)
GENERATION_TOKENS_TOTAL = Counter("lens_generation_tokens_total", "Tokens generated")
BUILD_INFO = Gauge(
    "lens_build_info",
    "This server's version, served model and Python version (value 1)",
    ["version", "model", "python"],
)
WC_CHOICE_SECONDS = Histogram(
    "lens_wc_choice_seconds",
    "Time to choose a working context, by policy",
    ["policy"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
WC_ROWS = Histogram(
    "lens_wc_rows",
    "Working-context rows per request",
    buckets=(64, 128, 256, 512, 1024, 2048, 4096),
)
WC_COMPRESSION_RATIO = Histogram(
    "lens_wc_compression_ratio",
    "Lifetime tokens covered per working-context row",
    buckets=(1, 1.5, 2, 4, 8, 16, 32, 64, 256, 1024),
)
WC_CACHED_ROWS_TOTAL = Counter(
    "lens_wc_cached_rows_total", "Working-context rows the engine served from its prefix cache"
)
PREWARMED_ROWS_TOTAL = Counter(
    "lens_prewarmed_rows_total",
    "Rows prefilled in the background for a session's next turn (this WC + the answer)",
)
WC_PROMPT_ROWS_TOTAL = Counter(
    "lens_wc_prompt_rows_total", "Working-context rows sent to the engine"
)
LENS_VERSION_INFO = Gauge(
    "lens_lensnet_version_info", "The LensNet version this server runs (value 1)", ["version"]
)
LENS_SWAP_FAILURES_TOTAL = Counter(
    "lens_lensnet_swap_failures_total", "LensNet versions rejected (checksum, config or load)"
)
LENS_WATCHER_FAILURES_TOTAL = Counter(
    "lens_lensnet_watcher_failures_total",
    "Times the LensNet watcher lost Redis (or failed otherwise) and had to subscribe again",
)
TREE_CACHE_BYTES = Gauge("lens_tree_cache_bytes", "Memory held by cached session trees")
SESSION_RESYNCS_TOTAL = Counter(
    "lens_session_resyncs_total",
    "Cached session trees rebuilt because the Redis token log no longer agreed with them",
)
SHADOW_JOBS_DROPPED_TOTAL = Counter(
    "lens_shadow_jobs_dropped_total", "Shadow-scoring jobs dropped, by reason", ["reason"]
)
