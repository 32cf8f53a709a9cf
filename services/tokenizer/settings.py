from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.tokenizer.languages import DEFAULT_CANDIDATES
from services.tokenizer.pii import PiiKind
from shared.settings import BaseServiceSettings


class TokenizerSettings(BaseServiceSettings):
    """Settings of the tokenizer service (env prefix INFERMESH_TOKENIZER_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_TOKENIZER_", extra="ignore")

    grpc_port: int = 50051
    """Port where to listen for gRPC connections."""

    metrics_port: int = 9101
    """Port of the Prometheus `/metrics` endpoint."""

    model_repository: Path = Path("models")
    """Model repository the tokenizer file is read from."""

    model_name: str = "finance-sentiment"
    """Default model: the one a request naming none gets (every model in the repository
    is served)."""

    model_version: str = ""
    """The default model's version for requests pinning none; empty means the version the
    rollout rule serves, else the latest."""

    max_loaded_models: int = 8
    """(model, version) tokenizers kept in memory; the least recently used goes first."""

    max_length: int = 0
    """Tokens per chunk, special tokens included; 0 means the model's max_sequence_length."""

    stride: int = 32
    """Tokens shared by consecutive chunks of a long text."""

    max_texts: int = 512
    """Texts per request."""

    max_text_bytes: int = 256 * 1024
    """UTF-8 bytes per text."""

    mask_pii: bool = False
    """Replace emails, phone numbers, card numbers and IBANs in texts with placeholders
    ("[EMAIL]", "[PHONE]", "[CARD]", "[ACCOUNT]") before tokenizing."""

    mask_pii_kinds: list[PiiKind] = list(PiiKind)
    """What `mask_pii` masks, as JSON: `["email", "phone", "card", "account"]`."""

    detect_language: bool = True
    """Report each text's language (`TokenizedText.language`), which the gateway and worker
    route by (docs/models.md, "Languages")."""

    language_candidates: list[str] = list(DEFAULT_CANDIDATES)
    """ISO 639-1 codes a text may be detected as, as JSON; a text in another language is
    reported as the closest of these. Each must be one py3langid knows."""
