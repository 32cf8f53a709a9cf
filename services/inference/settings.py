from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import BaseServiceSettings

#: Shortest admin token accepted (`python -c "import secrets; print(secrets.token_urlsafe(32))"` makes one).
MIN_ADMIN_TOKEN_CHARS = 16


class InferenceSettings(BaseServiceSettings):
    """Settings of the inference service (env prefix INFERMESH_INFERENCE_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_INFERENCE_", extra="ignore")

    grpc_port: int = 8001
    """Port where to listen for gRPC connections (Triton's, so stock clients need no flags)."""

    metrics_port: int = 8002
    """Port of the Prometheus `/metrics` endpoint (Triton's metrics port)."""

    model_repository: Path = Path("models")
    """Folder holding `<name>/<version>/config.json`."""

    models: list[str] = []
    """Models to load; empty means every model in the repository."""

    versions_to_serve: int = 1
    """How many of each model's newest versions to load; requests may pin any of them."""

    versions: list[str] = []
    """Exactly these versions of each model instead of the newest `versions_to_serve`."""

    repository_poll_seconds: float = 0.0
    """Look at the repository this often and load or unload versions as the version policy
    says (0: only at start and, with `model_control_mode` explicit, on RepositoryModelLoad/Unload
    calls)."""

    model_control_mode: Literal["none", "explicit"] = "none"
    """Who may load and unload versions while serving (Triton's `--model-control-mode`).
    none: RepositoryModelLoad/Unload answer FAILED_PRECONDITION; what serves changes only
    by restart or the repository poll. explicit: they work for callers presenting
    `admin_token` as `authorization: Bearer <token>` metadata (UNAUTHENTICATED otherwise).
    Both modes load the version policy's versions at start."""

    admin_token: SecretStr | None = None
    """The credential of RepositoryModelLoad/Unload in explicit mode (at least 16
    characters; from a secret, never a manifest). Send it over TLS (INFERMESH_TLS_*)."""

    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    """Execution backend. auto: ONNX Runtime (on CUDA when onnxruntime-gpu sees a GPU).
    auto never picks TensorRT, which has never run (docs/backends.md); name it to use it."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backend runs; auto picks CUDA when the backend can use it here."""

    torch_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """torch backend precision. auto: fp16 on CUDA, bf16 on CPUs with AMX, else fp32."""

    cuda_graphs: bool = True
    """torch on CUDA: capture one CUDA graph per (batch, length bucket) shape."""

    engine_cache_dir: Path | None = None
    """Where TensorRT engines are cached; default: `engines/` in each version's folder."""

    tensorrt_workspace_mb: int = 2048
    """TensorRT builder workspace limit."""

    tensorrt_fp16: bool = True
    """Build TensorRT engines with FP16 kernels."""

    variant: str = ""
    """Model file variant (e.g. `int8`, `fp32`); empty means the model's default."""

    intra_op_threads: int = 0
    """ONNX Runtime threads per batch; 0 lets ONNX Runtime use every core."""

    allow_spinning: bool = False
    """Let ONNX Runtime threads spin between batches (faster alone, worse on shared cores)."""

    max_batch_size: int = 64
    """Sequences per batch."""

    max_batch_tokens: int = 8192
    """Padded tokens per batch (longest sequence times sequences)."""

    max_queue_delay_ms: float = 0.0
    """How long a batch waits for more sequences once it has one. 0 suits one CPU model
    executing one batch at a time: requests that arrive while a batch runs queue up and
    form the next batch anyway, and an idle model should not wait."""

    max_queue_size: int = 2048
    """Sequences waiting at most; beyond it requests get RESOURCE_EXHAUSTED."""

    max_concurrent_batches: int = 1
    """Batches executing at once."""

    length_buckets: list[int] = []
    """Ascending sequence-length edges (e.g. [16, 32, 64, 128]): a batch holds one bucket's
    sequences, so short ones are not padded to a long neighbour. Empty: the backend's
    default (none for ONNX Runtime on CPU: first come, first served, padded to the batch's
    longest; 16/32/64/128 for TensorRT and CUDA graphs, which need fixed shapes)."""

    max_sequences_per_request: int = 1024
    """Rows per ModelInfer request."""

    @model_validator(mode="after")
    def _explicit_control_needs_a_token(self) -> InferenceSettings:
        token = self.admin_token.get_secret_value() if self.admin_token is not None else ""
        if self.model_control_mode == "explicit" and len(token.strip()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"model_control_mode explicit needs admin_token (INFERMESH_INFERENCE_ADMIN_TOKEN) of at least "
                f"{MIN_ADMIN_TOKEN_CHARS} characters; without one, anyone reaching the port could unload the model"
            )
        return self

    @model_validator(mode="after")
    def _a_request_fits_the_queue(self) -> InferenceSettings:
        if self.max_sequences_per_request > self.max_queue_size:
            raise ValueError(
                f"max_sequences_per_request ({self.max_sequences_per_request}) must not exceed "
                f"max_queue_size ({self.max_queue_size}): such a request could never be queued"
            )
        return self
