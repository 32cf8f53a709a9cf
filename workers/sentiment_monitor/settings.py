from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from shared.routing import RoutingSettings
from workers.sentiment_monitor.attribution import DEFAULT_COMPANIES


class MonitorSettings(RoutingSettings):
    """Settings of the sentiment monitor worker (env prefix INFERMESH_WORKER_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_WORKER_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface of the metrics and probe endpoint; 0.0.0.0 in containers."""

    metrics_port: int = 9104
    """Port serving `/metrics`, `/healthz` and `/readyz` (partitions assigned, broker reachable)."""

    metrics_enabled: bool = True
    """Serve that endpoint."""

    log_json: bool = False
    """Write logs as JSON lines."""

    log_level: str = "INFO"
    """Root log level."""

    scorer_group: str = "infermesh-sentiment-scorer"
    """Consumer group of the scoring stage (reads finance.news.v1)."""

    tokenizer: str = "127.0.0.1:50051"
    """Tokenizer service address."""

    inference: str = "127.0.0.1:8001"
    """Inference service address."""

    postprocessor: str = "127.0.0.1:50052"
    """Post-processor address."""

    model_name: str = "finance-sentiment"
    """Model to score with (with the language routes): it gives a scored item's label,
    probabilities and score."""

    models: list[str] = []
    """More models applied to every item beside `model_name`, as JSON: `["finance-esg"]`.
    Each is called by name (no language routing: a text it cannot read is recorded as
    `unsupported_language`, and the item is still scored); its result lands in the scored
    item's `classifications`. The worker refuses to start when one is not in the model
    repository."""

    topic_model: str = ""
    """The model whose `topic_head` gives an item's topic; empty: the scoring model. Another
    model is applied like one in `models` (it need not be listed there). Set, the worker
    refuses to start when it is not in the model repository or its serving version has no
    `topic_head` (an imported single-head checkpoint's head is `label`)."""

    max_batch: int = 256
    """Records polled, scored and committed together; with the next batch scored while
    one is committed, at most twice this many records are in flight.
    Each batch pays a produce, flush and commit round trip, so small batches waste the
    inference service's time between them."""

    max_record_bytes: int = 256 * 1024
    """Larger input records are dead-lettered."""

    score_timeout_seconds: float = 10.0
    """Deadline of one batch's scoring call."""

    retry_initial_seconds: float = 0.2
    """First back-off after a transient failure (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED)."""

    retry_max_seconds: float = 5.0
    """Longest back-off between retries."""

    retry_budget_seconds: float = 120.0
    """Retrying one batch longer than this stops the worker (its records stay uncommitted)."""

    partitions: int = 4
    """Partitions of the topics the worker creates when they are missing."""

    companies_csv: Path = DEFAULT_COMPANIES
    """`ticker,name,alias,...` dictionary for attribution by company name (replaces the bundled
    list and pytickersymbols; docs/monitoring.md, "Ticker attribution")."""

    windows_group: str = "infermesh-sentiment-windows"
    """Consumer group of the windowing stage (reads finance.sentiment.v1, keyed by ticker)."""

    topics_group: str = "infermesh-sentiment-topics"
    """Consumer group of the topic windowing stage (reads finance.sentiment.topics.v1,
    keyed by topic)."""

    stages: list[str] = ["score", "windows", "topics"]
    """Stages this process runs: `score` (news to scored items), `windows` (ticker windows
    and alerts), `topics` (topic windows and alerts)."""

    topic_head: str = "topic"
    """The head of the topic model's version whose label is an item's topic. A version
    without it (or a result without heads) gives items no topic: they are windowed per
    ticker only."""

    window_minutes: float = 5.0
    """Tumbling window size."""

    allowed_lateness_seconds: float = 60.0
    """How far behind the newest event time an item may arrive and still count."""

    max_future_seconds: float = 60.0
    """Items stamped further ahead of the worker's clock are dropped and counted
    (`infermesh_worker_dropped_items_total{reason="future"}`): the allowance for producers'
    clock skew. An item inside it moves the watermark no further than an item published
    now would, so it cannot close windows early."""

    idle_seconds: float = 60.0
    """A partition whose newest event time has not moved for this long (worker's clock)
    has its watermark go on with the clock, so a quiet ticker's last window closes (and
    alerts) at most a window plus the allowed lateness after its last item (or this long,
    if longer) without waiting for new records; but only while the pipeline is caught up
    (the scoring group has committed all of finance.news.v1 and this stage has read all of
    the partition), never during an upstream stall, whose backlog would then be late."""

    caught_up_check_seconds: float = 5.0
    """How often at most the windowing stage asks the broker whether the pipeline is caught
    up (scoring group's committed offsets, high-water marks), while a partition waits for
    idle closing. Keep it well below the allowed lateness: news arriving between two checks
    is protected only by that."""

    restore_lookback_hours: float = 6.0
    """On assignment, windows and alerts emitted this long ago at most (and any emitted
    since the first record the stage will read again) are read back to rebuild baselines,
    cooldowns and the ids of emitted windows. A ticker with fewer than
    `alert_baseline_windows` windows in it loses part of its baseline at every rebalance
    or restart, and one with fewer than three cannot alert until it has three again: raise
    this for sparse tickers (the read-back grows with it). Bounds the read-back, which used
    to be the topics' whole retention."""

    alert_min_items: int = 5
    """A window needs this many items to raise an alert."""

    alert_z_threshold: float = 3.0
    """Baseline standard deviations above the baseline share of negative items."""

    alert_min_share_negative: float = 0.4
    """Minimum share of negative items in an alerting window."""

    alert_baseline_windows: int = 12
    """Windows of history in a ticker's baseline."""

    alert_cooldown_minutes: float = 30.0
    """Quiet period after an alert, so one episode raises one alert."""

    topic_alert_min_items: int = 8
    """A topic window needs this many items to raise an alert (topic windows gather news
    from every ticker, so they are fuller than a ticker's; the other alert settings are
    the ticker alert's)."""

    topic_alert_max_ticker_share: float = 0.5
    """A topic window alerts only when no single ticker names more than this share of its
    negative items: one company's storm is its ticker's alert, not its topic's."""

    def applied_models(self) -> list[str]:
        """The models applied beside the scoring model, each once: `models`, then the topic
        model when it is another."""
        named = [*self.models, self.topic_model]
        return [model for model in dict.fromkeys(named) if model and model != self.model_name]
