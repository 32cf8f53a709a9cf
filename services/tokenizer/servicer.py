"""gRPC shell over `Tokenizer`: protobuf in, core call, protobuf out."""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from services.tokenizer.core import Overflow, TokenizedText, Tokenizer
from services.tokenizer.models import TokenizerModels
from shared.grpc_server import ServicerContext
from shared.metrics import TOKENIZER_CHUNKS, TOKENIZER_TEXTS, TOKENIZER_TOKENS, TOKENIZER_TRUNCATED
from shared.pb import tokenizer_pb2 as pb
from shared.pb import tokenizer_pb2_grpc as pb_grpc

_OVERFLOW = {
    pb.OVERFLOW_UNSPECIFIED: Overflow.CHUNK,
    pb.OVERFLOW_CHUNK: Overflow.CHUNK,
    pb.OVERFLOW_TRUNCATE: Overflow.TRUNCATE,
}


def tokenized_to_pb(result: TokenizedText) -> pb.TokenizedText:
    message = pb.TokenizedText(
        num_tokens=result.num_tokens, truncated=result.truncated, unknown_token_share=result.unknown_token_share
    )
    if result.language is not None:
        message.language = result.language.language
        message.language_confidence = result.language.confidence
    for chunk in result.chunks:
        out = message.chunks.add(char_start=chunk.char_start, char_end=chunk.char_end)
        out.input_ids.extend(chunk.input_ids)
        out.attention_mask.extend(chunk.attention_mask)
        if chunk.offsets is not None:
            out.offset_starts.extend(start for start, _ in chunk.offsets)
            out.offset_ends.extend(end for _, end in chunk.offsets)
        if chunk.word_ids is not None:
            out.word_ids.extend(chunk.word_ids)
    return message


class TokenizerServicer(pb_grpc.TokenizerServiceServicer):
    def __init__(self, models: TokenizerModels) -> None:
        self._models = models

    async def _tokenizer(self, model_name: str, model_version: str) -> tuple[str, Tokenizer]:
        if self._models.is_loaded(model_name, model_version):
            return self._models.get(model_name, model_version)
        return await asyncio.to_thread(self._models.get, model_name, model_version)

    async def Tokenize(self, request: pb.TokenizeRequest, context: ServicerContext) -> pb.TokenizeResponse:
        _, tokenizer = await self._tokenizer(request.model_name, request.model_version)
        results = await tokenizer.tokenize_async(
            list(request.texts),
            max_length=request.max_length or None,
            stride=request.stride or None,
            overflow=_OVERFLOW.get(request.overflow, Overflow.CHUNK),
            return_offsets=request.return_offsets,
        )
        tokens = sum(r.num_tokens for r in results)
        chunks = sum(len(r.chunks) for r in results)
        # The server span is the tokenization span: no second span for the same time.
        trace.get_current_span().set_attributes(
            {
                "infermesh.texts": len(results),
                "infermesh.tokens": tokens,
                "infermesh.chunks": chunks,
                "infermesh.pii_masked": sum(r.masked for r in results),
            }
        )
        TOKENIZER_TEXTS.inc(len(results))
        TOKENIZER_TOKENS.inc(tokens)
        TOKENIZER_CHUNKS.inc(chunks)
        TOKENIZER_TRUNCATED.inc(sum(r.truncated for r in results))
        return pb.TokenizeResponse(results=[tokenized_to_pb(r) for r in results])

    async def GetTokenizerInfo(
        self, request: pb.GetTokenizerInfoRequest, context: ServicerContext
    ) -> pb.GetTokenizerInfoResponse:
        version, tokenizer = await self._tokenizer(request.model_name, request.model_version)
        limits = tokenizer.limits
        return pb.GetTokenizerInfoResponse(
            model_name=tokenizer.model_name,
            model_version=version,
            vocab_size=tokenizer.vocab_size,
            max_length=limits.max_length,
            default_stride=limits.default_stride,
            max_texts=limits.max_texts,
            max_text_bytes=limits.max_text_bytes,
        )
