"""Which language a text is written in, for routing it to a model that reads it.

py3langid (langid.py's naive Bayes over byte n-grams, its model inside the wheel, nothing
downloaded) restricted to the languages finance text comes in: its full model also knows
Nigerian Pidgin, Latin and Luxembourgish, and answered one of those for 4% of short English
headlines. URLs, cashtags, hashtags and mentions are dropped before it looks: they are
not language, and "$NKE https://t.co/..." pulled headlines away from English.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from py3langid.langid import MODEL_FILE, LanguageIdentifier

#: ISO 639-1 codes of the languages a text may be detected as (each must be one
#: py3langid knows); a text in another is reported as the closest of these.
# fmt: off
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "ar", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "et", "fa", "fi", "fr", "he", "hi", "hr", "hu",
    "id", "it", "ja", "ko", "lt", "lv", "ms", "nl", "no", "pl", "pt", "ro", "ru", "sk", "sl", "sr", "sv", "th",
    "tr", "uk", "vi", "zh",
)
# fmt: on
#: What a text with nothing to go on (only digits, symbols, URLs) is reported as.
UNDETERMINED = "und"

_NOISE = re.compile(r"https?://\S+|www\.\S+|[$#@][A-Za-z][\w.]*")


@dataclass(frozen=True)
class DetectedLanguage:
    language: str
    """ISO 639-1 code, or `und`."""
    confidence: float
    """The identifier's probability of `language`, in [0, 1]."""


class LanguageDetector:
    """Detects the language of texts; one instance per process (loading takes ~0.5 s)."""

    def __init__(self, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> None:
        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        unknown = sorted(set(candidates) - set(self._identifier.labels))
        if unknown or not candidates:
            known = ", ".join(self._identifier.labels)
            raise ValueError(f"language candidates {unknown or '[]'} unknown; py3langid knows {known}")
        self._identifier.set_languages(list(candidates))
        # set_languages swaps the identifier's tables: one detection at a time keeps it simple
        # (~40 µs a headline).
        self._lock = threading.Lock()

    def detect(self, text: str) -> DetectedLanguage:
        cleaned = _NOISE.sub(" ", text)
        if not any(character.isalpha() for character in cleaned):
            return DetectedLanguage(UNDETERMINED, 0.0)
        with self._lock:
            language, confidence = self._identifier.classify(cleaned)
        return DetectedLanguage(str(language), float(confidence))
