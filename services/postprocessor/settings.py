from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from shared.settings import BaseServiceSettings


class PostprocessorSettings(BaseServiceSettings):
    """Settings of the post-processor (env prefix INFERMESH_POSTPROCESSOR_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_POSTPROCESSOR_", extra="ignore")

    grpc_port: int = 50052
    """Port where to listen for gRPC connections."""

    metrics_port: int = 9102
    """Port of the Prometheus `/metrics` endpoint."""

    model_repository: Path = Path("models")
    """Model repository holding each version's labels and temperature."""

    model_name: str = "finance-sentiment"
    """Default model: the one a request naming none gets (every model in the repository
    is served)."""

    scores: dict[str, dict[str, float]] = {}
    """Per model, a label -> weight score mapping used instead of its versions' own
    (`scores` in config.json), as JSON: `{"my-model": {"bad": -1, "good": 1}}`; for models
    whose config has none (an import whose labels are not recognisably sentiment)."""

    abstain_label: str = "abstain"
    """Label returned when the top probability is below its threshold."""

    max_rows: int = 65536
    """Logit rows per request."""
