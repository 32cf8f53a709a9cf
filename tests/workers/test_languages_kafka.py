"""Issue 19, item 4, over Kafka: the monitor's score and windows stages, built as
`python -m workers.sentiment_monitor` builds them and routed by language as its settings
say (`INFERMESH_WORKER_LANGUAGE_ROUTES={"zh": "finance-zh"}`), against the real services
on loopback and the embedded broker. The repository holds the built default model and a
tiny Chinese classifier built here (a character vocabulary, random weights) and imported
with `--languages zh`, like any user model.

English news is scored by the default model; Chinese news naming A-share tickers (by
company name, cashtag or the producer's `tickers`) by the Chinese one, windowed per
ticker, and a burst of negative news about 600519.SH after three calm windows raises
exactly one alert, with its evidence; Japanese news (no model) is dead-lettered as
`unsupported-language` and counted. Nothing is lost.

Event times are in the past and the windows stage's clock is fixed: windows close only
when later items move the watermark past them (as in tests/workers/test_windowing.py),
never by the clock, so the test waits for nothing and the windows it expects are exact.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from prometheus_client import REGISTRY
from transformers import AutoModelForSequenceClassification

from shared.kafka import read_to_end
from shared.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    ScoredItem,
    WindowAggregate,
)
from shared.pipeline import PipelineTargets
from tests.conftest import MODEL, link_version
from tests.mesh import running_mesh
from tests.test_import import import_cli
from tests.tiny_checkpoints import FAMILIES, LABELS, build_character_tokenizer, build_checkpoint
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import UNSUPPORTED_LANGUAGE_REASON, NewsScorer
from workers.sentiment_monitor.runner import StageRunner, group_consumer
from workers.sentiment_monitor.scoring import BlockingPipeline, check_score_mapping
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics
from workers.sentiment_monitor.windowing import WindowStage

ZH_MODEL = "finance-zh"
#: 09:30 in Shanghai, the A-share open; event times are stamped in +08:00.
T0 = datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
SHANGHAI = timezone(timedelta(hours=8))
#: The windows stage's clock: a day later, fixed (no window closes by the clock).
NOW = T0 + timedelta(days=1)
WINDOW = timedelta(minutes=5)

MOUTAI, PING_AN_BANK = "600519.SH", "000001.SZ"
#: What follows the company in a Chinese headline. Which of them the random model reads as
#: negative is chance: `chinese_checkpoint` picks the burst and the calm ones by its logits.
PREDICATES = [
    "股价暴跌", "遭证监会立案调查", "净利润大幅下滑", "经销商库存高企", "发布年度报告", "宣布分红方案",
    "召开股东大会", "新品正式上市", "营收同比增长", "股价小幅波动", "高管减持股份", "产品出厂价下调",
    "被曝财务造假", "遭大股东清仓", "评级被下调", "海外销量创新高", "获机构增持", "完成董事会换届",
    "回购计划获批", "与经销商签约",
]  # fmt: skip
#: How each candidate names its ticker, in turn: the company dictionary (`data/companies.csv`:
#: name and alias), a cashtag, or only the producer's `tickers` (the text names no company).
NAMINGS = {
    MOUTAI: [("贵州茅台", []), ("$600519.SH ", []), ("茅台", []), ("白酒龙头", [MOUTAI])],
    PING_AN_BANK: [("平安银行", []), ("$000001.SZ ", []), ("这家银行", [PING_AN_BANK])],
}
BURST, MOUTAI_CALM, PING_AN_CALM = 6, 7, 5
#: Logits between the Chinese model's most and least negative candidate.
SPREAD = 16.0
ENGLISH = [
    ("en-1", 3.0, "Apple shares plunge after profit warning", ["AAPL"]),
    ("en-2", 8.0, "Oil prices climb on supply worries; airlines slide", []),
    ("en-3", 27.0, "$AAPL beats estimates and raises its dividend", ["AAPL"]),
]
JAPANESE = [
    ("ja-1", 4.0, "ソニー株が急落、ゲーム事業の減益を嫌気"),
    ("ja-2", 13.0, "任天堂の純利益、前年比で2割減少"),
    ("ja-3", 19.0, "トヨタ自動車、今期の営業利益予想を上方修正"),
]


@dataclass(frozen=True)
class Headline:
    text: str
    tickers: list[str]
    """The producer's `tickers`."""
    margin: float
    """The random model's negative logit minus the larger other one (before the bias shift)."""


@dataclass
class ChineseModel:
    checkpoint: Path
    burst: list[Headline]
    """Read as negative: the burst about 600519.SH."""
    calm: dict[str, list[Headline]] = field(default_factory=dict)
    """Per ticker, read as not negative."""


def candidates(ticker: str) -> list[tuple[str, list[str]]]:
    namings = NAMINGS[ticker]
    return [(f"{namings[i % len(namings)][0]}{p}", namings[i % len(namings)][1]) for i, p in enumerate(PREDICATES)]


def margins(model: Any, tokenizer: Any, texts: list[str]) -> list[float]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    negative = LABELS.index("negative")
    others = torch.cat([logits[:, :negative], logits[:, negative + 1 :]], dim=1).max(dim=1).values
    return [float(margin) for margin in logits[:, negative] - others]


def chinese_checkpoint(folder: Path) -> ChineseModel:
    """A tiny XLM-R with random weights over a character vocabulary of the candidates' text
    (tests/tiny_checkpoints.py). Of the 600519.SH candidates, the six it scores most
    negative are the burst and the seven least negative its calm news; the five least
    negative 000001.SZ ones are that ticker's calm news. A random model is nearly blind to
    its input (the candidates' margins lie within 0.05 of each other), so first its output
    layer's weights are scaled until the margins spread over SPREAD logits; after choosing,
    the negative label's bias is shifted to halfway between the burst's lowest margin and
    the calm news' highest, so the burst is `negative` and the calm news is not, by a
    margin ONNX export cannot undo. Deterministic: the weights come from a fixed seed."""
    texts = {ticker: candidates(ticker) for ticker in NAMINGS}
    every_text = [text for pool in texts.values() for text, _ in pool]
    family = next(f for f in FAMILIES if f.name == "xlm-roberta")
    tokenizer = build_character_tokenizer(folder, every_text)
    build_checkpoint(family, folder, labels=LABELS, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    head = model.classifier.out_proj
    for _ in range(3):  # the max over the other labels makes it not quite linear
        spread = margins(model, tokenizer, every_text)
        with torch.no_grad():
            head.weight.mul_(SPREAD / (max(spread) - min(spread)))
    ranked = {}
    for ticker, pool in texts.items():
        scored = margins(model, tokenizer, [text for text, _ in pool])
        headlines = [Headline(text, tickers, m) for (text, tickers), m in zip(pool, scored, strict=True)]
        ranked[ticker] = sorted(headlines, key=lambda h: -h.margin)
    chosen = ChineseModel(
        folder,
        burst=ranked[MOUTAI][:BURST],
        calm={MOUTAI: ranked[MOUTAI][-MOUTAI_CALM:], PING_AN_BANK: ranked[PING_AN_BANK][-PING_AN_CALM:]},
    )
    lowest_burst = min(h.margin for h in chosen.burst)
    highest_calm = max(h.margin for calm in chosen.calm.values() for h in calm)
    assert lowest_burst - highest_calm > 1.0, (lowest_burst, highest_calm)
    with torch.no_grad():
        head.bias[LABELS.index("negative")] -= (lowest_burst + highest_calm) / 2
    model.save_pretrained(folder)
    return chosen


@pytest.fixture(scope="module")
def chinese(tmp_path_factory: pytest.TempPathFactory) -> ChineseModel:
    return chinese_checkpoint(tmp_path_factory.mktemp("finance-zh-checkpoint"))


@pytest.fixture(scope="module")
def repository(built_model: Path, chinese: ChineseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built default model, and the Chinese one imported as `finance-zh` declaring `zh`."""
    root = tmp_path_factory.mktemp("languages-kafka") / "models"
    link_version(root, built_model, "1")
    code, output = import_cli(
        str(chinese.checkpoint), "--model", ZH_MODEL, "--repository", str(root), "--languages", "zh"
    )
    assert code == 0, output
    shutil.rmtree(chinese.checkpoint)
    return root


@pytest_asyncio.fixture(scope="module")
async def mesh(repository: Path) -> AsyncIterator[PipelineTargets]:
    async with running_mesh(repository, variant="fp32") as targets:
        yield targets


@dataclass(frozen=True)
class News:
    id: str
    minute: float
    headline: str
    tickers: list[str]
    """The producer's."""
    attributed: list[str]
    """What the worker should attribute it to."""

    def value(self) -> bytes:
        published = (T0 + timedelta(minutes=self.minute)).astimezone(SHANGHAI).isoformat()
        document = {"id": self.id, "published_at": published, "source": "test", "headline": self.headline}
        return json.dumps(document | ({"tickers": self.tickers} if self.tickers else {}), ensure_ascii=False).encode()


def timeline(chinese: ChineseModel) -> list[News]:
    """09:30 to 09:57 Shanghai time, windows of five minutes (w0 = 09:30):
    600519.SH: two calm items in w0, w1, w2; the burst of six in w3; one calm item at 09:56.
    000001.SZ: one calm item in each of w0 to w3, and one at 09:56:30.
    English: AAPL in w0 and at 09:57, one item naming no ticker; Japanese in w0, w2, w3.
    The items at 09:56 and later move every partition's watermark past w3 (09:50 + 1 min of
    lateness < 09:56) and not past w5: w0 to w3 close, w5 stays open."""
    moutai, ping_an = iter(chinese.calm[MOUTAI]), iter(chinese.calm[PING_AN_BANK])
    items = []
    for n, minute in enumerate([0.5, 2.5, 5.5, 7.5, 10.5, 12.5, 26.0]):
        calm = next(moutai)
        items.append(News(f"moutai-calm-{n}", minute, calm.text, calm.tickers, [MOUTAI]))
    for n, burst in enumerate(chinese.burst):
        items.append(News(f"moutai-burst-{n}", 15.2 + 0.6 * n, burst.text, burst.tickers, [MOUTAI]))
    for n, minute in enumerate([1.0, 6.0, 11.0, 16.0, 26.5]):
        calm = next(ping_an)
        items.append(News(f"ping-an-calm-{n}", minute, calm.text, calm.tickers, [PING_AN_BANK]))
    items += [News(item_id, minute, text, [], tickers) for item_id, minute, text, tickers in ENGLISH]
    items += [News(item_id, minute, text, [], []) for item_id, minute, text in JAPANESE]
    return sorted(items, key=lambda item: item.minute)


def produce(kafka_config: dict[str, Any], items: list[News]) -> None:
    # One news partition, in publication order: the scorer then emits each ticker's items in
    # event-time order (across partitions it emits one partition's backlog after another's).
    producer = KafkaProducer(**kafka_config, acks="all")
    for item in items:
        producer.send(NEWS_TOPIC, key=item.id.encode(), value=item.value(), partition=0)
    producer.flush()
    producer.close()


def stage_runners(client: dict[str, Any], settings: MonitorSettings, pipeline: BlockingPipeline) -> list[StageRunner]:
    """The `score` and `windows` stages as __main__.py builds them, but for the windows
    stage's fixed clock."""
    topics = monitor_topics(settings.partitions)
    attributor = TickerAttributor.from_csv(settings.companies_csv)

    def clients(group: str) -> tuple[KafkaConsumer, KafkaProducer]:
        consumer = group_consumer(client, group, settings.max_batch)
        return consumer, KafkaProducer(**client, acks="all", enable_idempotence=True, linger_ms=5)

    def scorer() -> NewsScorer:
        return NewsScorer(*clients(settings.scorer_group), pipeline, attributor, settings)

    def windows() -> WindowStage:
        return WindowStage(*clients(settings.windows_group), client, settings, clock=lambda: NOW)

    return [StageRunner("score", scorer, client, topics), StageRunner("windows", windows, client, topics)]


def committed(client: dict[str, Any], group: str) -> int:
    admin = KafkaAdminClient(**client)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return sum(meta.offset for partition, meta in offsets.items() if partition.topic == NEWS_TOPIC)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_languages_end_to_end_over_kafka_with_a_share_windows_and_an_alert(
    kafka_config: dict[str, Any], mesh: PipelineTargets, chinese: ChineseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's production settings, from its environment.
    for name, value in {
        "LANGUAGE_ROUTES": json.dumps({"zh": ZH_MODEL}),
        "TOKENIZER": mesh.tokenizer,
        "INFERENCE": mesh.inference,
        "POSTPROCESSOR": mesh.postprocessor,
        "PARTITIONS": "2",
        "MAX_BATCH": "8",  # several batches, each mixing languages
    }.items():
        monkeypatch.setenv(f"INFERMESH_WORKER_{name}", value)
    settings = MonitorSettings()
    assert settings.model_name == MODEL and settings.route_by_language
    items = timeline(chinese)
    by_id = {item.id: item for item in items}
    unsupported_before = sample("infermesh_unsupported_language_texts_total", language="ja", reason="no_model")
    dead_lettered_before = sample("infermesh_worker_dead_lettered_records_total", reason=UNSUPPORTED_LANGUAGE_REASON)
    produce(kafka_config, items)

    pipeline = BlockingPipeline(
        PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor),
        settings.model_name,
        settings.language_routing(),
    )
    runners = stage_runners(kafka_config, settings, pipeline)
    threads = [threading.Thread(target=runner.run, name=runner.name) for runner in runners]
    try:
        assert await asyncio.to_thread(check_score_mapping, pipeline, settings.model_name) is None
        for thread in threads:
            thread.start()
        # w0 to w3 of the two A-share tickers, and AAPL's w0.
        expected_windows = 4 + 4 + 1
        deadline = time.monotonic() + 120
        while True:
            windows_now = await asyncio.to_thread(read_to_end, kafka_config, WINDOWS_TOPIC, [0, 1])
            scored_all = await asyncio.to_thread(committed, kafka_config, settings.scorer_group) == len(items)
            if scored_all and len(windows_now) >= expected_windows:
                break
            if scored_all:  # the windows follow within seconds, or never
                deadline = min(deadline, time.monotonic() + 20)
            assert time.monotonic() < deadline, f"{len(windows_now)} windows; every item scored: {scored_all}"
            await asyncio.sleep(0.5)
    finally:
        for runner in runners:
            runner.stop()
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
        await asyncio.to_thread(pipeline.close)
    assert not any(thread.is_alive() for thread in threads)
    assert [runner.resets for runner in runners] == [0, 0]

    scored = [
        ScoredItem.model_validate_json(r.value)
        for r in await asyncio.to_thread(read_to_end, kafka_config, SENTIMENT_TOPIC, [0, 1])
    ]
    dead = await asyncio.to_thread(read_to_end, kafka_config, DLQ_TOPIC, [0])
    windows = [WindowAggregate.model_validate_json(r.value) for r in windows_now]
    alerts = [
        Alert.model_validate_json(r.value)
        for r in await asyncio.to_thread(read_to_end, kafka_config, ALERTS_TOPIC, [0, 1])
    ]

    # Nothing lost: every item is scored (once per ticker it names) or dead-lettered, not both.
    scored_ids = {s.item_id for s in scored}
    dead_ids = {json.loads(r.value)["id"] for r in dead}
    assert scored_ids | dead_ids == set(by_id) and not scored_ids & dead_ids
    assert len(scored) == len({s.id for s in scored}) == len(scored_ids)  # one ticker each, at most

    # English: the default model. Chinese: the Chinese model, attributed to its A-share ticker.
    for item in scored:
        news = by_id[item.item_id]
        assert item.tickers == news.attributed and item.ticker == next(iter(news.attributed), None), item
        model = ZH_MODEL if news.id.startswith(("moutai", "ping-an")) else MODEL
        assert (item.model_name, item.model_version) == (model, "1"), item
        assert set(item.probabilities) == set(LABELS) and -1.0 <= item.score <= 1.0
        burst = news.id.startswith("moutai-burst")
        if model == ZH_MODEL:
            assert (item.label == "negative") == burst, item
    assert {s.item_id for s in scored if s.model_name == MODEL} == {item_id for item_id, *_ in ENGLISH}

    # Japanese: no model reads it. Dead-lettered with its reason, counted, committed.
    assert sorted(dead_ids) == [item_id for item_id, *_ in JAPANESE]
    for record in dead:
        headers = dict(record.headers)
        assert headers["error-type"] == UNSUPPORTED_LANGUAGE_REASON.encode()
        assert headers["error-detail"].startswith(b"detected language ja")
        assert headers["source-topic"] == NEWS_TOPIC.encode()
        assert record.value == by_id[json.loads(record.value)["id"]].value()  # the original bytes
    assert sample("infermesh_unsupported_language_texts_total", language="ja", reason="no_model") == (
        unsupported_before + len(JAPANESE)
    )
    assert sample("infermesh_worker_dead_lettered_records_total", reason=UNSUPPORTED_LANGUAGE_REASON) == (
        dead_lettered_before + len(JAPANESE)
    )

    # Windowed per ticker: w0 to w3 closed by the later items; w5 still open.
    counts = {(w.ticker, int((w.window_start - T0) / WINDOW)): (w.count, w.share_negative) for w in windows}
    assert counts == {
        (MOUTAI, 0): (2, 0.0),
        (MOUTAI, 1): (2, 0.0),
        (MOUTAI, 2): (2, 0.0),
        (MOUTAI, 3): (BURST, 1.0),
        (PING_AN_BANK, 0): (1, 0.0),
        (PING_AN_BANK, 1): (1, 0.0),
        (PING_AN_BANK, 2): (1, 0.0),
        (PING_AN_BANK, 3): (1, 0.0),
        ("AAPL", 0): (1, 1.0 if next(s for s in scored if s.item_id == "en-1").label == "negative" else 0.0),
    }
    assert len({w.id for w in windows}) == len(windows)

    # Exactly one alert: 600519.SH's burst after three calm windows, with its evidence.
    (alert,) = alerts
    assert alert.ticker == MOUTAI and alert.id == f"{MOUTAI}:{(T0 + 3 * WINDOW).isoformat()}"
    assert alert.window.window_start == T0 + 3 * WINDOW and alert.window.count == BURST
    assert alert.baseline_windows == 3 and alert.baseline_share_negative == 0.0 and alert.z_score >= 3.0
    assert alert.window.mean_score < 0
    burst_headlines = {news.id: news.headline for news in items if news.id.startswith("moutai-burst")}
    assert len(alert.window.top_negative) == 3
    for evidence in alert.window.top_negative:
        assert burst_headlines[evidence.item_id] == evidence.headline and evidence.negative_probability > 1 / 3
