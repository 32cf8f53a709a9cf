"""The one client for the whole classification path: tokenizer, inference and
post-processor over gRPC, in sequence, with the chunk rows batched into few ModelInfer
calls. The CLI uses it now; the gateway and workers use it too.

Concurrent small `classify` calls are coalesced into shared rounds (one Tokenize, few
ModelInfer, one Postprocess for all of them), because each gRPC call costs more CPU in
Python than scoring a headline does. A round whose merged input is rejected is re-run
call by call, so one caller's bad text never fails another caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc
import numpy as np
import numpy.typing as npt

from shared import oip
from shared.batching import BatchPolicy, DynamicBatcher
from shared.errors import DeadlineExceeded, InfermeshError, InputTooLarge, InvalidInput, from_grpc_error
from shared.grpc_client import channel
from shared.metrics import PIPELINE_BATCHER_METRICS, UNSUPPORTED_LANGUAGE_TEXTS
from shared.padding import pad_right
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from shared.pb import postprocess_pb2 as post_pb
from shared.pb import postprocess_pb2_grpc as post_grpc
from shared.pb import tokenizer_pb2 as tok_pb
from shared.pb import tokenizer_pb2_grpc as tok_grpc
from shared.routing import Detection, LanguageRouting, Refusal, TextStatus, readable, route

DEFAULT_MODEL = "finance-sentiment"
#: Distinct (model, version, thresholds) option sets that get a shared round; others run alone.
MAX_ROUND_KEYS = 16
#: How long the default model's declared languages (the routing table's base) are reused.
ROUTING_TABLE_TTL_SECONDS = 10.0


@dataclass(frozen=True)
class PipelineTargets:
    """host:port of each service."""

    tokenizer: str = "127.0.0.1:50051"
    inference: str = "127.0.0.1:8001"
    postprocessor: str = "127.0.0.1:50052"


@dataclass(frozen=True)
class HeadClassification:
    """One head's answer for one text (a version may have several heads over one encoder,
    e.g. `sentiment` and `topic`)."""

    label: str
    """The top label, or `abstain`."""
    labels: list[str]
    """Every label that holds; empty when abstained."""
    probabilities: dict[str, float]
    abstained: bool
    score: float | None = None
    """The head's score from its label -> weight mapping; None when it has none."""


@dataclass(frozen=True)
class Classification:
    label: str
    probabilities: dict[str, float]
    abstained: bool
    num_chunks: int
    num_tokens: int
    deciding_chunk: int
    labels: list[str] = field(default_factory=list)
    """Every label that holds (several for a multi-label version); empty when abstained."""
    score: float | None = None
    """The version's score, computed by the post-processor from its label -> weight mapping
    (`shared.classification.score`); None when the version has none."""
    status: TextStatus = TextStatus.OK
    """`unsupported_language`: no served model can read the text; then `label` is `abstain`,
    `labels` and `probabilities` are empty and `model_name` is empty."""
    language: str = ""
    """The detected language (ISO 639-1, `und` when undetermined, empty when not detected)."""
    language_confidence: float = 0.0
    unknown_token_share: float = 0.0
    """Of the text's tokens under its model's tokenizer (0 for byte-level BPE)."""
    model_name: str = ""
    """The model that classified the text: routing by language may choose another than the
    call's."""
    model_version: str = ""
    heads: dict[str, HeadClassification] = field(default_factory=dict)
    """Every head of the version, primary first, by head name; the fields above repeat the
    primary head's. Empty for an `unsupported_language` text."""


@dataclass(frozen=True)
class ClassifyResult:
    model_name: str
    model_version: str
    results: list[Classification] = field(default_factory=list)


@dataclass(frozen=True)
class HeadInfo:
    """One head of a model's serving version."""

    name: str
    labels: list[str]
    activation: str
    """softmax (one label per text) or sigmoid (multi-label)."""
    scores: dict[str, float]
    """Label -> weight in the head's score; empty: the head has no score."""


@dataclass(frozen=True)
class ModelInfo:
    """One model in the repository, as its serving version describes it (the
    post-processor's ListModels). `labels`, `activation` and `scores` are its primary
    head's."""

    name: str
    versions: list[str]
    serving_version: str
    labels: list[str]
    activation: str
    languages: list[str]
    scores: dict[str, float]
    heads: list[HeadInfo] = field(default_factory=list)
    """Every head of the serving version, primary first."""


@dataclass(frozen=True)
class _Call:
    """One caller's texts waiting for a shared round."""

    texts: list[str]
    deadline: float


@dataclass(frozen=True)
class _Row:
    document: int
    chunk: int
    input_ids: Sequence[int]
    attention_mask: Sequence[int]


class PipelineClient:
    """Classifies texts through the running services; reuse one instance per process."""

    def __init__(
        self,
        targets: PipelineTargets | None = None,
        model_name: str = DEFAULT_MODEL,
        rows_per_infer_call: int = 64,
        timeout_seconds: float = 30.0,
        texts_per_round: int = 64,
        concurrent_rounds: int = 4,
        routing: LanguageRouting | None = None,
    ) -> None:
        """`routing`: send each text to the model for its detected language and answer
        `unsupported_language` for text no model can read (`shared.routing`); None: every text
        goes to the named or default model, whatever its language."""
        self.targets = targets or PipelineTargets()
        self.model_name = model_name
        self.routing = routing
        self._table: tuple[dict[str, str], float] | None = None
        self.rows_per_infer_call = rows_per_infer_call
        self.timeout_seconds = timeout_seconds
        self._round_policy = BatchPolicy(
            max_batch_size=texts_per_round,
            max_batch_tokens=texts_per_round,
            max_queue_delay_seconds=0.0,
            max_queue_size=64 * texts_per_round,
            max_concurrent_batches=concurrent_rounds,
            padded_cost=False,
        )
        self._rounds: dict[tuple[str, str, tuple[tuple[str, float], ...]], DynamicBatcher[_Call, ClassifyResult]] = {}
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self._channels = [
            channel(target, options=options)
            for target in (self.targets.tokenizer, self.targets.inference, self.targets.postprocessor)
        ]
        self._tokenizer = tok_grpc.TokenizerServiceStub(self._channels[0])
        self._inference = infer_grpc.GRPCInferenceServiceStub(self._channels[1])
        self._postprocessor = post_grpc.PostprocessServiceStub(self._channels[2])

    async def __aenter__(self) -> PipelineClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(batcher.close() for batcher in self._rounds.values()))
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def classify(
        self,
        texts: Sequence[str],
        model_version: str = "",
        thresholds: Mapping[str, float] | None = None,
        timeout_seconds: float | None = None,
        model_name: str = "",
    ) -> ClassifyResult:
        """Labels and calibrated probabilities for each text; long texts are chunked and
        their chunks aggregated. `model_name` empty: the client's model, or with `routing`
        the model for each text's language; named: that model for every text (it must still
        read them: `unsupported_language` otherwise). `model_version` and `thresholds` apply
        to the named or default model's texts only. Raises
        `shared.errors` types (ModelNotFound naming the models there are), never raw gRPC
        errors."""
        if not texts:
            raise InvalidInput("texts is empty; send at least one text")
        for index, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(f"text {index} is not valid Unicode (it holds a lone surrogate)") from None
        timeout = timeout_seconds or self.timeout_seconds
        key = (model_name, model_version, tuple(sorted((thresholds or {}).items())))
        batcher = self._rounds.get(key)
        if len(texts) >= self._round_policy.max_batch_size or (batcher is None and len(self._rounds) >= MAX_ROUND_KEYS):
            # Big calls gain nothing from sharing; rare option sets must not grow the table.
            return await self._classify_now(list(texts), model_name, model_version, thresholds, timeout)
        if batcher is None:

            async def run_round(calls: list[_Call]) -> list[ClassifyResult | BaseException]:
                return await self._run_round(calls, model_name, model_version, thresholds)

            # Each round's span continues the first caller's trace and links the others'.
            batcher = DynamicBatcher(
                run_round,
                lambda call: len(call.texts),
                self._round_policy,
                name="classify round",
                metrics=PIPELINE_BATCHER_METRICS,
            )
            self._rounds[key] = batcher
        call = _Call(list(texts), time.monotonic() + timeout)
        try:
            (result,) = await asyncio.wait_for(batcher.submit([call]), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout:.1f} s") from None
        return result

    async def _run_round(
        self, calls: list[_Call], model_name: str, model_version: str, thresholds: Mapping[str, float] | None
    ) -> list[ClassifyResult | BaseException]:
        merged = [text for call in calls for text in call.texts]
        # The round lives as long as its most patient caller; the others stop waiting on their own.
        timeout = max(0.001, max(call.deadline for call in calls) - time.monotonic())
        return await self._round(calls, merged, model_name, model_version, thresholds, timeout)

    async def _round(
        self,
        calls: list[_Call],
        merged: list[str],
        model_name: str,
        model_version: str,
        thresholds: Mapping[str, float] | None,
        timeout: float,
    ) -> list[ClassifyResult | BaseException]:
        try:
            result = await self._classify_now(merged, model_name, model_version, thresholds, timeout)
        except (InvalidInput, InputTooLarge):
            if len(calls) == 1:
                raise
            # Someone's input is bad: find out whose by running each call alone.
            return list(
                await asyncio.gather(
                    *(
                        self._classify_now(
                            call.texts,
                            model_name,
                            model_version,
                            thresholds,
                            max(0.001, call.deadline - time.monotonic()),
                        )
                        for call in calls
                    ),
                    return_exceptions=True,
                )
            )
        results: list[ClassifyResult | BaseException] = []
        start = 0
        for call in calls:
            part = result.results[start : start + len(call.texts)]
            results.append(ClassifyResult(result.model_name, result.model_version, part))
            start += len(call.texts)
        return results

    async def _classify_now(
        self,
        texts: list[str],
        requested_model: str,
        model_version: str,
        thresholds: Mapping[str, float] | None,
        timeout: float,
    ) -> ClassifyResult:
        deadline = time.monotonic() + timeout
        model_name = requested_model or self.model_name
        try:
            first = await self._tokenize(texts, model_name, model_version, deadline)
            # Which model reads each text, and each text's tokens under that model.
            tokens: list[tok_pb.TokenizedText] = list(first)
            refused: dict[int, Refusal] = {}
            groups: dict[str, list[int]] = {}
            if self.routing is None:
                groups[model_name] = list(range(len(texts)))
            else:
                table = await self._routing_table(deadline)
                for index, result in enumerate(first):
                    target = route(
                        Detection(result.language, result.language_confidence),
                        table,
                        self.model_name,
                        self.routing.min_language_confidence,
                        requested_model,
                    )
                    if target is None:
                        refused[index] = Refusal.NO_MODEL
                    else:
                        groups.setdefault(target, []).append(index)
                others = [model for model in groups if model != model_name]
                retokenized = await asyncio.gather(
                    *(self._tokenize([texts[i] for i in groups[model]], model, "", deadline) for model in others)
                )
                for model, group_results in zip(others, retokenized, strict=True):
                    for index, text_result in zip(groups[model], group_results, strict=True):
                        tokens[index] = text_result
                limit = self.routing.max_unknown_token_share
                for model in list(groups):
                    readable_texts = [i for i in groups[model] if readable(tokens[i].unknown_token_share, limit)]
                    refused.update(dict.fromkeys(set(groups[model]) - set(readable_texts), Refusal.UNKNOWN_TOKENS))
                    if readable_texts:
                        groups[model] = readable_texts
                    else:
                        del groups[model]
            scored = await asyncio.gather(
                *(
                    self._score_group(
                        [tokens[i] for i in indices],
                        model,
                        model_version if model == model_name else "",
                        thresholds if model == model_name else None,
                        deadline,
                    )
                    for model, indices in groups.items()
                )
            )
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None
        results: list[Classification | None] = [None] * len(texts)
        version = model_version
        for (model, indices), (post, group_tokens) in zip(groups.items(), scored, strict=True):
            if model == model_name:
                version = post.model_version
            for index, document, text_tokens in zip(indices, post.results, group_tokens, strict=True):
                results[index] = Classification(
                    label=document.label,
                    probabilities=dict(zip(post.labels, document.probabilities, strict=True)),
                    abstained=document.abstained,
                    num_chunks=document.num_chunks,
                    num_tokens=text_tokens.num_tokens,
                    deciding_chunk=document.deciding_chunk,
                    labels=list(document.labels),
                    score=document.score if document.HasField("score") else None,
                    language=text_tokens.language,
                    language_confidence=text_tokens.language_confidence,
                    unknown_token_share=text_tokens.unknown_token_share,
                    model_name=post.model_name,
                    model_version=post.model_version,
                    heads={
                        head.name: HeadClassification(
                            label=head.label,
                            labels=list(head.labels),
                            probabilities=dict(head.probabilities),
                            abstained=head.abstained,
                            score=head.score if head.HasField("score") else None,
                        )
                        for head in document.heads
                    },
                )
        for index, reason in refused.items():
            UNSUPPORTED_LANGUAGE_TEXTS.labels(tokens[index].language or "und", reason.value).inc()
            results[index] = Classification(
                label="abstain",
                probabilities={},
                abstained=True,
                num_chunks=len(tokens[index].chunks),
                num_tokens=tokens[index].num_tokens,
                deciding_chunk=0,
                status=TextStatus.UNSUPPORTED_LANGUAGE,
                language=tokens[index].language,
                language_confidence=tokens[index].language_confidence,
                unknown_token_share=tokens[index].unknown_token_share,
            )
        return ClassifyResult(
            model_name=model_name,
            model_version=version,
            results=[result for result in results if result is not None],
        )

    async def _tokenize(
        self, texts: list[str], model_name: str, model_version: str, deadline: float
    ) -> list[tok_pb.TokenizedText]:
        tokenized = await self._tokenizer.Tokenize(
            tok_pb.TokenizeRequest(texts=texts, model_name=model_name, model_version=model_version),
            timeout=_remaining(deadline),
        )
        return list(tokenized.results)

    async def _score_group(
        self,
        tokens: list[tok_pb.TokenizedText],
        model_name: str,
        model_version: str,
        thresholds: Mapping[str, float] | None,
        deadline: float,
    ) -> tuple[post_pb.PostprocessResponse, list[tok_pb.TokenizedText]]:
        """Infers and post-processes texts one model reads; its answer, and `tokens` back.
        The logits carry every head's columns, so the post-processor answers every head."""
        rows = [
            _Row(document, index, chunk.input_ids, chunk.attention_mask)
            for document, result in enumerate(tokens)
            for index, chunk in enumerate(result.chunks)
        ]
        logits, version = await self._infer(rows, model_name, model_version, deadline)
        post = await self._postprocessor.Postprocess(
            post_pb.PostprocessRequest(
                model_name=model_name,
                model_version=version,
                logits=logits.reshape(-1).tolist(),
                num_labels=logits.shape[1],
                document_index=[row.document for row in rows],
                row_weights=[float(sum(row.attention_mask)) for row in rows],
                thresholds=dict(thresholds or {}),
            ),
            timeout=_remaining(deadline),
        )
        return post, tokens

    async def _routing_table(self, deadline: float) -> dict[str, str]:
        """Language -> model: the default model's declared languages (asked of the
        post-processor, reused for a few seconds) under the settings' routes."""
        if self.routing is None:
            return {}
        now = time.monotonic()
        if self._table is not None and now - self._table[1] < ROUTING_TABLE_TTL_SECONDS:
            return self._table[0]
        listed = await self.models(timeout_seconds=_remaining(deadline))
        languages = next((m.languages for m in listed if m.name == self.model_name), [])
        table = self.routing.table(self.model_name, languages)
        self._table = (table, now)
        return table

    async def _infer(
        self, rows: list[_Row], model_name: str, model_version: str, deadline: float
    ) -> tuple[npt.NDArray[np.float32], str]:
        """Logits per row (every head's columns), in row order, and the version that
        scored them, from as few ModelInfer calls as the row limit allows. Rows are sorted
        by length so each call pads little."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
        groups = [order[i : i + self.rows_per_infer_call] for i in range(0, len(order), self.rows_per_infer_call)]
        if not model_version:
            # Pin the version the first call gets, so every row is scored by one version.
            first_logits, model_version = await self._infer_group(
                [rows[i] for i in groups[0]], model_name, "", deadline
            )
            rest = await asyncio.gather(
                *(
                    self._infer_group([rows[i] for i in group], model_name, model_version, deadline)
                    for group in groups[1:]
                )
            )
            outputs = [first_logits, *(logits for logits, _ in rest)]
        else:
            results = await asyncio.gather(
                *(self._infer_group([rows[i] for i in group], model_name, model_version, deadline) for group in groups)
            )
            outputs = [logits for logits, _ in results]
        stacked = np.concatenate(outputs)
        logits = np.empty_like(stacked)
        logits[np.asarray(order)] = stacked
        return logits, model_version

    async def _infer_group(
        self, rows: list[_Row], model_name: str, model_version: str, deadline: float
    ) -> tuple[npt.NDArray[np.float32], str]:
        input_ids, attention_mask = pad_right([row.input_ids for row in rows])
        request = infer_pb.ModelInferRequest(
            model_name=model_name,
            model_version=model_version,
            inputs=[
                infer_pb.ModelInferRequest.InferInputTensor(
                    name="input_ids", datatype="INT64", shape=list(input_ids.shape)
                ),
                infer_pb.ModelInferRequest.InferInputTensor(
                    name="attention_mask", datatype="INT64", shape=list(attention_mask.shape)
                ),
            ],
            # No outputs named: every head's, whatever heads the version that answers has
            # (a rollout may move from a one-head version to a two-head one).
            raw_input_contents=[input_ids.tobytes(), attention_mask.tobytes()],
        )
        response = await self._inference.ModelInfer(request, timeout=_remaining(deadline))
        return logits_of(response), response.model_version

    async def models(self, timeout_seconds: float | None = None) -> list[ModelInfo]:
        """Every model in the repository (the post-processor reads it), by name."""
        try:
            reply = await self._postprocessor.ListModels(
                post_pb.ListModelsRequest(), timeout=timeout_seconds or self.timeout_seconds
            )
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None
        return [
            ModelInfo(
                name=m.name,
                versions=list(m.versions),
                serving_version=m.serving_version,
                labels=list(m.labels),
                activation=m.activation,
                languages=list(m.languages),
                scores=dict(m.scores),
                heads=[
                    HeadInfo(name=h.name, labels=list(h.labels), activation=h.activation, scores=dict(h.scores))
                    for h in m.heads
                ],
            )
            for m in reply.models
        ]


def logits_of(response: infer_pb.ModelInferResponse) -> npt.NDArray[np.float32]:
    """A ModelInfer answer's logits, every head's columns side by side as the graph gives
    them: the `logits` output (the primary head's) then each `<head>_logits`, in the
    response's order (the version's head order)."""
    parts = [
        np.asarray(
            oip.decode_raw(output.name, output.datatype, list(output.shape), response.raw_output_contents[index]),
            dtype=np.float32,
        )
        for index, output in enumerate(response.outputs)
        if output.name == "logits" or output.name.endswith("_logits")
    ]
    if not parts or parts[0].ndim != 2:
        raise InfermeshError(f"model {response.model_name!r} answered without a [rows, labels] `logits` output")
    return np.concatenate(parts, axis=1)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the pipeline's deadline ran out before the next call")
    return remaining
