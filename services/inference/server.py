"""Composition root of the inference service."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version
from pathlib import Path

import grpc

from services.inference.autotune import AutotuneConfig, autotune_version, log_choice, report_choice
from services.inference.backends.base import Backend
from services.inference.control import ModelControl
from services.inference.core import InferenceCore, Limits, VersionPolicy
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from shared.batching import BatchPolicy
from shared.cpu import read_cpu
from shared.grpc_server import (
    RunningServer,
    exit_on_startup_error,
    start_metrics,
    start_server,
    wait_for_termination_signal,
)
from shared.model_repository import ModelConfig, ModelRepository
from shared.model_store import StoreFollower
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


#: Length buckets for backends that run fixed shapes (TensorRT profiles, CUDA graphs).
STATIC_SHAPE_BUCKETS = (16, 32, 64, 128)


def resolve_backend(settings: InferenceSettings) -> tuple[str, str]:
    """(backend, device) for this machine: `auto` is ONNX Runtime, the backend the tests
    and benchmarks run; device `auto` picks CUDA where the backend can. On CPU, `auto`
    then measures per version which backend and variant to run (`measures_cpu_backends`).

    `auto` never picks TensorRT, even where it is installed: that backend has never run
    (see docs/backends.md), and a path that never ran must not become a default because
    a package happens to be present. It is used only when named."""
    import onnxruntime

    from services.inference.backends.pytorch import cuda_available

    backend = "onnxruntime" if settings.backend == "auto" else settings.backend
    if backend == "tensorrt":
        logger.warning("backend tensorrt was chosen explicitly; it has never been run by infermesh's tests")
    if settings.device != "auto":
        return backend, settings.device
    if backend in ("torch", "tensorrt"):
        return backend, "cuda" if cuda_available() else "cpu"
    return backend, "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def measures_cpu_backends(settings: InferenceSettings, backend: str, device: str) -> bool:
    """Whether each version's CPU backend is chosen by measurement (autotune.py): backend
    `auto` landing on CPU, autotune on, and no variant named (a named variant is a choice)."""
    return (
        settings.backend == "auto"
        and backend == "onnxruntime"
        and device == "cpu"
        and settings.autotune
        and not settings.variant
    )


def autotune_settings(settings: InferenceSettings) -> AutotuneConfig:
    return AutotuneConfig(
        budget_seconds=settings.autotune_budget_seconds,
        objective=settings.autotune_objective,
        margin=settings.autotune_margin,
        agreement_floor=settings.autotune_agreement_floor,
        min_trials=settings.autotune_min_trials,
        max_trials=settings.autotune_max_trials,
        cache_dir=settings.autotune_cache_dir,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.allow_spinning,
    )


def build_core(settings: InferenceSettings) -> InferenceCore:
    backend, device = resolve_backend(settings)
    measured = measures_cpu_backends(settings, backend, device)
    cpu = read_cpu() if measured else None
    static_shapes = backend == "tensorrt" or (backend == "torch" and device == "cuda" and settings.cuda_graphs)
    buckets = tuple(settings.length_buckets) or (STATIC_SHAPE_BUCKETS if static_shapes else ())
    logger.info("backend %s on %s, length buckets %s", backend, device, list(buckets) or "none")

    policy = BatchPolicy(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue_delay_seconds=settings.max_queue_delay_ms / 1000,
        max_queue_size=settings.max_queue_size,
        max_concurrent_batches=settings.max_concurrent_batches,
        length_buckets=buckets,
    )

    def make_backend(config: ModelConfig, path: Path) -> Backend:
        if cpu is not None:
            choice = autotune_version(path, config, cpu, autotune_settings(settings))
            log_choice(choice.record)
            report_choice(config.name, config.version, choice.backend, choice.variant, choice.source)
            if choice.loaded is not None:
                return choice.loaded
            if choice.backend == "torch":
                from services.inference.backends.pytorch import TorchBackend

                return TorchBackend(path / "hf", device="cpu", dtype=choice.variant, threads=settings.intra_op_threads)
            return make_onnxruntime(config, path, choice.variant)
        chosen = make_named_backend(config, path)
        variant = getattr(chosen, "dtype", "") if backend == "torch" else settings.variant or config.default_variant
        report_choice(config.name, config.version, backend, variant if backend != "tensorrt" else "fp16", "setting")
        return chosen

    def make_onnxruntime(config: ModelConfig, path: Path, variant: str) -> Backend:
        from services.inference.backends.onnxruntime import OnnxRuntimeBackend

        if variant not in config.variants:
            raise ValueError(f"model {config.name} has no variant {variant!r}; it has {sorted(config.variants)}")
        return OnnxRuntimeBackend(
            path / config.variants[variant],
            intra_op_threads=settings.intra_op_threads,
            allow_spinning=settings.allow_spinning,
            device=device,
        )

    def make_named_backend(config: ModelConfig, path: Path) -> Backend:
        if backend == "tensorrt":
            from services.inference.backends.tensorrt import (
                TensorRTBackend,
                cached_engine,
                engine_spec,
                length_profiles,
            )

            fp32 = config.variants.get("fp32")
            if fp32 is None:
                raise ValueError(f"model {config.name} has no fp32 ONNX variant to build a TensorRT engine from")
            # The profiles must cover the shapes this model's batches will have.
            model_policy = config.dynamic_batching.apply(policy)
            profiles = length_profiles(
                model_policy.length_buckets, model_policy.max_batch_size, config.max_sequence_length
            )
            spec = engine_spec(
                config.sha256.get(fp32, ""), profiles, settings.tensorrt_fp16, settings.tensorrt_workspace_mb << 20
            )
            engine, file, built = cached_engine(path / fp32, spec, settings.engine_cache_dir or path / "engines")
            logger.info("TensorRT engine %s (%s)", file.name, "built now" if built else "from the cache")
            return TensorRTBackend(engine, profiles, len(config.labels))
        if backend == "torch":
            from services.inference.backends.pytorch import TorchBackend, auto_dtype

            return TorchBackend(
                path / "hf",
                device=device,
                dtype=auto_dtype(device) if settings.torch_dtype == "auto" else settings.torch_dtype,
                cuda_graphs=settings.cuda_graphs,
                threads=settings.intra_op_threads,
            )
        return make_onnxruntime(config, path, settings.variant or config.default_variant)

    return InferenceCore(
        ModelRepository(settings.model_repository),
        make_backend,
        policy,
        model_names=settings.models or None,
        limits=Limits(max_sequences_per_request=settings.max_sequences_per_request),
        version_policy=VersionPolicy(latest=settings.versions_to_serve, specific=tuple(settings.versions)),
    )


async def start(settings: InferenceSettings) -> tuple[RunningServer, InferenceCore]:
    """Binds first (health NOT_SERVING), loads the models, then reports SERVING."""
    core = build_core(settings)
    control = ModelControl(settings.model_control_mode, settings.admin_token)
    logger.info("model control mode %s", control.mode)

    def register(server: grpc.aio.Server) -> None:
        servicer = InferenceServicer(core, version("infermesh"), control)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    running = await start_server(settings, register, [SERVICE_NAME])
    try:
        await core.load()
    except BaseException:
        await running.stop(0)
        await core.close()
        raise
    await running.set_serving(True)
    logger.info("inference serving on %s:%d", settings.host, running.port)
    return running, core


async def poll_repository(core: InferenceCore, every_seconds: float) -> None:
    """Triton's poll mode: versions appearing or disappearing on disk follow the policy."""
    while True:
        await asyncio.sleep(every_seconds)
        await core.refresh()


async def serve(settings: InferenceSettings, follower: StoreFollower | None = None) -> None:
    """`follower`: the model store's follower (shared/model_store.py), already past its
    first pass; each pass that changes the repository folder reloads as a poll does."""
    metrics = start_metrics(settings)
    with exit_on_startup_error("inference", metrics):
        running, core = await start(settings)
    if follower is not None:
        follower.on_change = core.refresh
    poller = None
    if settings.repository_poll_seconds > 0:
        poller = asyncio.create_task(poll_repository(core, settings.repository_poll_seconds))
    await wait_for_termination_signal()
    if poller is not None:
        poller.cancel()
    await running.stop(settings.shutdown_grace_seconds)
    await core.close()
    if metrics is not None:
        metrics.stop()
