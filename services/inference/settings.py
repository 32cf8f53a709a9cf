from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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
    """Execution backend. auto: ONNX Runtime on CUDA when onnxruntime-gpu sees a GPU; on
    CPU, what `autotune` measures fastest there (ONNX Runtime int8 unless another is faster
    by `autotune_margin`). auto never picks TensorRT, which has never run (docs/backends.md);
    name it to use it."""

    autotune: bool = True
    """backend auto on CPU: time the candidates (ONNX Runtime int8 and fp32, torch bf16 where
    the CPU has AMX) when a version loads and run the fastest (docs/backends.md). False:
    ONNX Runtime with the version's default variant, unmeasured."""

    autotune_budget_seconds: float = Field(default=10.0, gt=0)
    """Longest a version's measurement may take, loading included; the decision is cached."""

    autotune_objective: Literal["latency", "throughput", "balanced"] = "latency"
    """What the measurement weighs: latency (mostly batch 1: a person waiting on one
    headline), throughput (mostly batch 32: bulk scoring), or balanced (all shapes alike)."""

    autotune_margin: float = Field(default=0.10, ge=0)
    """How much faster than the default (ONNX Runtime int8) another candidate must be to
    replace it: 0.10 means 1.10x on the weighted shapes."""

    autotune_agreement_floor: float = Field(default=0.99, ge=0, le=1)
    """Least share of inputs a candidate must label as ONNX Runtime fp32 does."""

    autotune_min_trials: int = Field(default=3, ge=1)
    """Interleaved rounds needed before anything but the default may be chosen."""

    autotune_max_trials: int = Field(default=15, ge=1)
    """Rounds after which the measurement stops even with budget left."""

    autotune_cache_dir: Path | None = None
    """Where decisions are cached, one small JSON file per (version files, CPU model and
    kernel flags, settings); default `$XDG_CACHE_HOME/infermesh/autotune` (~/.cache/...)."""

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
