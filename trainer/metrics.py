"""Every Prometheus metric the trainer exports (lens_trainer_<thing>_<unit>), and its HTTP server.
The server's metrics live in lens_serve.metrics; the two processes share no metric."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

STEPS_TOTAL = Counter("lens_trainer_steps_total", "Training steps taken")
GATE_DECISIONS_TOTAL = Counter(
    "lens_trainer_gate_decisions_total",
    "Gate decisions, by outcome: passed, refused (judged worse), unjudged (too few held-out)",
    ["outcome"],
)
RECORDS_CONSUMED_TOTAL = Counter(
    "lens_trainer_records_consumed_total",
    "Preference-stream entries stored and acknowledged, by result (usable or rejected)",
    ["result"],
)
CONSUMER_LAG_RECORDS = Gauge(
    "lens_trainer_consumer_lag_records",
    "Entries of lens:prefs the trainers group has not acknowledged (undelivered + pending)",
)
PUBLISHED_VERSIONS_TOTAL = Counter(
    "lens_trainer_published_versions_total", "LensNet versions published (lens:current switched)"
)


def serve(port: int) -> None:
    """Serve /metrics on `port` (all interfaces) from a daemon thread, for the process's life."""
    start_http_server(port)
