"""The model store every replica reads: versions published once, and the rollout rule.

A store is S3-compatible object storage (`s3://bucket/prefix`, through boto3) or a plain
shared folder (`file:///mnt/models`, a mounted volume), behind `StoreBackend`. Its layout
mirrors the model repository:

    <name>/<version>/<files>            uploaded first
    <name>/<version>/.published.json    the completion marker, written last: every file's
                                        sha256 and size; a version without it does not exist
    <name>/rollout.json                 the rollout rule, written compare-and-set

`infermesh publish` writes versions, `infermesh rollout|promote|rollback --store` the rule.
Each service runs a `StoreFollower` that copies the store into its local repository folder
every few seconds (a version is downloaded into a hidden staging folder, checked against
the marker and config.json's `sha256`, then renamed into place whole, as build.py
publishes; the rule is replaced in one rename after the versions it names are there), so
the services' own repository reading applies what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import InfermeshError, ModelNotFound
from shared.model_repository import CONFIG_FILE, ROLLOUT_FILE, ModelConfig, ModelRepository, RolloutRule

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

#: The completion marker of a published version, written after all its files.
PUBLISHED_MARKER = ".published.json"
#: Temporary names the folder backend and the follower write before renaming.
_STAGING_TAG = ".writing-"


class StoreSettings(BaseSettings):
    """Where the model store is (env prefix INFERMESH_STORE_, shared by every service and
    the CLI). Without `url` there is no store: each service reads its repository folder
    as it is."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_STORE_", extra="ignore", env_ignore_empty=True)

    url: str = ""
    """`s3://bucket/prefix` (S3-compatible object storage) or `file:///path` (a shared
    folder, e.g. a ReadWriteMany volume); empty: no store."""

    endpoint_url: str = ""
    """S3 endpoint of a non-AWS server (MinIO, Ceph RGW, ...); empty: AWS S3."""

    region: str = ""
    """S3 region; empty: boto3's default chain (AWS_REGION, the config file)."""

    access_key_id: SecretStr | None = None
    """S3 access key id; unset: boto3's default chain (AWS_* variables, a web identity)."""

    secret_access_key: SecretStr | None = None
    """S3 secret access key, from a secret; unset: boto3's default chain."""

    poll_seconds: float = Field(default=5.0, gt=0)
    """How often each service copies what changed in the store into its repository folder."""

    local_repository: Path | None = None
    """Where a service keeps its copy of the store, read instead of its own MODEL_REPOSITORY
    (a writable volume where the image's folder is read-only); unset: MODEL_REPOSITORY."""


class StoreError(InfermeshError):
    """The store cannot be read or written, or holds something inconsistent; says what."""

    title = "Model store error"


class StoreConflict(StoreError):
    """Someone else changed the object between our read and our write (compare-and-set)."""

    title = "Model store conflict"


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str


class StoreBackend(Protocol):
    """Keys are `/`-separated paths relative to the store's root."""

    url: str

    def list_keys(self, prefix: str = "") -> list[str]: ...

    def read(self, key: str) -> Blob | None:
        """The object and its entity tag, or None if there is none."""
        ...

    def download(self, key: str, destination: Path) -> None: ...

    def upload(self, source: Path, key: str) -> None: ...

    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Writes `data` only if the object's entity tag is still `etag` (None: only if
        there is no object); returns the new tag, raises StoreConflict otherwise."""
        ...


class FolderBackend:
    """A shared folder (a mounted volume): each write is a rename, so readers see a whole
    file or none; compare-and-set holds an advisory lock (flock) next to the object."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StoreError(f"key {key!r} leaves the store")
        return path

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and _STAGING_TAG not in path.name and not path.name.endswith(".lock"):
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def read(self, key: str) -> Blob | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Blob(data, hashlib.sha256(data).hexdigest())

    def download(self, key: str, destination: Path) -> None:
        shutil.copyfile(self._path(key), destination)

    def _replace(self, path: Path, fill: Callable[[Path], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}{_STAGING_TAG}{uuid.uuid4().hex}")
        try:
            fill(staging)
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)

    def upload(self, source: Path, key: str) -> None:
        self._replace(self._path(key), lambda staging: shutil.copyfile(source, staging))

    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_name(f"{path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read(key)
            if (current.etag if current else None) != etag:
                raise StoreConflict(_conflict_detail(key))
            self._replace(path, lambda staging: staging.write_bytes(data))
        return hashlib.sha256(data).hexdigest()


class S3Backend:
    """S3-compatible object storage through boto3. Compare-and-set sends `If-Match` (or
    `If-None-Match: *` for a new object), which AWS S3, MinIO and moto honour atomically;
    before that it compares the tag itself, so a server that ignores the header still
    refuses a change made before our write began."""

    def __init__(self, bucket: str, prefix: str, client: S3Client, url: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client
        self.url = url

    def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []) if "Key" in item)
        return sorted(keys)

    def read(self, key: str) -> Blob | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return Blob(answer["Body"].read(), answer["ETag"])

    def download(self, key: str, destination: Path) -> None:
        self.client.download_file(self.bucket, self.prefix + key, str(destination))

    def upload(self, source: Path, key: str) -> None:
        self.client.upload_file(str(source), self.bucket, self.prefix + key)

    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        current = self.read(key)
        if (current.etag if current else None) != etag:
            raise StoreConflict(_conflict_detail(key))
        condition: dict[str, Any] = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise StoreConflict(_conflict_detail(key)) from None
            raise
        return answer["ETag"]


def _conflict_detail(key: str) -> str:
    return f"{key} changed in the store since it was read (another operator?); read it again and retry"


def open_backend(settings: StoreSettings) -> StoreBackend:
    """The backend `settings.url` names."""
    url = settings.url
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URL {url!r} names no bucket: use s3://bucket/prefix")
        client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region or None,
            aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
            aws_secret_access_key=settings.secret_access_key.get_secret_value() if settings.secret_access_key else None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        return S3Backend(parsed.netloc, parsed.path, client, url)
    if parsed.scheme == "file" or (parsed.scheme == "" and url):
        root = Path(parsed.path if parsed.scheme == "file" else url)
        if not root.is_dir():
            raise StoreError(f"store folder {root} does not exist (mount the shared volume there)")
        return FolderBackend(root)
    raise StoreError(f"store URL {url!r}: use s3://bucket/prefix or file:///path")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RuleRead:
    """A rule as read from the store, with what a compare-and-set write needs."""

    rule: RolloutRule | None
    etag: str | None
    revision: int


class ModelStore:
    """Versions and rules in a store; the one place that knows its layout."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend

    @property
    def url(self) -> str:
        return self.backend.url

    # --- versions ---------------------------------------------------------------------

    def published(self) -> dict[str, list[str]]:
        """Every model's published versions (those with a completion marker), oldest first."""
        found: dict[str, list[str]] = {}
        for key in self.backend.list_keys():
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == PUBLISHED_MARKER and parts[1].isdigit():
                found.setdefault(parts[0], []).append(parts[1])
        return {name: sorted(versions, key=int) for name, versions in sorted(found.items())}

    def versions(self, name: str) -> list[str]:
        return self.published().get(name, [])

    def manifest(self, name: str, version: str) -> dict[str, dict[str, Any]]:
        """The marker's files: relative path to {"sha256", "size"}."""
        blob = self.backend.read(f"{name}/{version}/{PUBLISHED_MARKER}")
        if blob is None:
            raise ModelNotFound.named(name, version)
        files: dict[str, dict[str, Any]] = json.loads(blob.data)["files"]
        return files

    def config(self, name: str, version: str) -> ModelConfig:
        blob = self.backend.read(f"{name}/{version}/{CONFIG_FILE}")
        if blob is None or version not in self.versions(name):
            raise ModelNotFound.named(name, version)
        return ModelConfig.model_validate_json(blob.data)

    def publish(self, folder: Path, name: str, version: str) -> dict[str, dict[str, Any]]:
        """Uploads a version folder, then its completion marker: readers see the whole
        version or none. A version is published once; its files are checked first
        against its config.json's `sha256`, so a corrupt copy never reaches the store."""
        if not version.isdigit() or int(version) < 1:
            raise StoreError(f"version {version!r} is not a positive integer")
        if self.backend.read(f"{name}/{version}/{PUBLISHED_MARKER}") is not None:
            raise StoreError(f"{name} version {version} is already published in {self.url}; publish a new version")
        try:
            config = ModelConfig.model_validate_json((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{folder} has no {CONFIG_FILE}: not a model version folder") from None
        except ValueError as error:
            raise StoreError(f"{folder / CONFIG_FILE} is not a valid model config: {error}") from None
        if (config.name, config.version) != (name, version):
            raise StoreError(
                f"{folder / CONFIG_FILE} describes {config.name} version {config.version}, not {name} version {version}"
            )
        files = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and "engines" not in p.relative_to(folder).parts
        )
        manifest = {
            file: {"sha256": sha256_of(folder / file), "size": (folder / file).stat().st_size} for file in files
        }
        _check_config_hashes(config, manifest, str(folder))
        previous = self.versions(name)
        for file in files:
            self.backend.upload(folder / file, f"{name}/{version}/{file}")
        marker = json.dumps({"name": name, "version": version, "files": manifest}, indent=2).encode()
        self.backend.write_if(f"{name}/{version}/{PUBLISHED_MARKER}", marker, None)
        # As fine-tuning does: a version added next to a serving one waits to be rolled out.
        if self.read_rule(name).rule is None:
            serving = previous[-1] if previous else version
            with contextlib.suppress(StoreConflict):
                self.write_rule(name, RolloutRule(serving=serving), RuleRead(None, None, 0))
        return manifest

    def download_version(self, name: str, version: str, repository: Path) -> Path:
        """Copies a published version into `repository/name/version` in one rename after
        checking every file; returns the folder. An existing folder is left as it is."""
        target = repository / name / version
        if target.is_dir():
            return target
        manifest = self.manifest(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}{_STAGING_TAG}", dir=target.parent))
        try:
            for file, expected in manifest.items():
                destination = staging / file
                if not destination.resolve().is_relative_to(staging.resolve()):
                    raise StoreError(f"{name} version {version} names file {file!r} outside its folder")
                destination.parent.mkdir(parents=True, exist_ok=True)
                self.backend.download(f"{name}/{version}/{file}", destination)
                if sha256_of(destination) != expected["sha256"]:
                    raise StoreError(f"{name} version {version}: {file} does not match its sha256 in the store")
            config = ModelConfig.model_validate_json((staging / CONFIG_FILE).read_text(encoding="utf-8"))
            _check_config_hashes(config, manifest, f"{name} version {version} in the store")
            (staging / PUBLISHED_MARKER).write_text(json.dumps({"files": manifest}), encoding="utf-8")
            staging.chmod(0o755)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("model store: %s version %s copied from %s", name, version, self.url)
        return target

    # --- the rollout rule -------------------------------------------------------------

    def read_rule(self, name: str) -> RuleRead:
        blob = self.backend.read(f"{name}/{ROLLOUT_FILE}")
        if blob is None:
            return RuleRead(None, None, 0)
        try:
            rule = RolloutRule.model_validate_json(blob.data)
            revision = int(json.loads(blob.data).get("revision", 0))
        except ValueError as error:
            raise StoreError(f"{name}/{ROLLOUT_FILE} in the store is not a valid rollout rule: {error}") from None
        return RuleRead(rule, blob.etag, revision)

    def write_rule(self, name: str, rule: RolloutRule, read: RuleRead) -> RuleRead:
        """Replaces the rule if it is still the one `read` saw (compare-and-set on the
        entity tag, and a `revision` counter the rule carries); StoreConflict otherwise."""
        published = self.versions(name)
        missing = [v for v in rule.versions if v not in published]
        if missing:
            raise ModelNotFound.named(name, missing[0])
        revision = read.revision + 1
        data = (json.dumps(rule.model_dump() | {"revision": revision}, indent=2) + "\n").encode()
        etag = self.backend.write_if(f"{name}/{ROLLOUT_FILE}", data, read.etag)
        return RuleRead(rule, etag, revision)


def _check_config_hashes(config: ModelConfig, manifest: dict[str, dict[str, Any]], where: str) -> None:
    for file, digest in config.sha256.items():
        if file in manifest and manifest[file]["sha256"] != digest:
            raise StoreError(f"{where}: {file} does not match the sha256 its config.json records")


def open_store(settings: StoreSettings) -> ModelStore:
    return ModelStore(open_backend(settings))


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Turns the S3 client's failures (no credentials, endpoint unreachable, access denied)
    into one StoreError naming the store, for the CLI's one-line errors."""
    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise StoreError(f"model store {url}: {error}") from None


class StoreRepository(ModelRepository):
    """The store seen as a model repository, for the rollout commands: versions, configs
    and rules come from the store, version files are downloaded into `cache` only when
    something reads them (the promote gate's comparison), and each rule write is a
    compare-and-set against the rule this object last read."""

    def __init__(self, store: ModelStore, cache: Path) -> None:
        super().__init__(cache)
        self.store = store
        self._reads: dict[str, RuleRead] = {}

    def model_names(self) -> list[str]:
        return list(self.store.published())

    def versions(self, name: str) -> list[str]:
        return self.store.versions(name)

    def path(self, name: str, version: str) -> Path:
        return self.store.download_version(name, version, self.root)

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        return self.store.config(name, self.resolve(name, version))

    def rollout(self, name: str) -> RolloutRule | None:
        read = self.store.read_rule(name)
        self._reads[name] = read
        return read.rule

    def write_rollout(self, name: str, rule: RolloutRule) -> None:
        read = self._reads.get(name) or self.store.read_rule(name)
        self._reads[name] = self.store.write_rule(name, rule, read)


class StoreFollower:
    """Copies a store into a local repository folder: new versions (whole, checked),
    then each model's rule. `on_change` runs after a pass that changed something (the
    inference service reloads there); services that read the folder on demand need none."""

    def __init__(
        self,
        store: ModelStore,
        repository: Path,
        every_seconds: float,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.repository = repository
        self.every_seconds = every_seconds
        self.on_change = on_change

    def sync_once(self) -> bool:
        """One pass; True if the folder changed. A version that fails its checks is
        skipped (and retried next pass), and so is any rule naming a missing version."""
        changed = False
        local = ModelRepository(self.repository)
        for name, versions in self.store.published().items():
            for version in versions:
                if version in local.versions(name):
                    continue
                try:
                    self.store.download_version(name, version, self.repository)
                    changed = True
                except (StoreError, ValueError, OSError) as error:
                    detail = error.detail if isinstance(error, StoreError) else f"{type(error).__name__}: {error}"
                    logger.error("model store: %s version %s not copied: %s", name, version, detail)
            changed |= self._sync_rule(name, local)
        return changed

    def _sync_rule(self, name: str, local: ModelRepository) -> bool:
        path = self.repository / name / ROLLOUT_FILE
        blob = self.store.backend.read(f"{name}/{ROLLOUT_FILE}")
        if blob is None:
            if path.is_file():
                path.unlink()
                logger.info("model store: %s has no rollout rule any more", name)
                return True
            return False
        if path.is_file() and path.read_bytes() == blob.data:
            return False
        try:
            rule = RolloutRule.model_validate_json(blob.data)
        except ValueError as error:
            logger.error("model store: %s/%s is not a valid rule, kept the last one: %s", name, ROLLOUT_FILE, error)
            return False
        missing = [v for v in rule.versions if v not in local.versions(name)]
        if missing:
            logger.warning("model store: %s rule names version %s, not here yet", name, missing[0])
            return False
        staging = path.with_name(f".{ROLLOUT_FILE}{_STAGING_TAG}{os.getpid()}")
        staging.write_bytes(blob.data)
        os.replace(staging, path)
        logger.info("model store: %s rule now %s", name, rule.model_dump_json())
        return True

    async def run(self) -> None:
        """Follows the store until cancelled; a pass that fails is logged and retried."""
        while True:
            await asyncio.sleep(self.every_seconds)
            try:
                changed = await asyncio.to_thread(self.sync_once)
            except Exception as error:  # the store may be briefly unreachable: keep serving
                logger.warning("model store %s not read: %s: %s", self.store.url, type(error).__name__, error)
                continue
            if changed and self.on_change is not None:
                try:
                    await self.on_change()
                except Exception:  # a failed reload must not stop the following
                    logger.exception("model store: applying what changed failed; next change retries")


@contextlib.asynccontextmanager
async def following(
    settings: StoreSettings, repository: Path, on_change: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[StoreFollower | None]:
    """Without a store URL, nothing (yields None). With one: a first pass before the
    service reads its repository (a store that cannot be read then is a startup error),
    then a background follower until the block ends."""
    if not settings.url:
        yield None
        return
    follower = StoreFollower(open_store(settings), repository, settings.poll_seconds, on_change)
    try:
        await asyncio.to_thread(follower.sync_once)
    except StoreError:
        raise
    except Exception as error:
        raise StoreError(f"model store {settings.url} cannot be read: {type(error).__name__}: {error}") from None
    logger.info("following model store %s into %s every %ss", settings.url, repository, settings.poll_seconds)
    task = asyncio.create_task(follower.run())
    try:
        yield follower
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def local_repository(settings: StoreSettings, model_repository: Path) -> Path:
    """The folder a service reads: the store's local copy when a store is set, else its own."""
    return settings.local_repository if settings.url and settings.local_repository else model_repository


async def serve_following(
    service: str,
    settings: StoreSettings,
    repository: Path,
    serve: Callable[[StoreFollower | None], Awaitable[None]],
) -> None:
    """Runs `serve` while following the store into `repository`; a store that cannot be
    read at start is one log line and exit status 1, as other startup errors."""
    try:
        async with following(settings, repository) as follower:
            await serve(follower)
    except StoreError as error:
        logger.error("%s cannot serve: %s", service, error.detail)
        raise SystemExit(1) from None


@contextlib.contextmanager
def cache_folder() -> Iterator[Path]:
    """A throwaway local folder for the CLI's downloads."""
    with tempfile.TemporaryDirectory(prefix="infermesh-store-") as folder:
        yield Path(folder)
