"""Every Prometheus series infermesh exports, in one place, and the small HTTP server
that exposes them (`/metrics`, plus `/healthz` and `/readyz` for processes that have no
gRPC health service of their own).

Names follow `infermesh_<area>_<what>_<unit>` (counters gain `_total` on export). Label
values are bounded: method names, status codes, model names and versions, labels of a
model, topic names, partition numbers, dead-letter reasons; never ids or text.
Each process registers the same families but only moves those of its own area.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# Every gRPC server (shared/grpc_server.py).
GRPC_REQUESTS = Counter(
    "infermesh_grpc_server_requests", "gRPC calls handled, by method and status code", ["method", "code"]
)
GRPC_DURATION = Histogram(
    "infermesh_grpc_server_duration_seconds", "gRPC call handling time", ["method"], buckets=LATENCY_BUCKETS
)
GRPC_IN_FLIGHT = Gauge("infermesh_grpc_server_in_flight_requests", "gRPC calls being handled now")

# The gateway's HTTP side (gateway/app.py); `route` is the route template, never the raw path.
HTTP_REQUESTS = Counter(
    "infermesh_http_server_requests", "HTTP requests, by method, route and status", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "infermesh_http_server_duration_seconds", "HTTP request handling time", ["method", "route"], buckets=LATENCY_BUCKETS
)

# Tokenizer.
TOKENIZER_TEXTS = Counter("infermesh_tokenizer_texts", "Texts tokenized")
TOKENIZER_TOKENS = Counter("infermesh_tokenizer_tokens", "Tokens produced (before chunking)")
TOKENIZER_CHUNKS = Counter("infermesh_tokenizer_chunks", "Model-sized chunks produced")
TOKENIZER_TRUNCATED = Counter("infermesh_tokenizer_truncated_texts", "Texts cut to the model's length")

# Routing by language (shared.routing, applied by the pipeline client in the gateway and worker).
UNSUPPORTED_LANGUAGE_TEXTS = Counter(
    "infermesh_unsupported_language_texts",
    "Texts no served model can read, answered `unsupported_language`, by detected language and reason"
    " (no_model: none routed for the language; unknown_tokens: over the unknown-token limit)",
    ["language", "reason"],
)

# Inference.
INFERENCE_QUEUE_DEPTH = Gauge(
    "infermesh_inference_queue_depth_sequences", "Sequences waiting for a batch", ["model", "version"]
)
INFERENCE_QUEUE_WAIT = Histogram(
    "infermesh_inference_queue_wait_seconds",
    "Time a sequence waited before its batch started",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_BATCH_SIZE = Histogram(
    "infermesh_inference_batch_size_sequences",
    "Sequences per executed batch",
    ["model", "version"],
    buckets=COUNT_BUCKETS,
)
INFERENCE_BATCH_TOKENS = Histogram(
    "infermesh_inference_batch_tokens",
    "Padded tokens per executed batch (sequences x longest)",
    ["model", "version"],
    buckets=TOKEN_BUCKETS,
)
INFERENCE_REJECTED = Counter(
    "infermesh_inference_rejected_sequences", "Sequences refused because the queue was full", ["model", "version"]
)
INFERENCE_EXECUTION = Histogram(
    "infermesh_inference_model_execution_seconds",
    "Backend time per batch",
    ["model", "version", "backend"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SEQUENCES = Counter("infermesh_inference_sequences", "Sequences scored", ["model", "version"])
INFERENCE_ROUTED = Counter(
    "infermesh_inference_routed_requests",
    "Requests by the version that answered and why: pinned, serving or canary (the rollout rule)",
    ["model", "version", "route"],
)
INFERENCE_SHADOW = Counter(
    "infermesh_inference_shadow_sequences",
    "Sequences a shadow candidate also scored, by whether its label agreed with the serving version's",
    ["model", "candidate", "outcome"],
)

# Post-processor.
POSTPROCESS_DOCUMENTS = Counter(
    "infermesh_postprocess_documents", "Documents labelled, by model and label", ["model", "version", "label"]
)

# Explainer.
EXPLAINER_EXPLANATIONS = Counter("infermesh_explainer_explanations", "Texts explained", ["method"])
EXPLAINER_DURATION = Histogram(
    "infermesh_explainer_duration_seconds", "Time per Explain call", ["method"], buckets=LATENCY_BUCKETS
)
EXPLAINER_QUEUE_DEPTH = Gauge("infermesh_explainer_queue_depth_requests", "Explain calls waiting for a turn")
EXPLAINER_RUNNING = Gauge("infermesh_explainer_running_requests", "Explain calls being worked on")
EXPLAINER_REJECTED = Counter(
    "infermesh_explainer_rejected_requests",
    "Explain calls refused before any work: queue_full, over_budget (a size or cost limit), "
    "expired (the deadline passed before their turn), cancelled (the caller left while waiting)",
    ["reason"],
)
EXPLAINER_ABANDONED = Counter(
    "infermesh_explainer_abandoned_requests",
    "Explain calls stopped part-way: deadline (it ran out), cancelled (the caller went away)",
    ["reason"],
)
#: Every reason either counter is incremented with, each exported at 0 from the start, so
#: rate() and alerts see the series before the first refusal or abandonment.
EXPLAINER_REJECTED_REASONS = ("queue_full", "over_budget", "expired", "cancelled")
EXPLAINER_ABANDONED_REASONS = ("deadline", "cancelled")
for _reason in EXPLAINER_REJECTED_REASONS:
    EXPLAINER_REJECTED.labels(_reason)
for _reason in EXPLAINER_ABANDONED_REASONS:
    EXPLAINER_ABANDONED.labels(_reason)

# The pipeline client's shared rounds (gateway and worker processes).
PIPELINE_QUEUE_DEPTH = Gauge("infermesh_pipeline_queue_depth_calls", "Classify calls waiting for a shared round")
PIPELINE_QUEUE_WAIT = Histogram(
    "infermesh_pipeline_queue_wait_seconds", "Time a classify call waited for its round", buckets=LATENCY_BUCKETS
)
PIPELINE_ROUND_CALLS = Histogram(
    "infermesh_pipeline_round_size_calls", "Classify calls merged into one round", buckets=COUNT_BUCKETS
)
PIPELINE_ROUND_TEXTS = Histogram("infermesh_pipeline_round_texts", "Texts per shared round", buckets=COUNT_BUCKETS)
PIPELINE_REJECTED = Counter("infermesh_pipeline_rejected_calls", "Classify calls refused: round queue full")

# Kafka clients (worker; the gateway's dashboard feed only consumes).
KAFKA_CONSUMED = Counter("infermesh_kafka_consumed_records", "Records consumed", ["topic"])
KAFKA_PRODUCED = Counter("infermesh_kafka_produced_records", "Records sent to the broker", ["topic"])
KAFKA_LAG = Gauge(
    "infermesh_kafka_consumer_lag_records",
    "Records between a group's position and the partition's end",
    ["group", "topic", "partition"],
)

# The sentiment monitor worker.
WORKER_DEAD_LETTERED = Counter(
    "infermesh_worker_dead_lettered_records", "Records sent to the dead-letter topic", ["reason"]
)
WORKER_BATCH_DURATION = Histogram(
    "infermesh_worker_batch_duration_seconds", "Poll-to-commit time per batch", ["stage"], buckets=LATENCY_BUCKETS
)
WORKER_RETRIES = Counter("infermesh_worker_retries", "Scoring retries after transient failures")
WORKER_CLIENT_RESETS = Counter(
    "infermesh_worker_kafka_client_resets", "Times a stage recreated its Kafka clients after they failed", ["stage"]
)
WORKER_WINDOWS_CLOSED = Counter("infermesh_worker_windows_closed", "Ticker windows closed and emitted")
WORKER_ALERTS = Counter("infermesh_worker_alerts", "Negative-sentiment alerts raised")
WORKER_IDLE_CLOSED_WINDOWS = Counter(
    "infermesh_worker_idle_closed_windows",
    "Windows closed because their partition went quiet (watermark moved on by the clock); "
    "also counted in infermesh_worker_windows_closed",
)
WORKER_DROPPED_ITEMS = Counter(
    "infermesh_worker_dropped_items",
    "Scored items the windowing stage left out of every window: late (their window had closed), "
    "future (stamped further ahead of the worker's clock than the skew allowance) or emitted "
    "(their window was already emitted, e.g. read again after a rebalance)",
    ["reason"],
)
for _reason in ("late", "future", "emitted"):  # exported at 0 from the start, so rate() and alerts see them
    WORKER_DROPPED_ITEMS.labels(_reason)
WORKER_INTERNAL_DEAD_LETTERED = Counter(
    "infermesh_worker_internal_dead_lettered_records",
    "Unreadable records of the monitor's own topics (scored items, windows, alerts) sent to the "
    "dead-letter topic; also counted in infermesh_worker_dead_lettered_records by reason",
    ["topic"],
)


@dataclass(frozen=True)
class BatcherMetrics:
    """The series one `DynamicBatcher` moves (label values already bound)."""

    queue_depth: Gauge
    queue_wait: Histogram
    batch_size: Histogram
    batch_cost: Histogram
    rejected: Counter


def inference_batcher_metrics(model: str, version: str) -> BatcherMetrics:
    return BatcherMetrics(
        INFERENCE_QUEUE_DEPTH.labels(model, version),
        INFERENCE_QUEUE_WAIT.labels(model, version),
        INFERENCE_BATCH_SIZE.labels(model, version),
        INFERENCE_BATCH_TOKENS.labels(model, version),
        INFERENCE_REJECTED.labels(model, version),
    )


PIPELINE_BATCHER_METRICS = BatcherMetrics(
    PIPELINE_QUEUE_DEPTH, PIPELINE_QUEUE_WAIT, PIPELINE_ROUND_CALLS, PIPELINE_ROUND_TEXTS, PIPELINE_REJECTED
)

#: A readiness check: (ready, human-readable reason).
Readiness = Callable[[], tuple[bool, str]]


class MetricsServer:
    """`/metrics` for Prometheus; `/healthz` (alive) and `/readyz` (the readiness check)
    for probes. Runs in a daemon thread so a blocked event loop still answers scrapes."""

    def __init__(self, host: str, port: int, readiness: Readiness | None = None) -> None:
        check = readiness or (lambda: (True, "ready"))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
                elif path == "/healthz":
                    self._reply(200, "text/plain; charset=utf-8", b"ok\n")
                elif path == "/readyz":
                    ready, reason = check()
                    self._reply(200 if ready else 503, "text/plain; charset=utf-8", f"{reason}\n".encode())
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"not found\n")

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the logs

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
