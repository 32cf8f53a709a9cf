"""The inference service's core: model versions, validation, dynamic batching, outputs.

Internal implementation behind the OIP v2 servicer; knows no gRPC. A served model is a
sequence classifier taking int64 `input_ids` and `attention_mask` [batch, sequence];
it returns `logits`, calibrated `probabilities` (the version's activation and
temperature: `shared.calibration.calibrated`) and the most probable `label` as BYTES,
so a stock OIP client gets a usable answer in one call.

A version with several heads over one encoder (`ModelConfig.heads`) runs one forward
pass whose `logits` hold every head's columns side by side; each head answers its own
three outputs, named by `Head.output_name` (`logits`, `probabilities`, `label` for the
primary head; `topic_logits`, `topic_probabilities`, `topic_label` for a head named
topic), with its own activation and temperature.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from services.inference.backends.base import Backend
from services.inference.types import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    Tensor,
    TensorMetadata,
)
from shared.batching import BatchPolicy, DynamicBatcher
from shared.calibration import calibrated
from shared.errors import (
    InfermeshError,
    InputTooLarge,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
)
from shared.metrics import (
    INFERENCE_EXECUTION,
    INFERENCE_ROUTED,
    INFERENCE_SEQUENCES,
    INFERENCE_SHADOW,
    inference_batcher_metrics,
)
from shared.model_repository import Head, ModelConfig, ModelRepository, RolloutRule
from shared.padding import pad_right

logger = logging.getLogger(__name__)

REQUIRED_INPUTS = ("input_ids", "attention_mask")
#: Each head's outputs, in the order metadata lists them (the primary head's plain names).
HEAD_OUTPUTS = ("logits", "probabilities", "label")

BackendFactory = Callable[[ModelConfig, Path], Backend]


@dataclass(frozen=True)
class Sequence:
    """One row of a request with its padding stripped (its attention mask is all ones)."""

    input_ids: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Limits:
    max_sequences_per_request: int = 1024
    """Rows per ModelInfer request."""


class LoadedVersion:
    """One loaded model version: its config, backend and batcher."""

    def __init__(self, config: ModelConfig, backend: Backend, policy: BatchPolicy, executor: ThreadPoolExecutor):
        self.config = config
        self.backend = backend
        self._policy = policy
        self._executor = executor
        self._attributes = {
            "infermesh.model.name": config.name,
            "infermesh.model.version": config.version,
            "infermesh.backend": backend.name,
        }
        self._execution_seconds = INFERENCE_EXECUTION.labels(config.name, config.version, backend.name)
        self._sequences_scored = INFERENCE_SEQUENCES.labels(config.name, config.version)
        self.batcher: DynamicBatcher[Sequence, npt.NDArray[np.float32]] = DynamicBatcher(
            self._run_batch,
            lambda s: len(s.input_ids),
            policy,
            name="model execute",
            span_attributes=self._attributes,
            metrics=inference_batcher_metrics(config.name, config.version),
        )

    async def _run_batch(self, sequences: list[Sequence]) -> list[npt.NDArray[np.float32] | BaseException]:
        longest = max(len(s.input_ids) for s in sequences)
        length = self._policy.bucket_of(longest) if self.backend.static_shapes else None
        input_ids, attention_mask = pad_right([s.input_ids for s in sequences], length)
        loop = asyncio.get_running_loop()
        # Runs inside the batcher's "model execute" span: it gets the padded shape.
        trace.get_current_span().set_attributes(
            {
                "infermesh.batch.padded_length": input_ids.shape[1],
                "infermesh.batch.tokens": int(attention_mask.sum()),
            }
        )
        started = time.perf_counter()
        logits = await loop.run_in_executor(self._executor, self.backend.run, input_ids, attention_mask)
        self._execution_seconds.observe(time.perf_counter() - started)
        self._sequences_scored.inc(len(sequences))
        return list(logits)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model serve: the newest `latest`, or exactly `specific`, or
    `all` (Triton's version_policy, and its JSON shape in `from_json`)."""

    latest: int = 1
    specific: tuple[str, ...] = ()
    all: bool = False

    def select(self, available: list[str]) -> list[str]:
        """Versions to serve out of `available` (oldest first)."""
        if self.all:
            return list(available)
        if self.specific:
            return [v for v in available if v in self.specific]
        return available[-self.latest :] if self.latest > 0 else []

    @classmethod
    def from_json(cls, text: str) -> VersionPolicy:
        """`{"version_policy": {"latest": {"num_versions": 2}}}`, `{"specific": {"versions": [1, 3]}}`
        or `{"all": {}}`, as in a RepositoryModelLoad `config` parameter."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"config parameter is not JSON: {error.msg}") from None
        policy = document.get("version_policy") if isinstance(document, dict) else None
        if not isinstance(policy, dict) or len(policy) != 1:
            raise InvalidInput('config must hold one "version_policy": latest, specific or all')
        ((kind, body),) = policy.items()
        body = body if isinstance(body, dict) else {}
        if kind == "all":
            return cls(all=True)
        if kind == "latest" and isinstance(body.get("num_versions"), int) and body["num_versions"] > 0:
            return cls(latest=body["num_versions"])
        if kind == "specific" and isinstance(body.get("versions"), list) and body["versions"]:
            return cls(specific=tuple(str(v) for v in body["versions"]))
        raise InvalidInput(
            f"version_policy {json.dumps(policy)} is not latest.num_versions > 0, specific.versions or all"
        )


@dataclass(frozen=True)
class VersionState:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    """READY while serving, UNAVAILABLE otherwise (Triton's words)."""
    reason: str = ""


class InferenceCore:
    """Serves the versions each model's version policy selects from a repository, and
    loads or unloads them while serving: a version leaving service first stops taking
    requests, then finishes the ones it has, then frees its backend."""

    def __init__(
        self,
        repository: ModelRepository,
        backend_factory: BackendFactory,
        policy: BatchPolicy,
        model_names: list[str] | None = None,
        versions_to_serve: int = 1,
        limits: Limits | None = None,
        version_policy: VersionPolicy | None = None,
    ) -> None:
        self.repository = repository
        self._backend_factory = backend_factory
        self._policy = policy
        self._model_names = model_names
        self._default_version_policy = version_policy or VersionPolicy(latest=versions_to_serve)
        self._version_policies: dict[str, VersionPolicy] = {}
        self.limits = limits or Limits()
        self._models: dict[str, dict[str, LoadedVersion]] = {}
        self._unavailable: dict[tuple[str, str], str] = {}
        """Why a version on disk is not serving, when it is not."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._rules: dict[str, RolloutRule] = {}
        """Each model's rollout rule (`<name>/rollout.json`), as of its last load."""
        self._random = random.Random()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=policy.max_concurrent_batches, thread_name_prefix="backend")
        self.ready = False

    async def load(self) -> None:
        """Loads every model's versions; the server is ready only afterwards."""
        names = self._model_names or self.repository.model_names()
        if not names:
            raise ModelNotFound(f"no models in repository {self.repository.root}")
        for name in names:
            await self.load_model(name)
        self.ready = True

    async def load_model(self, name: str, version_policy: VersionPolicy | None = None) -> list[str]:
        """Brings `name` to what its version policy (this one, else the last one given, else
        the default) selects from the repository now; returns the versions serving. If a
        new version fails to load, nothing changes and ModelLoadFailed says why."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            policy = version_policy or self._version_policies.get(name, self._default_version_policy)
            available = self.repository.versions(name)
            if not available:
                raise ModelNotFound.named(name)
            rule = self._read_rule(name, available)
            # The policy decides what is loaded (requests may pin any of it), plus whatever
            # the rollout rule names; the rule decides what answers unpinned requests.
            wanted = sorted(set(policy.select(available)) | set(rule.versions if rule else []), key=int)
            if not wanted:
                raise InvalidInput(f"the version policy selects none of {name!r}'s versions {available}")
            current = self._models.get(name, {})
            added: dict[str, LoadedVersion] = {}
            try:
                for version in wanted:
                    if version not in current:
                        added[version] = await self._load_version(name, version)
            except Exception as error:
                for loaded in added.values():
                    await self._retire(loaded)
                if isinstance(error, InfermeshError):
                    reason = error.detail
                else:  # backend messages carry file paths: those go to the log, not to callers
                    logger.error("loading %s failed", name, exc_info=error)
                    reason = f"{type(error).__name__}, see the log"
                failed = next(v for v in wanted if v not in current and v not in added)
                self._unavailable[(name, failed)] = f"failed to load: {reason}"
                raise ModelLoadFailed(f"{name} version {failed} could not load ({reason}); nothing changed") from error
            serving = {version: current.get(version) or added[version] for version in wanted}
            self._models[name] = serving  # one assignment: requests see the old set or the new one
            if rule is None:
                self._rules.pop(name, None)
            else:
                self._rules[name] = rule
            if version_policy is not None:
                self._version_policies[name] = version_policy
            for version in available:
                if version not in serving:
                    self._unavailable[(name, version)] = "not selected by the version policy"
                else:
                    self._unavailable.pop((name, version), None)
            for version, loaded in current.items():
                if version not in serving:
                    await self._retire(loaded)
                    logger.info("unloaded %s version %s", name, version)
            return list(serving)

    def _read_rule(self, name: str, available: list[str]) -> RolloutRule | None:
        try:
            rule = self.repository.rollout(name)
        except ValueError as error:  # pydantic's ValidationError is one
            raise InvalidInput(f"{name}/rollout.json is not a valid rollout rule: {error}") from None
        if rule is None:
            return None
        missing = [v for v in rule.versions if v not in available]
        if missing:
            raise InvalidInput(f"{name}/rollout.json names version {missing[0]}, which the repository lacks")
        if rule.candidate is not None:
            serving, candidate = (self.repository.config(name, v) for v in (rule.serving, rule.candidate))
            # Callers tokenize before the version is picked: both must read the same ids.
            if serving.sha256.get(serving.tokenizer) != candidate.sha256.get(candidate.tokenizer):
                raise InvalidInput(f"{name} versions {rule.serving} and {rule.candidate} use different tokenizers")
        return rule

    def rollout_rule(self, name: str) -> RolloutRule | None:
        return self._rules.get(name)

    async def unload_model(self, name: str) -> None:
        """Stops serving every version of `name` once the requests they hold are answered."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self._models.pop(name, None)
            if current is None and not self.repository.versions(name):
                raise ModelNotFound.named(name)
            for version in self.repository.versions(name):
                self._unavailable[(name, version)] = "unloaded"
            for version, loaded in (current or {}).items():
                await self._retire(loaded)
                logger.info("unloaded %s version %s", name, version)

    async def refresh(self) -> None:
        """Applies each loaded model's version policy to the repository as it is now."""
        for name in list(self._models):
            try:
                await self.load_model(name)
            except InfermeshError as error:
                logger.warning("repository refresh of %s: %s", name, error.detail)

    async def _load_version(self, name: str, version: str) -> LoadedVersion:
        config = self.repository.config(name, version)
        try:
            policy = config.dynamic_batching.apply(self._policy)
        except ValueError as error:
            raise ModelLoadFailed(f"dynamic_batching in its config.json: {error}") from None
        path = self.repository.path(name, version)
        backend = await asyncio.to_thread(self._backend_factory, config, path)
        logger.info("loaded %s version %s with %s", name, version, backend.name)
        return LoadedVersion(config, backend, policy, self._executor)

    @staticmethod
    async def _retire(loaded: LoadedVersion) -> None:
        await loaded.batcher.drain()
        await loaded.batcher.close()
        loaded.backend.close()

    def repository_index(self, ready_only: bool = False) -> list[VersionState]:
        names = sorted(set(self.repository.model_names()) | set(self._models))
        rows = []
        for name in names:
            serving = self._models.get(name, {})
            for version in sorted(set(self.repository.versions(name)) | set(serving), key=int):
                if version in serving:
                    rows.append(VersionState(name, version, "READY"))
                elif not ready_only:
                    reason = self._unavailable.get((name, version), "not loaded")
                    rows.append(VersionState(name, version, "UNAVAILABLE", reason))
        return rows

    async def close(self) -> None:
        self.ready = False
        for versions in self._models.values():
            for loaded in versions.values():
                await loaded.batcher.close()
                loaded.backend.close()
        self._executor.shutdown(wait=False)

    def _resolve(self, name: str, version: str) -> LoadedVersion:
        versions = self._models.get(name)
        if versions is None:
            if not self.ready:
                raise ModelNotReady(f"model {name!r} is still loading")
            if self.repository.versions(name):
                raise ModelNotReady(f"model {name!r} is not loaded")
            raise ModelNotFound.named(name)
        if not version:
            rule = self._rules.get(name)
            return versions[rule.serving] if rule is not None else versions[max(versions, key=int)]
        loaded = versions.get(version)
        if loaded is None:
            if version in self.repository.versions(name):
                raise ModelNotReady(f"model {name!r} version {version} is not loaded")
            raise ModelNotFound.named(name, version)
        return loaded

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self._resolve(name, version)
        except ModelNotReady:
            return False
        return self.ready

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        config = self._resolve(name, version).config
        return ModelMetadata(
            name=name,
            versions=sorted(self._models[name], key=int),
            platform=config.platform,
            inputs=[TensorMetadata(t.name, t.datatype, list(t.shape)) for t in config.inputs],
            outputs=output_metadata(config),
        )

    def queue_depth(self) -> int:
        return sum(v.batcher.queue_depth for versions in self._models.values() for v in versions.values())

    def _route(self, name: str, version: str) -> tuple[LoadedVersion, str, LoadedVersion | None]:
        """(the version that answers, why it was picked, a shadow candidate to score too)."""
        if version:
            return self._resolve(name, version), "pinned", None
        rule = self._rules.get(name)
        if rule is None or rule.candidate is None:
            return self._resolve(name, ""), "serving", None
        if rule.mode == "canary":
            if self._random.random() < rule.canary_share:
                return self._resolve(name, rule.candidate), "canary", None
            return self._resolve(name, ""), "serving", None
        return self._resolve(name, ""), "serving", self._models[name].get(rule.candidate)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        loaded, route, shadow = self._route(request.model_name, request.model_version)
        config = loaded.config
        outputs = output_names(config)
        unknown_outputs = [name for name in request.requested_outputs if name not in outputs]
        if unknown_outputs:
            raise InvalidInput(
                f"model {config.name!r} version {config.version} has no output {unknown_outputs[0]!r}; "
                f"outputs are {', '.join(outputs)}"
            )
        sequences = self._sequences(config, request)
        shadowed = asyncio.ensure_future(shadow.batcher.submit(sequences)) if shadow is not None else None
        try:
            logits = np.stack(await loaded.batcher.submit(sequences))
        except BaseException:
            if shadowed is not None:
                shadowed.cancel()
            raise
        INFERENCE_ROUTED.labels(config.name, config.version, route).inc()
        if shadowed is not None and shadow is not None:
            task = asyncio.create_task(self._compare_shadow(shadowed, shadow.config, config, logits))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
        return InferenceResponse(
            model_name=config.name,
            model_version=config.version,
            id=request.id,
            outputs=self._outputs(config, logits, request.requested_outputs or outputs),
        )

    @staticmethod
    async def _compare_shadow(
        shadowed: asyncio.Future[list[npt.NDArray[np.float32]]],
        candidate: ModelConfig,
        serving: ModelConfig,
        serving_logits: npt.NDArray[np.float32],
    ) -> None:
        """Counts whether the shadow candidate's labels agree with what was returned."""
        counter = INFERENCE_SHADOW.labels(candidate.name, candidate.version, "error")
        try:
            shadow_logits = np.stack(await shadowed)
        except Exception as error:  # the shadow never affects the answer
            logger.warning("shadow %s version %s failed: %s", candidate.name, candidate.version, error)
            counter.inc(len(serving_logits))
            return
        # The primary heads' labels: a candidate may add or drop further heads.
        theirs = [candidate.labels[i] for i in shadow_logits[:, : len(candidate.labels)].argmax(axis=1)]
        ours = [serving.labels[i] for i in serving_logits[:, : len(serving.labels)].argmax(axis=1)]
        agreed = sum(a == b for a, b in zip(theirs, ours, strict=True))
        INFERENCE_SHADOW.labels(candidate.name, candidate.version, "agree").inc(agreed)
        INFERENCE_SHADOW.labels(candidate.name, candidate.version, "disagree").inc(len(ours) - agreed)

    def _sequences(self, config: ModelConfig, request: InferenceRequest) -> list[Sequence]:
        by_name: dict[str, Tensor] = {}
        for tensor in request.inputs:
            if tensor.name not in REQUIRED_INPUTS:
                raise InvalidInput(f"model {config.name!r} has no input {tensor.name!r}; inputs are {REQUIRED_INPUTS}")
            if tensor.name in by_name:
                raise InvalidInput(f"input {tensor.name!r} is given twice")
            by_name[tensor.name] = tensor
        for name in REQUIRED_INPUTS:
            if name not in by_name:
                raise InvalidInput(f"input {name!r} is missing; model {config.name!r} needs {REQUIRED_INPUTS}")
            tensor = by_name[name]
            if tensor.datatype != "INT64":
                raise InvalidInput(f"input {name!r} has datatype {tensor.datatype}; the model expects INT64")
            if tensor.data.ndim != 2 or 0 in tensor.data.shape:
                raise InvalidInput(
                    f"input {name!r} has shape {list(tensor.data.shape)}; expected [batch, sequence], both above 0"
                )
        ids = by_name["input_ids"].data.astype(np.int64, copy=False)
        mask = by_name["attention_mask"].data.astype(np.int64, copy=False)
        if ids.shape != mask.shape:
            raise InvalidInput(
                f"input_ids has shape {list(ids.shape)} but attention_mask has {list(mask.shape)}; they must match"
            )
        rows, length = ids.shape
        if rows > self.limits.max_sequences_per_request:
            raise InputTooLarge(
                f"request has {rows} sequences; max is {self.limits.max_sequences_per_request} per request"
            )
        if length > config.max_sequence_length:
            raise InputTooLarge(
                f"sequence length is {length} tokens; max is {config.max_sequence_length} "
                "(split longer texts into chunks with the tokenizer service)"
            )
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise InvalidInput(f"input_ids holds a token id outside the vocabulary [0, {config.vocab_size})")
        if not np.isin(mask, (0, 1)).all():
            raise InvalidInput("attention_mask must hold only 0 and 1")
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise InvalidInput(f"sequence {int(np.argmin(lengths))} has an all-zero attention_mask")
        # Right padding: keep each row up to its last attended token; the batch re-pads.
        last = length - np.argmax(mask[:, ::-1], axis=1)
        if not all(mask[r, : last[r]].all() for r in range(rows)):
            raise InvalidInput("attention_mask must be ones then zeros (right padding); found a gap inside a sequence")
        return [Sequence(ids[r, : last[r]]) for r in range(rows)]

    @staticmethod
    def _outputs(config: ModelConfig, logits: npt.NDArray[np.float32], names: list[str]) -> list[Tensor]:
        """The outputs `names` asks for, in its order, each head's from its own columns."""
        if logits.shape[1] != config.num_logits:  # a graph its config.json does not describe
            raise InfermeshError(
                f"model {config.name!r} version {config.version} returned {logits.shape[1]} logits per row; "
                f"its heads {[head.name for head in config.heads]} have {config.num_logits} labels"
            )
        by_name = {head.output_name(output): (head, output) for head in config.heads for output in HEAD_OUTPUTS}
        probabilities: dict[str, npt.NDArray[np.float32]] = {}
        outputs: list[Tensor] = []
        for name in names:
            head, output = by_name[name]
            columns = logits[:, head.start : head.stop]
            if output == "logits":
                outputs.append(Tensor(name, "FP32", columns.astype(np.float32)))
                continue
            if head.name not in probabilities:
                probabilities[head.name] = calibrated(columns, head).astype(np.float32)
            if output == "probabilities":
                outputs.append(Tensor(name, "FP32", probabilities[head.name]))
            else:
                labels = np.empty(len(logits), dtype=np.object_)
                labels[:] = [head.labels[i].encode() for i in probabilities[head.name].argmax(axis=1)]
                outputs.append(Tensor(name, "BYTES", labels))
        return outputs


def output_names(config: ModelConfig) -> list[str]:
    """Every output a version answers, head by head (primary first): logits,
    probabilities, label."""
    return [head.output_name(output) for head in config.heads for output in HEAD_OUTPUTS]


def output_metadata(config: ModelConfig) -> list[TensorMetadata]:
    """ModelMetadata's outputs, in `output_names` order."""
    return [_output_tensor(head, output) for head in config.heads for output in HEAD_OUTPUTS]


def _output_tensor(head: Head, output: str) -> TensorMetadata:
    if output == "label":
        return TensorMetadata(head.output_name(output), "BYTES", [-1])
    return TensorMetadata(head.output_name(output), "FP32", [-1, len(head.labels)])
