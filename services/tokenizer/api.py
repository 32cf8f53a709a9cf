"""The tokenizer as a library: what another process may import to tokenize exactly as the
tokenizer service does, in process. The explainer does (its attributions need every
chunk's token offsets and word ids, and it runs integrated gradients on those very ids).
Everything else under services/tokenizer is the service's own and may change with it.
"""

from __future__ import annotations

from collections.abc import Collection

from services.tokenizer.core import Chunk, TokenizedText, Tokenizer, TokenizerLimits
from services.tokenizer.pii import PiiKind, PiiMasker
from shared.model_repository import ModelRepository

__all__ = ["DEFAULT_STRIDE", "Chunk", "PiiKind", "TokenizedText", "Tokenizer", "version_tokenizer"]

DEFAULT_STRIDE = 32
"""Tokens shared by consecutive chunks of a long text: the tokenizer service's default
(`INFERMESH_TOKENIZER_STRIDE`)."""


def version_tokenizer(
    repository: ModelRepository,
    name: str,
    version: str,
    max_texts: int,
    max_text_bytes: int,
    mask_pii: Collection[PiiKind] | None = None,
    stride: int = DEFAULT_STRIDE,
) -> Tokenizer:
    """The tokenizer of `name` version `version`, chunking at the version's
    `max_sequence_length` as the tokenizer service does; `mask_pii`: the kinds of personal
    data to mask before tokenizing (None: none), as the service's `mask_pii_kinds`. Reads
    files: call it off the event loop."""
    config = repository.config(name, version)
    limits = TokenizerLimits(config.max_sequence_length, stride, max_texts, max_text_bytes)
    masker = PiiMasker(mask_pii) if mask_pii is not None else None
    return Tokenizer(repository.path(name, version) / config.tokenizer, name, limits, masker=masker)
