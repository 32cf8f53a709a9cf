"""Text to model inputs with the model's own tokenizer (Rust `tokenizers`).

Long texts are never cut silently: by default they become overlapping chunks that
together cover every token, and the caller aggregates the chunks' predictions.

With a `PiiMasker`, personal data is swapped for placeholders ("[EMAIL]") before the
text is tokenized; offsets still index the caller's text (see `Chunk.offsets`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding
from tokenizers import Tokenizer as RustTokenizer

from services.tokenizer.languages import DetectedLanguage, LanguageDetector
from services.tokenizer.pii import MaskedText, PiiMasker
from shared.errors import InputTooLarge, InvalidInput

#: [CLS] and [SEP] around every chunk.
SPECIAL_TOKENS_PER_CHUNK = 2
#: Tokenizer instances kept for distinct (max_length, stride) requests.
WINDOW_CACHE_SIZE = 16
#: Requests up to this many characters are tokenized on the event loop.
INLINE_CHARACTERS = 4096


class Overflow(enum.Enum):
    CHUNK = "chunk"
    TRUNCATE = "truncate"


@dataclass(frozen=True)
class Chunk:
    input_ids: list[int]
    attention_mask: list[int]
    offsets: list[tuple[int, int]] | None
    """Character span of each token in the original text; (0, 0) for special tokens. The
    tokens of a PII placeholder each span all of the original text it replaced."""
    word_ids: list[int] | None
    """Word index of each token; -1 for special tokens. A placeholder's tokens are one word."""
    char_start: int
    char_end: int


@dataclass(frozen=True)
class TokenizedText:
    chunks: list[Chunk]
    num_tokens: int
    """Tokens in the whole text, special tokens not counted."""
    truncated: bool
    masked: int = 0
    """PII spans replaced by placeholders before tokenizing."""
    language: DetectedLanguage | None = None
    """The text's detected language; None when the tokenizer has no detector."""
    unknown_token_share: float = 0.0
    """Share of the chunks' tokens (special tokens not counted) that are the tokenizer's
    unknown token: how much of the text the model cannot read. Always 0 for a tokenizer
    without one (byte-level BPE spells every text in bytes)."""


@dataclass(frozen=True)
class TokenizerLimits:
    max_length: int
    """Tokens per chunk the model accepts, special tokens included."""
    default_stride: int
    """Tokens shared by consecutive chunks unless the request says otherwise."""
    max_texts: int
    """Texts per request."""
    max_text_bytes: int
    """UTF-8 bytes per text."""


class Tokenizer:
    """The tokenizer service's core: validation, truncation and chunking, no transport."""

    def __init__(
        self,
        tokenizer_json: Path,
        model_name: str,
        limits: TokenizerLimits,
        masker: PiiMasker | None = None,
        detector: LanguageDetector | None = None,
    ) -> None:
        self.model_name = model_name
        self.limits = limits
        self.masker = masker
        self.detector = detector
        self._definition = tokenizer_json.read_text(encoding="utf-8")
        base = RustTokenizer.from_str(self._definition)
        self.vocab_size = base.get_vocab_size()
        self.unk_token_id = unknown_token_id(base)
        # A Rust tokenizer carries its truncation settings, so each (max_length, stride)
        # gets its own instance; building one takes ~10 ms, so they are kept.
        self._by_window: OrderedDict[tuple[int, int], RustTokenizer] = OrderedDict()
        self._lock = threading.Lock()
        if limits.default_stride >= limits.max_length - SPECIAL_TOKENS_PER_CHUNK:
            raise ValueError("default stride must be smaller than the chunk's content length")

    def _for_window(self, max_length: int, stride: int) -> RustTokenizer:
        key = (max_length, stride)
        with self._lock:
            tokenizer = self._by_window.get(key)
            if tokenizer is None:
                tokenizer = RustTokenizer.from_str(self._definition)
                tokenizer.no_padding()
                # "[SEP]" or "[PAD]" typed in a text is text, not a control token the
                # caller could slip into the model's input.
                tokenizer.encode_special_tokens = True
                tokenizer.enable_truncation(max_length, stride=stride, strategy="longest_first")
                self._by_window[key] = tokenizer
                if len(self._by_window) > WINDOW_CACHE_SIZE:
                    self._by_window.popitem(last=False)
            self._by_window.move_to_end(key)
            return tokenizer

    def validate(self, texts: Sequence[str], max_length: int, stride: int) -> None:
        limits = self.limits
        if not texts:
            raise InvalidInput("texts is empty; send at least one text")
        if len(texts) > limits.max_texts:
            raise InputTooLarge(f"request has {len(texts)} texts; max is {limits.max_texts}")
        if not SPECIAL_TOKENS_PER_CHUNK < max_length <= limits.max_length:
            raise InvalidInput(f"max_length is {max_length}; it must be in 3..{limits.max_length}")
        if not 0 <= stride < max_length - SPECIAL_TOKENS_PER_CHUNK:
            raise InvalidInput(
                f"stride is {stride}; it must be in 0..max_length - {SPECIAL_TOKENS_PER_CHUNK} - 1 ({max_length - 3})"
            )
        for index, text in enumerate(texts):
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as error:
                # Only a Python caller can send one (protobuf strings are valid UTF-8).
                raise InvalidInput(
                    f"text {index} is not valid Unicode: a lone surrogate at character {error.start}"
                ) from None
            if size > limits.max_text_bytes:
                raise InputTooLarge(f"text {index} has {size} bytes; max is {limits.max_text_bytes}")
            if not text.strip():
                raise InvalidInput(f"text {index} is empty")

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        stride: int | None = None,
        overflow: Overflow = Overflow.CHUNK,
        return_offsets: bool = False,
    ) -> list[TokenizedText]:
        """Tokenizes `texts`; one result per text, in order. Blocking: see `tokenize_async`."""
        max_length = max_length or self.limits.max_length
        if stride is None:
            # A request for short chunks must not fail on the default overlap.
            stride = min(self.limits.default_stride, (max_length - SPECIAL_TOKENS_PER_CHUNK) // 2)
        self.validate(texts, max_length, stride)
        masked = [self.masker.mask(text) for text in texts] if self.masker is not None else None
        tokenizer = self._for_window(max_length, stride)
        encodings = tokenizer.encode_batch([m.text for m in masked] if masked is not None else list(texts))
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) <= SPECIAL_TOKENS_PER_CHUNK:
                raise InvalidInput(f"text {index} has no tokens (only invisible or control characters)")
        return [
            self._with_language(
                self._to_result(
                    encoding,
                    texts[index],
                    stride,
                    overflow,
                    return_offsets,
                    masked[index] if masked is not None else None,
                ),
                texts[index],
            )
            for index, encoding in enumerate(encodings)
        ]

    def _with_language(self, result: TokenizedText, text: str) -> TokenizedText:
        unknown = 0.0
        if self.unk_token_id is not None:
            # Special tokens ([CLS], [SEP]) are never the unknown token, so counting them out
            # of the total is enough; an overlap's tokens count once per chunk they are in.
            content = sum(len(chunk.input_ids) - SPECIAL_TOKENS_PER_CHUNK for chunk in result.chunks)
            unknowns = sum(chunk.input_ids.count(self.unk_token_id) for chunk in result.chunks)
            unknown = unknowns / content if content > 0 else 0.0
        language = self.detector.detect(text) if self.detector is not None else None
        return dataclasses.replace(result, language=language, unknown_token_share=unknown)

    async def tokenize_async(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        stride: int | None = None,
        overflow: Overflow = Overflow.CHUNK,
        return_offsets: bool = False,
    ) -> list[TokenizedText]:
        if sum(len(text) for text in texts) <= INLINE_CHARACTERS:
            # A few headlines tokenize in microseconds, less than a thread hand-off costs.
            return self.tokenize(texts, max_length, stride, overflow, return_offsets)
        return await asyncio.to_thread(self.tokenize, texts, max_length, stride, overflow, return_offsets)

    @staticmethod
    def _to_result(
        encoding: Encoding, text: str, stride: int, overflow: Overflow, return_offsets: bool, masked: MaskedText | None
    ) -> TokenizedText:
        windows = [encoding, *encoding.overflowing]
        content = [len(w.ids) - SPECIAL_TOKENS_PER_CHUNK for w in windows]
        num_tokens = sum(content) - stride * (len(windows) - 1)
        if overflow is Overflow.TRUNCATE:
            windows = windows[:1]
        words = _placeholder_words(windows, masked) if masked is not None and masked.replacements else {}
        return TokenizedText(
            chunks=[_to_chunk(w, text, return_offsets, masked, words) for w in windows],
            num_tokens=num_tokens,
            truncated=overflow is Overflow.TRUNCATE and len(encoding.overflowing) > 0,
            masked=len(masked.replacements) if masked is not None else 0,
        )


def unknown_token_id(tokenizer: RustTokenizer) -> int | None:
    """The id of the tokenizer's unknown token (WordPiece's and BPE's `unk_token`, Unigram's
    `unk_id`), or None when it has none: byte-level BPE can spell any text in bytes."""
    model = json.loads(tokenizer.to_str()).get("model", {})
    if model.get("type") == "Unigram":
        unk_id = model.get("unk_id")
        return int(unk_id) if unk_id is not None else None
    token = model.get("unk_token")
    if not token:
        return None
    token_id = tokenizer.token_to_id(token)
    return int(token_id) if token_id is not None else None


def _placeholder_words(windows: list[Encoding], masked: MaskedText) -> dict[int, int]:
    """Word id of each word inside a placeholder -> the placeholder's first word id, so
    that "[", "email", "]" read as one word (across chunks too: windows share word ids)."""
    first: dict[int, int] = {}
    members: dict[int, int] = {}
    for window in windows:
        tokens = zip(window.offsets, window.word_ids, window.special_tokens_mask, strict=True)
        for (start, _), word, is_special in tokens:
            index = masked.placeholder_at(start)
            if is_special or word is None or index is None:
                continue
            first[index] = min(first.get(index, word), word)
            members[word] = index
    return {word: first[index] for word, index in members.items()}


def _trimmed(span: tuple[int, int], text: str) -> tuple[int, int]:
    """`span` without the white space at its ends. Byte-level BPE ("Ġword") and
    SentencePiece ("▁word") tokens carry the space before their word, and a tokenizer
    saved without `trim_offsets` reports it in the offsets; the explainer joins a word's
    tokens from first start to last end, so a word must not begin with a space. A token
    that is only white space (a lone "Ġ" or "▁" before its word's other pieces) becomes
    empty where the white space ends, which is where its word starts."""
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    if start == end:
        return (end, end)
    while text[end - 1].isspace():
        end -= 1
    return (start, end)


def _to_chunk(
    encoding: Encoding, text: str, return_offsets: bool, masked: MaskedText | None, words: dict[int, int]
) -> Chunk:
    offsets = encoding.offsets
    special = encoding.special_tokens_mask
    if masked is not None and masked.replacements:
        offsets = [
            (0, 0) if is_special else masked.to_original(*span)
            for span, is_special in zip(offsets, special, strict=True)
        ]
    if return_offsets:
        offsets = [
            span if is_special else _trimmed(span, text) for span, is_special in zip(offsets, special, strict=True)
        ]
    spans = [span for span, is_special in zip(offsets, special, strict=True) if not is_special]
    char_start = _trimmed(spans[0], text)[0] if spans else 0
    char_end = _trimmed(spans[-1], text)[1] if spans else 0
    return Chunk(
        input_ids=list(encoding.ids),
        attention_mask=list(encoding.attention_mask),
        offsets=[(int(s), int(e)) for s, e in offsets] if return_offsets else None,
        word_ids=[-1 if w is None else words.get(w, w) for w in encoding.word_ids] if return_offsets else None,
        char_start=char_start,
        char_end=char_end,
    )
