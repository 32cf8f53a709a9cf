"""The tokenizer service's models: each request names a model and version (empty: the
default model, the version serving unpinned requests), and its tokenizer is built on first
use, at most `max_loaded` kept (least recently used goes first)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.tokenizer.core import Tokenizer, TokenizerLimits
from services.tokenizer.languages import LanguageDetector
from services.tokenizer.pii import PiiMasker
from shared.model_repository import ModelRepository

logger = logging.getLogger(__name__)

#: How long what a (model, version) request resolves to is reused: resolving lists the
#: model's folder and reads its rollout rule, too slow to do on every request.
RESOLVE_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class TokenizerDefaults:
    """What every model's tokenizer shares: the service's limits."""

    max_length: int
    """0: each model's max_sequence_length."""
    default_stride: int
    max_texts: int
    max_text_bytes: int


class TokenizerModels:
    """Tokenizers by (model, version), read from the repository; ModelNotFound (naming the
    models there are) for one it lacks."""

    def __init__(
        self,
        repository: ModelRepository,
        default_model: str,
        defaults: TokenizerDefaults,
        masker: PiiMasker | None = None,
        default_version: str = "",
        max_loaded: int = 8,
        detector: LanguageDetector | None = None,
    ) -> None:
        self.repository = repository
        self.default_model = default_model
        self.default_version = default_version
        self.defaults = defaults
        self.masker = masker
        self.detector = detector
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, str], Tokenizer] = OrderedDict()
        self._lock = threading.Lock()
        self._resolved: dict[tuple[str, str], tuple[tuple[str, str], float]] = {}

    def resolve(self, model_name: str = "", model_version: str = "") -> tuple[str, str]:
        """(model, version) a request means."""
        asked = (model_name, model_version)
        now = time.monotonic()
        cached = self._resolved.get(asked)
        if cached is not None and now - cached[1] < RESOLVE_TTL_SECONDS:
            return cached[0]
        resolved = self._resolve(model_name, model_version)
        if len(self._resolved) > 1024:  # names come from callers: keep the table bounded
            self._resolved.clear()
        self._resolved[asked] = (resolved, now)
        return resolved

    def _resolve(self, model_name: str, model_version: str) -> tuple[str, str]:
        name = model_name or self.default_model
        if model_version:
            return name, self.repository.resolve(name, model_version)
        if name == self.default_model and self.default_version:
            return name, self.repository.resolve(name, self.default_version)
        return name, self.repository.serving_version(name)

    def get(self, model_name: str = "", model_version: str = "") -> tuple[str, Tokenizer]:
        """(the version, its tokenizer). Building one reads a file: call it off the event
        loop when the tokenizer may not be loaded yet."""
        key = self.resolve(model_name, model_version)
        with self._lock:
            tokenizer = self._loaded.get(key)
            if tokenizer is not None:
                self._loaded.move_to_end(key)
                return key[1], tokenizer
        tokenizer = self._build(*key)
        with self._lock:
            self._loaded[key] = tokenizer
            self._loaded.move_to_end(key)
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                logger.info("tokenizer dropped %s version %s", *evicted)
        return key[1], tokenizer

    def is_loaded(self, model_name: str = "", model_version: str = "") -> bool:
        return self.resolve(model_name, model_version) in self._loaded

    def _build(self, name: str, version: str) -> Tokenizer:
        config = self.repository.config(name, version)
        defaults = self.defaults
        limits = TokenizerLimits(
            max_length=defaults.max_length or config.max_sequence_length,
            default_stride=defaults.default_stride,
            max_texts=defaults.max_texts,
            max_text_bytes=defaults.max_text_bytes,
        )
        logger.info("tokenizer loaded %s version %s", name, version)
        return Tokenizer(
            self.repository.path(name, version) / config.tokenizer,
            name,
            limits,
            masker=self.masker,
            detector=self.detector,
        )
