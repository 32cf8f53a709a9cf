"""OIP v2 (`inference.GRPCInferenceService`) gRPC shell over `InferenceCore`."""

from __future__ import annotations

from services.inference.control import ModelControl
from services.inference.converters import metadata_to_pb, request_from_pb, response_to_pb, served_metadata
from services.inference.core import InferenceCore, VersionPolicy
from shared.errors import InvalidInput
from shared.grpc_server import ServicerContext
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

SERVER_NAME = "infermesh"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, server_version: str, control: ModelControl | None = None) -> None:
        self._core = core
        self._server_version = server_version
        self._control = control or ModelControl("none")
        """Who may load and unload: by default nobody (Triton's `--model-control-mode=none`)."""

    async def ServerLive(self, request: pb.ServerLiveRequest, context: ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._core.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._server_version, extensions=["model_repository"]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: ServicerContext
    ) -> pb.ModelMetadataResponse:
        metadata = self._core.model_metadata(request.name, request.version)
        # What serves the version asked about (the default one for ""), as headers: the
        # explainer reports it, and stock clients see the standard message unchanged.
        loaded = self._core._resolve(request.name, request.version)
        await context.send_initial_metadata(served_metadata(loaded.config, loaded.backend))
        return metadata_to_pb(metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: ServicerContext) -> pb.ModelInferResponse:
        response = await self._core.infer(request_from_pb(request))
        return response_to_pb(response)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: ServicerContext
    ) -> pb.RepositoryIndexResponse:
        rows = self._core.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state, reason=r.reason)
                for r in rows
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._control.check("RepositoryModelLoad", context.invocation_metadata() or (), context.peer())
        unknown = sorted(set(request.parameters) - {"config"})
        if unknown:
            raise InvalidInput(f"unsupported load parameter {unknown[0]!r}; only 'config' (a version_policy) is")
        policy = None
        if "config" in request.parameters:
            policy = VersionPolicy.from_json(request.parameters["config"].string_param)
        await self._core.load_model(request.model_name, policy)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._control.check("RepositoryModelUnload", context.invocation_metadata() or (), context.peer())
        await self._core.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
