"""The records the monitor reads and writes, and the rules for poison input.

Topics (all JSON, UTF-8):
- `finance.news.v1`: NewsItem, produced by users; key optional (the item id is a good one).
- `finance.sentiment.v1`: ScoredItem, one per (item, ticker), keyed by ticker.
- `finance.sentiment.windows.v1`: WindowAggregate, keyed by ticker.
- `finance.alerts.v1`: Alert, keyed by ticker.
- `finance.sentiment.topics.v1`: ScoredItem, one per item with a topic, keyed by topic:
  the repartition the per-topic windows read (a topic's items from every ticker, and from
  none, in one partition).
- `finance.topics.windows.v1`: TopicWindow, keyed by topic.
- `finance.topics.alerts.v1`: TopicAlert, keyed by topic.
- `finance.news.v1.dlq`: the original bytes of poison records, reasons in headers (also
  unreadable records of the monitor's own topics, with their source topic).
Every output carries a deterministic `id`, so consumers can drop duplicates that
at-least-once delivery may produce. The `.v1` records only ever gain optional fields, so
readers of older records (and older readers of newer ones) keep working.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

NEWS_TOPIC = "finance.news.v1"
SENTIMENT_TOPIC = "finance.sentiment.v1"
WINDOWS_TOPIC = "finance.sentiment.windows.v1"
ALERTS_TOPIC = "finance.alerts.v1"
TOPIC_SENTIMENT_TOPIC = "finance.sentiment.topics.v1"
TOPIC_WINDOWS_TOPIC = "finance.topics.windows.v1"
TOPIC_ALERTS_TOPIC = "finance.topics.alerts.v1"
DLQ_TOPIC = f"{NEWS_TOPIC}.dlq"

TICKER_PATTERN = (
    r"^(?:[A-Z][A-Z0-9.\-]{0,9}"  # US symbols and classes (BRK.B), letter codes anywhere (VOD.L)
    r"|[0-9]{6}\.(?:SH|SS|SZ|BJ)"  # Shanghai (SH, or Yahoo's SS), Shenzhen, Beijing: 600519.SH
    r"|[0-9]{4,5}\.HK"  # Hong Kong: 0700.HK, 00700.HK
    r"|[0-9]{3}[0-9A-Z]\.T"  # Tokyo: 7203.T, and the alphanumeric codes issued since 2024 (130A.T)
    r"|[0-9][0-9A-Z]{2,4}\.L"  # London codes that start with a digit (0YP5.L)
    r"|[0-9]{6}\.(?:KS|KQ)"  # Korea: 005930.KS
    r"|[0-9]{4,6}\.(?:TW|TWO))$"  # Taiwan: 2330.TW
)
"""A ticker as `tickers` carries it (upper case, no `$`): a US symbol, or an exchange code
with the exchange's suffix; a code that starts with a digit needs a known suffix."""
Ticker = Annotated[str, StringConstraints(pattern=TICKER_PATTERN)]

EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""Windows align to the Unix epoch, and Kafka's own timestamps start there."""


def _not_before_epoch(moment: datetime) -> datetime:
    # Year 1 overflowed the window arithmetic and stopped the windowing stage, which
    # then read the same record again on restart.
    if moment < EARLIEST_EVENT_TIME:
        raise ValueError(f"{moment.isoformat()} is before {EARLIEST_EVENT_TIME.isoformat()}")
    return moment


EventTime = Annotated[AwareDatetime, AfterValidator(_not_before_epoch)]


class NewsItem(BaseModel):
    """One piece of finance news or a post, as producers send it to `finance.news.v1`."""

    model_config = ConfigDict(frozen=True, extra="ignore", title="finance.news.v1")

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    """Producer-chosen unique id; duplicates are scored once per worker batch and can be
    dropped downstream by it."""
    published_at: EventTime
    """RFC 3339 timestamp with a zone, not before 1970; the event time windows use."""
    source: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    headline: Annotated[str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True)]
    body: Annotated[str, StringConstraints(max_length=100_000)] | None = None
    tickers: list[Ticker] = Field(default_factory=list, max_length=50)
    """Tickers the producer already knows the item is about (upper case, no `$`)."""

    def text(self) -> str:
        """What gets scored: the headline, then the body if any."""
        return f"{self.headline}\n\n{self.body}" if self.body else self.headline


class HeadResult(BaseModel):
    """One head's answer for one item, from a model applied beside the scoring model."""

    model_config = ConfigDict(frozen=True)

    label: str
    """The head's top label, or `abstain`."""
    probabilities: dict[str, float] = Field(default_factory=dict)
    """The head's calibrated probabilities."""
    labels: list[str] = Field(default_factory=list)
    """Every label that holds: for a multi-label (sigmoid) head each one at or above its
    threshold, for a single-label (softmax) head the top one; empty when it abstained."""
    abstained: bool = False
    """No label cleared the head's threshold (`label` is then `abstain`)."""
    score: float | None = None
    """The head's score from its label-to-score mapping; None without one."""


class ModelClassification(BaseModel):
    """One item's result from a model applied beside the scoring model
    (`INFERMESH_WORKER_MODELS`, `INFERMESH_WORKER_TOPIC_MODEL`)."""

    model_config = ConfigDict(frozen=True)

    model_version: str = ""
    """The version that answered (empty when the model could read none of the batch's texts)."""
    status: str = "ok"
    """`ok`; `unsupported_language`: the model cannot read the item's text (too many of its
    tokens unknown to the model's tokenizer); or `rejected`: the model refused the item's
    text as invalid input (`detail` says why). Either way there is no label, and the item is
    still scored by the scoring model."""
    detail: str = ""
    """Why the model rejected the item (status `rejected`); empty otherwise."""
    label: str | None = None
    """The primary head's top label (or `abstain`); None when the status is not `ok`."""
    labels: list[str] = Field(default_factory=list)
    """Every label of the primary head that holds: for a multi-label (sigmoid) head each one
    at or above its threshold, for a single-label (softmax) head the top one; empty when it
    abstained or the status is not `ok`."""
    abstained: bool = False
    """The primary head abstained (no label cleared its threshold; `label` is `abstain`);
    false when the status is not `ok`."""
    probabilities: dict[str, float] = Field(default_factory=dict)
    """The primary head's calibrated probabilities; empty when the status is not `ok`."""
    score: float | None = None
    """The version's score from its label-to-score mapping; None without one."""
    heads: dict[str, HeadResult] = Field(default_factory=dict)
    """Every head of the version, primary first, by head name (an imported single-head
    checkpoint's is `label`)."""


class ScoredItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """`<item id>:<ticker>`, or the item id when no ticker was found."""
    item_id: str
    ticker: str | None
    published_at: EventTime
    source: str
    headline: str
    label: str
    probabilities: dict[str, float]
    score: float
    """The model version's score: sum of p(label) * weight over its label-to-score mapping
    (`scores` in its config.json); P(positive) - P(negative), in [-1, 1], for sentiment."""
    model_name: str
    model_version: str
    topic: str | None = None
    """The top label of the topic head (`INFERMESH_WORKER_TOPIC_HEAD`, default `topic`) of
    the topic model (`INFERMESH_WORKER_TOPIC_MODEL`; by default the scoring model's version);
    None when the version has no such head, it abstained, or the topic model could not read
    the item or rejected it."""
    topic_probabilities: dict[str, float] = Field(default_factory=dict)
    """The topic head's calibrated probabilities; empty without a topic head."""
    tickers: list[str] = Field(default_factory=list)
    """Every ticker the item was attributed to (the records of one item on
    `finance.sentiment.v1` share it; on `finance.sentiment.topics.v1`, where `ticker` is
    None, it is the item's ticker mix)."""
    classifications: dict[str, ModelClassification] = Field(default_factory=dict)
    """By model name, the results of the models applied beside the scoring model
    (`INFERMESH_WORKER_MODELS`, and the topic model when it is another); the scoring model's
    result is the fields above. Empty when no other model is applied."""


class HeadlineEvidence(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    headline: str
    negative_probability: float
    tickers: list[str] = Field(default_factory=list)
    """The item's tickers (topic windows' evidence; empty in ticker windows)."""


class WindowAggregate(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """`<ticker>:<window start, RFC 3339>`."""
    ticker: str
    # With a zone: the alert rule compares them with aware times, and a naive one read
    # back from the topic raised TypeError inside the windowing stage.
    window_start: EventTime
    window_end: EventTime
    count: Annotated[int, Field(ge=0)]
    mean_score: float
    share_negative: Annotated[float, Field(ge=0.0, le=1.0)]
    top_negative: list[HeadlineEvidence]
    topics: dict[str, int] = Field(default_factory=dict)
    """The topic mix: items per topic (items without a topic are not in it), so a reader
    sees why a ticker turned negative (mostly `Legal | Regulation`)."""
    negative_topics: dict[str, int] = Field(default_factory=dict)
    """Negative items per topic."""

    @property
    def key(self) -> str:
        """What the window is about: its ticker."""
        return self.ticker


class Alert(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """`<ticker>:<window start>`: one window raises at most one alert."""
    ticker: str
    window: WindowAggregate
    baseline_share_negative: float
    baseline_stddev: float
    baseline_windows: int
    z_score: float


class TopicWindow(BaseModel):
    """One closed window of one topic across tickers (items naming no ticker count too)."""

    model_config = ConfigDict(frozen=True)

    id: str
    """`<topic>:<window start, RFC 3339>`."""
    topic: str
    window_start: EventTime
    window_end: EventTime
    count: Annotated[int, Field(ge=0)]
    mean_score: float
    share_negative: Annotated[float, Field(ge=0.0, le=1.0)]
    top_negative: list[HeadlineEvidence]
    """The most negative headlines, each with its tickers."""
    tickers: dict[str, int] = Field(default_factory=dict)
    """Items per ticker named (an item naming two counts for both)."""
    negative_tickers: dict[str, int] = Field(default_factory=dict)
    """Negative items per ticker named."""
    without_ticker: Annotated[int, Field(ge=0)] = 0
    """Items naming no ticker."""

    @property
    def key(self) -> str:
        """What the window is about: its topic."""
        return self.topic


class TopicAlert(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """`<topic>:<window start>`: one window raises at most one alert."""
    topic: str
    window: TopicWindow
    baseline_share_negative: float
    baseline_stddev: float
    baseline_windows: int
    z_score: float
    largest_ticker_share: Annotated[float, Field(ge=0.0, le=1.0)]
    """Share of the window's negative items that name its most-named ticker (0 when none
    names one): a topic alert needs the news to be broader than one company."""


class PoisonRecord(Exception):
    """A record that can never be processed; it goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_news(value: bytes | None, max_bytes: int) -> NewsItem:
    """Parses one `finance.news.v1` record value or raises PoisonRecord with the reason."""
    if not value:  # a tombstone (None) or zero bytes
        raise PoisonRecord("empty", "record has no value")
    if len(value) > max_bytes:
        raise PoisonRecord("too-large", f"record has {len(value)} bytes; max is {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PoisonRecord("invalid-utf8", f"byte {error.start} is not valid UTF-8") from None
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise PoisonRecord("not-json", f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        # "[[[[..." a few thousand deep: uncaught, it stopped the scoring stage, which then
        # read the same record again on restart.
        raise PoisonRecord("not-json", "nested too deeply") from None
    try:
        return NewsItem.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        raise PoisonRecord("schema", f"{where}: {first['msg']}") from None


Model = TypeVar("Model", bound=BaseModel)


def decode_internal(model: type[Model], value: bytes | None) -> Model:
    """Parses a record of one of the monitor's own topics (scored items, windows, alerts)
    or raises PoisonRecord with the reason, as `decode_news` does for the input."""
    if not value:
        raise PoisonRecord("empty", "record has no value")
    try:
        return model.model_validate_json(value)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise PoisonRecord("not-json", first["msg"]) from None
        where = ".".join(str(part) for part in first["loc"]) or "record"
        raise PoisonRecord("schema", f"{where}: {first['msg']}") from None


def record_json_schema(model: type[BaseModel], topic: str) -> dict[str, Any]:
    """The published JSON Schema of the records of one output topic (docs/schemas/)."""
    schema = model.model_json_schema()
    schema["title"] = topic
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://infermesh.dev/schemas/{topic}.json"
    return schema


def output_json_schemas() -> dict[str, dict[str, Any]]:
    """Per output topic, the JSON Schema of its records (docs/schemas/<topic>.json)."""
    models: dict[str, type[BaseModel]] = {
        SENTIMENT_TOPIC: ScoredItem,
        WINDOWS_TOPIC: WindowAggregate,
        ALERTS_TOPIC: Alert,
        TOPIC_SENTIMENT_TOPIC: ScoredItem,
        TOPIC_WINDOWS_TOPIC: TopicWindow,
        TOPIC_ALERTS_TOPIC: TopicAlert,
    }
    return {topic: record_json_schema(model, topic) for topic, model in models.items()}


def news_json_schema() -> dict[str, Any]:
    """The published JSON Schema of `finance.news.v1` (docs/schemas/finance.news.v1.json)."""
    schema = NewsItem.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://infermesh.dev/schemas/finance.news.v1.json"
    return schema
