"""Issue 19, items 1 and 2: the tokenizer reports each text's language and unknown-token
share; the gateway (REST and gRPC) and the worker route each text to the model for its
language and answer `unsupported_language` for text no served model can read."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from tokenizers import Tokenizer as RustTokenizer

from services.tokenizer.core import Tokenizer, TokenizerLimits, unknown_token_id
from services.tokenizer.languages import LanguageDetector
from shared.messages import DLQ_TOPIC, SENTIMENT_TOPIC
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.pipeline import PipelineTargets
from shared.routing import Detection, LanguageRouting, readable, route
from tests.conftest import MODEL, link_version
from tests.gateway.conftest import client_for, settings_for_targets
from tests.mesh import running_mesh
from tests.test_import import import_cli
from tests.tiny_checkpoints import FAMILIES, build_checkpoint, build_tokenizer
from tests.workers.test_scorer import make_scorer, news, produce, read_all
from workers.sentiment_monitor.scoring import BlockingPipeline

TESTDATA = Path(__file__).parent / "testdata" / "language_headlines.json"
#: The issue's examples: the English model read them as `neutral` at 0.93 and 0.99.
CHINESE = ["恒大集团债务违约，股价暴跌80%", "宁德时代遭大股东减持，股价跌停"]
#: Chinese the tiny Chinese model's vocabulary covers (tests/tiny_checkpoints.py CORPUS).
CHINESE_IN_VOCABULARY = "央行宣布降息，股市上涨"
ENGLISH = "Evergrande defaults on its dollar bonds and its shares plunge 80%"
JAPANESE = "トヨタ自動車、今期の営業利益予想を上方修正"
ZH_MODEL = "finance-zh"


def unsupported(language: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "infermesh_unsupported_language_texts_total", {"language": language, "reason": reason}
    )
    return value or 0.0


# The routing rule, transport-free.


def test_default_table_routes_the_default_models_languages_and_settings_add_more() -> None:
    routing = LanguageRouting({"zh-Hans": ZH_MODEL})
    table = routing.table(MODEL, ["en", "de-CH"])
    assert table == {"en": MODEL, "de": MODEL, "zh": ZH_MODEL}
    assert LanguageRouting().table(MODEL, ["en"]) == {"en": MODEL}


def test_route_by_language_confidence_and_requested_model() -> None:
    table = {"en": MODEL, "zh": ZH_MODEL}
    assert route(Detection("zh", 0.99), table, MODEL, 0.5) == ZH_MODEL
    assert route(Detection("en", 0.99), table, MODEL, 0.5) == MODEL
    assert route(Detection("ja", 0.99), table, MODEL, 0.5) is None
    # Unsure or undetermined: the default model, where only the unknown-token limit can refuse.
    assert route(Detection("ja", 0.3), table, MODEL, 0.5) == MODEL
    assert route(Detection("und", 0.0), table, MODEL, 0.5) == MODEL
    assert route(Detection("", 0.0), table, MODEL, 0.5) == MODEL
    # A named model bypasses the table.
    assert route(Detection("ja", 0.99), table, MODEL, 0.5, requested_model="other") == "other"
    assert readable(0.3, 0.3) and not readable(0.31, 0.3)
    with pytest.raises(ValueError, match="max_unknown_token_share"):
        LanguageRouting(max_unknown_token_share=1.5)


# Detection and the unknown-token share in the tokenizer service's core.


def test_language_detector_on_short_finance_headlines() -> None:
    """py3langid as configured on 64 short headlines in 8 languages (en zh ja de fr es ru ko):
    all right when written; at least 95% kept as the bar (docs/models.md gives the figures)."""
    detector = LanguageDetector()
    headlines: dict[str, list[str]] = json.loads(TESTDATA.read_text(encoding="utf-8"))
    right = sum(detector.detect(text).language == language for language, texts in headlines.items() for text in texts)
    total = sum(len(texts) for texts in headlines.values())
    assert total >= 60 and right / total >= 0.95, f"{right}/{total}"
    assert detector.detect("$AAPL https://t.co/x 123").language == "und"
    with pytest.raises(ValueError, match="unknown"):
        LanguageDetector(["en", "klingon"])


@pytest.mark.parametrize("kind", ["wordpiece", "bytelevel", "unigram"])
def test_unknown_token_id_per_tokenizer_kind(kind: str, tmp_path: Path) -> None:
    build_tokenizer(kind, tmp_path)
    tokenizer = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    expected = {"wordpiece": "[UNK]", "bytelevel": None, "unigram": "<unk>"}[kind]
    unk = unknown_token_id(tokenizer)
    assert (tokenizer.id_to_token(unk) if unk is not None else None) == expected


def test_tokenizer_reports_language_and_unknown_share(built_model: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(
        built_model / "tokenizer.json", MODEL, TokenizerLimits(128, 32, 8, 4096), detector=LanguageDetector()
    )
    english, chinese = tokenizer.tokenize([ENGLISH, CHINESE[0]])
    assert english.language is not None and english.language.language == "en"
    assert english.unknown_token_share == 0.0
    assert chinese.language is not None and chinese.language.language == "zh" and chinese.language.confidence > 0.9
    assert chinese.unknown_token_share > 0.3
    # Byte-level BPE has no unknown token: the share is 0 whatever the script.
    build_tokenizer("bytelevel", tmp_path)
    bytelevel = Tokenizer(tmp_path / "tokenizer.json", "bpe", TokenizerLimits(64, 8, 8, 4096))
    (result,) = bytelevel.tokenize([CHINESE[0]])
    assert result.unknown_token_share == 0.0 and result.language is None


# Through the services: the default English model and an imported tiny Chinese one.


@pytest.fixture(scope="module")
def two_models(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built English model, and a tiny XLM-R (Unigram over CJK characters) imported as
    `finance-zh` declaring `zh`."""
    root = tmp_path_factory.mktemp("languages")
    repository = root / "models"
    link_version(repository, built_model, "1")
    family = next(f for f in FAMILIES if f.name == "xlm-roberta")
    checkpoint = build_checkpoint(family, root / "checkpoint")
    code, output = import_cli(
        str(checkpoint), "--model", ZH_MODEL, "--repository", str(repository), "--languages", "zh"
    )
    assert code == 0, output
    shutil.rmtree(checkpoint)
    return repository


@pytest_asyncio.fixture(scope="module")
async def mesh(two_models: Path) -> AsyncIterator[list[str]]:
    async with running_mesh(two_models, variant="fp32") as targets:
        yield [targets.tokenizer, targets.inference, targets.postprocessor]


async def test_rest_answers_unsupported_language_beside_labelled_english(mesh: list[str]) -> None:
    before = unsupported("zh", "no_model")
    async for gateway in client_for(settings_for_targets([*mesh, "127.0.0.1:1"])):
        response = await gateway.post("/v1/sentiment", json={"texts": [CHINESE[0], ENGLISH, CHINESE[1]]})
        assert response.status_code == 200, response.text
        zh_first, english, zh_second = response.json()["results"]
        named = await gateway.post("/v1/classify", json={"model": MODEL, "texts": [ENGLISH, CHINESE[0]]})
    for result in (zh_first, zh_second):
        assert result["status"] == "unsupported_language" and result["language"] == "zh"
        assert result["label"] == "abstain" and result["abstained"] and result["probabilities"] == {}
        assert result["labels"] == [] and result["model_name"] == ""
    assert english["status"] == "ok" and english["language"] == "en"
    assert english["label"] in {"negative", "neutral", "positive"} and english["model_name"] == MODEL
    assert english["unknown_token_share"] == 0.0
    assert unsupported("zh", "no_model") - before == 2
    # A named model bypasses the table but still refuses text its tokenizer cannot read.
    assert named.status_code == 200, named.text
    named_english, named_chinese = named.json()["results"]
    assert named_english["status"] == "ok"
    assert named_chinese["status"] == "unsupported_language" and named_chinese["unknown_token_share"] > 0.3


async def test_chinese_is_routed_to_the_chinese_model(mesh: list[str]) -> None:
    settings = settings_for_targets([*mesh, "127.0.0.1:1"], language_routes={"zh": ZH_MODEL})
    async for gateway in client_for(settings):
        response = await gateway.post("/v1/sentiment", json={"texts": [ENGLISH, CHINESE_IN_VOCABULARY, JAPANESE]})
        assert response.status_code == 200, response.text
        body = response.json()
        port = int(gateway.headers["x-test-grpc-port"])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pipeline_grpc.PipelineStub(channel).Classify(
                pipeline_pb.ClassifyRequest(texts=[ENGLISH, CHINESE_IN_VOCABULARY, JAPANESE])
            )
    english, chinese, japanese = body["results"]
    assert (english["status"], english["model_name"]) == ("ok", MODEL)
    assert (chinese["status"], chinese["language"], chinese["model_name"]) == ("ok", "zh", ZH_MODEL)
    assert chinese["label"] in {"negative", "neutral", "positive"} and chinese["model_version"] == "1"
    assert (japanese["status"], japanese["language"]) == ("unsupported_language", "ja")
    assert body["model_name"] == MODEL
    # The gRPC Pipeline: the same, with a status per result.
    statuses = [r.status for r in reply.results]
    assert statuses == [
        pipeline_pb.RESULT_STATUS_OK,
        pipeline_pb.RESULT_STATUS_OK,
        pipeline_pb.RESULT_STATUS_UNSUPPORTED_LANGUAGE,
    ]
    assert [r.model_name for r in reply.results] == [MODEL, ZH_MODEL, ""]
    assert reply.results[2].language == "ja" and not reply.results[2].probabilities


# Over Kafka: the worker dead-letters what no model reads, and loses nothing.


@pytest.fixture
def routed_pipeline(mesh: list[str]) -> Iterator[BlockingPipeline]:
    blocking = BlockingPipeline(PipelineTargets(*mesh), MODEL, LanguageRouting())
    yield blocking
    blocking.close()


async def test_worker_dead_letters_chinese_as_unsupported_language(
    kafka_config: dict[str, Any], routed_pipeline: BlockingPipeline
) -> None:
    before = unsupported("zh", "no_model")
    produce(kafka_config, [news("en-1", ENGLISH), news("zh-1", CHINESE[0])])
    scorer = make_scorer(kafka_config, routed_pipeline)
    handled = 0
    for _ in range(20):
        # The services run on this event loop: the blocking scorer runs beside it.
        handled += (await asyncio.to_thread(scorer.run_once, 1000)).records
        if handled >= 2:
            break
    assert handled == 2
    (dead,) = await asyncio.to_thread(read_all, kafka_config, DLQ_TOPIC, 1)
    headers = dict(dead.headers)
    assert headers["error-type"] == b"unsupported-language"
    assert b"detected language zh" in headers["error-detail"]
    assert json.loads(dead.value)["id"] == "zh-1"
    scored = await asyncio.to_thread(read_all, kafka_config, SENTIMENT_TOPIC, 1)
    assert [json.loads(r.value)["item_id"] for r in scored] == ["en-1"]
    assert unsupported("zh", "no_model") - before == 1
    # Both offsets committed: nothing is re-delivered, nothing lost.
    assert (await asyncio.to_thread(scorer.run_once, 500)).records == 0
    scorer.consumer.close()
    scorer.producer.close()
