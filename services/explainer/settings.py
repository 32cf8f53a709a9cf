from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.tokenizer.api import PiiKind
from shared.settings import BaseServiceSettings


class ExplainerSettings(BaseServiceSettings):
    """Settings of the explainer (env prefix INFERMESH_EXPLAINER_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_EXPLAINER_", extra="ignore")

    grpc_port: int = 50053
    """Port where to listen for gRPC connections."""

    metrics_port: int = 9103
    """Port of the Prometheus `/metrics` endpoint."""

    model_repository: Path = Path("models")
    """Model repository: the tokenizer, the merged weights (hf/) and the labels come from here."""

    model_name: str = "finance-sentiment"
    """Default model: the one a request naming none gets (every model in the repository
    can be explained)."""

    model_version: str = ""
    """Version for requests that name none; empty: the version the rollout rule serves, else
    the latest. Requests may name any version (the one their prediction came from)."""

    max_loaded_versions: int = 2
    """(model, version) explainers kept in memory (each holds its weights for integrated
    gradients); the least recently used goes first."""

    inference: str = "127.0.0.1:8001"
    """Inference service address (occlusion and faithfulness are scored there)."""

    max_texts: int = 8
    """Texts per request."""

    max_text_bytes: int = 20_000
    """UTF-8 bytes per text."""

    max_chunks: int = 8
    """Chunks per text."""

    default_steps: int = 32
    """Integrated-gradients steps when the request gives none."""

    max_steps: int = 256
    """Integrated-gradients steps at most."""

    max_gradient_token_steps: int = Field(default=32_768, gt=0)
    """Integrated-gradient work one request may ask for: tokens x steps, summed over every
    chunk of every text (INVALID_ARGUMENT naming the figure beyond). A 20-token headline at
    the default 32 steps costs 640; the default is one full 128-token chunk at 256 steps,
    about 30 s of one CPU thread, the explainer's own deadline cap."""

    max_running_requests: int = Field(default=2, ge=1)
    """Explain calls worked on at once (integrated gradients of one version run one at a
    time anyway; occlusion mostly waits on the inference service)."""

    max_queued_requests: int = Field(default=8, ge=0)
    """Explain calls waiting for a turn; past it a call gets RESOURCE_EXHAUSTED at once
    (429 through the gateway). A waiting call whose deadline passes never starts."""

    torch_threads: int = 1
    """Threads for the gradient computation (the inference service needs the other cores)."""

    mask_pii: bool = False
    """Mask personal data before the model sees it, as the tokenizer's `mask_pii` does: set
    both alike, so an explanation explains the text that was classified."""

    mask_pii_kinds: list[PiiKind] = list(PiiKind)
    """What `mask_pii` masks, as JSON: `["email", "phone", "card", "account"]`."""
