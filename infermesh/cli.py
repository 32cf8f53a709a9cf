"""The `infermesh` command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.errors import InfermeshError
from shared.model_repository import RolloutRule

if TYPE_CHECKING:
    from infermesh.model.finetune import DataSpec

app = typer.Typer(help="infermesh: finance sentiment inference mesh.", no_args_is_help=True)

DEFAULT_WEIGHTS = Path(__file__).parent / "model" / "weights" / "finance-sentiment"


class Service(StrEnum):
    tokenizer = "tokenizer"
    inference = "inference"
    postprocessor = "postprocessor"
    explainer = "explainer"
    worker = "worker"
    gateway = "gateway"


class Topic(StrEnum):
    news = "news"
    sentiment = "sentiment"
    windows = "windows"
    alerts = "alerts"
    topics = "topics"
    topic_windows = "topic-windows"
    topic_alerts = "topic-alerts"
    dlq = "dlq"


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def run(
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    demo: Annotated[bool, typer.Option(help="Replay the bundled demo news stream.")] = True,
    kafka: Annotated[bool, typer.Option(help="Run Kafka, the worker and the demo (else gRPC services only).")] = True,
) -> None:
    """Run the whole mesh locally until Ctrl-C: broker (unless KAFKA_BOOTSTRAP_SERVERS is
    set), tokenizer, inference, post-processor, the sentiment monitor and the demo feed."""
    from infermesh.broker import EmbeddedBroker
    from infermesh.mesh import SERVICES, LocalMesh, trace_viewer_env
    from shared.kafka import KafkaSettings, ensure_topics
    from workers.sentiment_monitor.settings import MonitorSettings
    from workers.sentiment_monitor.topics import monitor_topics

    if not any(repository.glob("*/*/config.json")):
        typer.echo(f"no model in {repository}; run `infermesh build-model` (or `make model`) first", err=True)
        raise typer.Exit(2)
    # Installed explicitly: a shell that starts us in the background sets SIGINT to
    # "ignore", and Python then never raises KeyboardInterrupt on Ctrl-C.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _raise_keyboard_interrupt)
    broker: EmbeddedBroker | None = None
    viewer_env = trace_viewer_env(os.environ)
    mesh = LocalMesh(repository.resolve(), extra_env=viewer_env)
    feeder: threading.Thread | None = None
    try:
        kafka_settings = KafkaSettings()
        if kafka and not kafka_settings.bootstrap_servers:
            broker = EmbeddedBroker(port=int(os.environ.get("INFERMESH_BROKER_PORT", "9092"))).start()
            typer.echo(f"  kafka          {broker.bootstrap_servers} (embedded Tansu broker, memory only)")
        typer.echo("starting tokenizer, inference, post-processor and explainer ...")
        mesh.start()
        for spec in SERVICES:
            typer.echo(f"  {spec.name:<14} grpc://{mesh.address(spec)}")
        bootstrap = ""
        if kafka:
            bootstrap = kafka_settings.bootstrap_servers or (broker.bootstrap_servers if broker else "")
            client = KafkaSettings(bootstrap_servers=bootstrap).client_config()
            ensure_topics(client, monitor_topics(MonitorSettings().partitions))
            mesh.start_worker(bootstrap, DEMO_WORKER_ENV if demo else {})
            typer.echo(f"  worker         sentiment monitor on {bootstrap}")
        gateway_port = int(os.environ.get("INFERMESH_GATEWAY_HTTP_PORT", "8080"))
        gateway_url = mesh.start_gateway(bootstrap, gateway_port)
        typer.echo(f"  gateway        {gateway_url}/docs (REST API), {gateway_url}/explain")
        pipeline_port = os.environ.get("INFERMESH_GATEWAY_GRPC_PORT", "50050")
        typer.echo(f"  pipeline       grpc://127.0.0.1:{pipeline_port} (infermesh.pipeline.v1.Pipeline)")
        if viewer_env:
            receiver = viewer_env["INFERMESH_GATEWAY_OTLP_RECEIVER_PORT"]
            typer.echo(f"  traces         {gateway_url}/traces (OTLP receiver on :{receiver})")
        else:
            exporting_to = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            )
            typer.echo(f"  traces         exported to {exporting_to}")
        typer.echo(f"  metrics        {', '.join(mesh.metrics_url(name) for name in mesh.processes)}")
        if kafka:
            typer.echo(f"  dashboard      {gateway_url}/dashboard")
            if demo:
                feeder = threading.Thread(target=_feed_demo, args=(client,), daemon=True, name="demo-feed")
                feeder.start()
                typer.echo("  demo feed      replaying the bundled news stream onto finance.news.v1")
        typer.echo('ready. try: infermesh classify "Apple shares plunge after weak iPhone sales"')
        if kafka:
            typer.echo("       infermesh tail alerts    (windows | sentiment | topic-alerts | topic-windows | dlq)")
        typer.echo("Ctrl-C stops everything.")
        exited = mesh.wait()
        typer.echo(f"{exited} exited; stopping the others", err=True)
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        mesh.stop()
        if broker is not None:
            broker.stop()
    typer.echo("stopped")


#: The demo replays three hours of news in about 20 seconds, so one real second is about
#: ten minutes of event time: the default minute of allowed lateness would be 0.1 s of
#: processing jitter, and a window that lost a few late items could cross the alert
#: threshold by chance. Fifteen minutes is about 1.5 s (the replay also keeps to one
#: partition: see `demo.replay`).
DEMO_WORKER_ENV = {
    "INFERMESH_WORKER_ALLOWED_LATENESS_SECONDS": os.environ.get("INFERMESH_WORKER_ALLOWED_LATENESS_SECONDS", "900")
}


def _feed_demo(client: dict[str, object]) -> None:
    from kafka import KafkaProducer

    from workers.sentiment_monitor.demo import replay

    producer = KafkaProducer(**client, acks="all")
    try:
        count = replay(producer)
        typer.echo(f"demo feed: {count} news items sent")
    finally:
        producer.close()


@app.command()
def serve(service: Service) -> None:
    """Run one service in the foreground (settings from INFERMESH_<SERVICE>_* variables)."""
    from shared.telemetry import configure_logging, configure_tracing

    if service is Service.tokenizer:
        from services.tokenizer.server import serve as serve_tokenizer
        from services.tokenizer.settings import TokenizerSettings

        tokenizer_settings = TokenizerSettings()
        configure_logging(tokenizer_settings.log_json, tokenizer_settings.log_level)
        configure_tracing("infermesh-tokenizer")
        asyncio.run(serve_tokenizer(tokenizer_settings))
    elif service is Service.inference:
        from services.inference.server import serve as serve_inference
        from services.inference.settings import InferenceSettings

        inference_settings = InferenceSettings()
        configure_logging(inference_settings.log_json, inference_settings.log_level)
        configure_tracing("infermesh-inference")
        asyncio.run(serve_inference(inference_settings))
    elif service in (Service.worker, Service.gateway, Service.explainer):
        import runpy

        module = {
            Service.worker: "workers.sentiment_monitor",
            Service.gateway: "gateway",
            Service.explainer: "services.explainer",
        }[service]
        runpy.run_module(module, run_name="__main__")
    else:
        from services.postprocessor.server import serve as serve_postprocessor
        from services.postprocessor.settings import PostprocessorSettings

        post_settings = PostprocessorSettings()
        configure_logging(post_settings.log_json, post_settings.log_level)
        configure_tracing("infermesh-postprocessor")
        asyncio.run(serve_postprocessor(post_settings))


@app.command()
def classify(
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    model: Annotated[str, typer.Option(help="Model name.")] = "finance-sentiment",
    version: Annotated[str, typer.Option(help="Model version; empty means the latest served.")] = "",
    tokenizer: Annotated[str, typer.Option(help="Tokenizer service address.")] = "127.0.0.1:50051",
    inference: Annotated[str, typer.Option(help="Inference service address.")] = "127.0.0.1:8001",
    postprocessor: Annotated[str, typer.Option(help="Post-processor address.")] = "127.0.0.1:50052",
) -> None:
    """Classify texts through the running services and print JSON: per text its label and
    probabilities, and under `heads` every head of the version (e.g. sentiment and topic)
    with its own label, labels, probabilities, abstained and score."""
    from shared.errors import InfermeshError
    from shared.pipeline import PipelineClient, PipelineTargets

    async def go() -> dict[str, object]:
        targets = PipelineTargets(tokenizer=tokenizer, inference=inference, postprocessor=postprocessor)
        async with PipelineClient(targets, model_name=model) as client:
            result = await client.classify(texts, model_version=version)
        return {
            "model_name": result.model_name,
            "model_version": result.model_version,
            "results": [{"text": t, **asdict(r)} for t, r in zip(texts, result.results, strict=True)],
        }

    try:
        typer.echo(json.dumps(asyncio.run(go()), indent=2))
    except InfermeshError as error:
        typer.echo(json.dumps({"error": error.title, "detail": error.detail}), err=True)
        raise typer.Exit(1) from None


@app.command()
def train(
    train_file: Annotated[Path, typer.Option("--train", help="Training CSV (text,label; TFNS coding).")],
    valid_file: Annotated[Path, typer.Option("--valid", help="Validation CSV.")],
    out: Annotated[Path, typer.Option(help="Where to write the adapter weights.")] = DEFAULT_WEIGHTS,
    topic_train: Annotated[
        Path | None, typer.Option(help="Topic training CSV (Twitter Financial News Topic coding): adds the topic head.")
    ] = None,
    topic_valid: Annotated[Path | None, typer.Option(help="Topic validation CSV.")] = None,
) -> None:
    """Fine-tune the finance classifier with LoRA on the packaged encoder: sentiment, and
    topic in the same pass when its files are given."""
    from infermesh.model.train import train as run_training

    if (topic_train is None) != (topic_valid is None):
        raise typer.BadParameter("give both --topic-train and --topic-valid, or neither")
    logging.basicConfig(level=logging.INFO)
    summary = run_training(train_file, valid_file, out, topic_train_csv=topic_train, topic_valid_csv=topic_valid)
    typer.echo(json.dumps({head["name"]: head["validation_torch"] for head in summary["heads"]}, indent=2))


@contextmanager
def refusals(exit_code: int) -> Iterator[None]:
    """Turns what a user can fix (bad files, refused rollout steps, missing versions or
    backends) into one `error:` line and an exit status, never a traceback."""
    try:
        yield
    except (InfermeshError, ValueError, FileExistsError) as error:
        typer.echo(f"error: {error.detail if isinstance(error, InfermeshError) else error}", err=True)
        raise typer.Exit(exit_code) from None


def labelled_files(
    train: Path, valid: Path, text_column: str, label_column: str, labels: str, label_map: str
) -> DataSpec:
    """The `--train`/`--valid` files and how to read them, as finetune and add-head take them."""
    from infermesh.model.data import parse_label_map
    from infermesh.model.finetune import DataSpec

    names = tuple(name.strip() for name in labels.split(",") if name.strip())
    return DataSpec(train, valid, text_column, label_column, names, parse_label_map(label_map))


@app.command()
def finetune(
    train_file: Annotated[Path, typer.Option("--train", help="Training data: .csv with a header, or .jsonl.")],
    valid_file: Annotated[Path, typer.Option("--valid", help="Validation data, same format.")],
    model: Annotated[str, typer.Option(help="Model name in the repository; a new version is added.")],
    labels: Annotated[
        str, typer.Option(help="Comma-separated label set in output order; default: the training labels, sorted.")
    ] = "",
    label_map: Annotated[
        str, typer.Option(help="Map file values to labels first, e.g. 0=negative,1=positive,2=neutral.")
    ] = "",
    text_column: Annotated[str, typer.Option(help="Column (CSV) or key (JSONL) holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column or key holding the label.")] = "label",
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    version: Annotated[str, typer.Option(help="Version to write; default: the next free one.")] = "",
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs; early stopping may end sooner.")] = 6,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without validation gain before stopping.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    lora_rank: Annotated[int, typer.Option(min=1)] = 8,
    max_length: Annotated[int, typer.Option(min=8, max=512, help="Tokens per training text.")] = 64,
    seed: Annotated[int, typer.Option(help="Same seed, data and machine give the same weights.")] = 13,
    languages: Annotated[str, typer.Option(help="Comma-separated languages the model is for.")] = "en",
) -> None:
    """Fine-tune LoRA adapters and a head on your labelled data into a new model version."""
    from infermesh.model.finetune import finetune as run_finetune
    from infermesh.model.train import TrainConfig

    logging.basicConfig(level=logging.WARNING)
    with refusals(2):
        spec = labelled_files(train_file, valid_file, text_column, label_column, labels, label_map)
        config = TrainConfig(
            seed=seed,
            epochs=epochs,
            patience=patience,
            batch_size=batch_size,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            lora_alpha=2 * lora_rank,
            max_length=max_length,
        )
        codes = [code.strip() for code in languages.split(",") if code.strip()]
        if not codes:
            raise ValueError("give at least one language (--languages en,de)")
        target = run_finetune(spec, repository, model, version, config, codes)
    metrics = json.loads((target / "metrics.json").read_text())
    default = metrics["variants"][metrics["default_variant"]]
    typer.echo(
        json.dumps(
            {
                "version": str(target),
                "accuracy": round(default["accuracy"], 4),
                "macro_f1": round(default["macro_f1"], 4),
                "ece_calibrated": round(default["ece_calibrated"], 4),
                **metrics["training"],
            },
            indent=2,
        )
    )


ModelOption = Annotated[str, typer.Option("--model", help="Model name in the repository.")]
RepositoryOption = Annotated[Path, typer.Option(help="Model repository folder.")]
InferenceOption = Annotated[
    str, typer.Option(help="Running inference service to reload with the new rule; empty: only write the rule.")
]

AdminTokenOption = Annotated[
    str,
    typer.Option(
        envvar="INFERMESH_INFERENCE_ADMIN_TOKEN",
        show_default=False,
        help="The inference service's admin token (it must run with MODEL_CONTROL_MODE=explicit); "
        "prefer the environment variable, which stays out of shell history and `ps`.",
    ),
]


StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        help="Model store URL (s3://bucket/prefix or file:///path; credentials from INFERMESH_STORE_*): "
        "change the rule there, where every replica's follower applies it; --repository is then unused.",
    ),
]


@contextmanager
def _rollout_repository(repository: Path, store: str) -> Iterator[Any]:
    """The local repository folder, or with `store` the store seen as one (shared/model_store.py)."""
    from shared.model_repository import ModelRepository
    from shared.model_store import StoreRepository, StoreSettings, cache_folder, open_store, store_errors

    if not store:
        yield ModelRepository(repository)
        return
    with refusals(1), store_errors(store), cache_folder() as cache:
        yield StoreRepository(open_store(StoreSettings().model_copy(update={"url": store})), cache)


def _apply_rule(inference: str, model: str, rule: RolloutRule, admin_token: str, store: str = "") -> None:
    """Prints the rule and, if an inference address is given, makes the service apply it now.
    With a store, the replicas following it apply the rule themselves."""
    import grpc

    from infermesh.model.rollout import apply_rule

    applied = "not asked"
    if store:
        applied = f"written to {store}; every replica following it applies it at its next pass"
    elif inference:
        try:
            asyncio.run(apply_rule(inference, model, admin_token))
            applied = f"applied by {inference}"
        except grpc.aio.AioRpcError as error:
            applied = f"not applied: {inference} answered {error.code().name}: {error.details()}"
    typer.echo(json.dumps({"rule": rule.model_dump(), "inference": applied}, indent=2))


@app.command()
def rollout(
    model: ModelOption,
    candidate: Annotated[str, typer.Option(help="Version to try next to the serving one.")] = "",
    canary: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of unpinned requests the candidate answers.")
    ] = 0.0,
    shadow: Annotated[
        bool, typer.Option(help="Candidate scores every unpinned request; only serving answers.")
    ] = False,
    stop: Annotated[bool, typer.Option(help="End the candidate's trial; the serving version answers alone.")] = False,
    serving: Annotated[
        str, typer.Option(help="Set the serving version directly (first set-up; promote is the checked way).")
    ] = "",
    repository: RepositoryOption = Path("models"),
    inference: InferenceOption = "127.0.0.1:8001",
    admin_token: AdminTokenOption = "",
    store: StoreOption = "",
) -> None:
    """Start (canary or shadow) or stop a candidate version's trial next to the serving one."""
    from infermesh.model.rollout import RolloutRefused, start_candidate, stop_candidate

    with refusals(1), _rollout_repository(repository, store) as repo:
        if serving:
            repo.write_rollout(model, RolloutRule(serving=serving))
            rule = RolloutRule(serving=serving)
        elif stop:
            rule = stop_candidate(repo, model)
        elif candidate:
            rule = start_candidate(repo, model, candidate, "shadow" if shadow else "canary", canary)
        else:
            raise RolloutRefused("give --candidate (with --canary or --shadow), --stop or --serving")
    _apply_rule(inference, model, rule, admin_token, store)


@app.command()
def promote(
    model: ModelOption,
    candidate: Annotated[str, typer.Option(help="Version to promote; default: the rule's candidate.")] = "",
    data: Annotated[
        Path | None, typer.Option(help="Labelled .csv/.jsonl both versions are scored on before deciding.")
    ] = None,
    label_map: Annotated[str, typer.Option(help="Map file values to labels, e.g. 0=negative,1=positive.")] = "",
    text_column: Annotated[str, typer.Option()] = "text",
    label_column: Annotated[str, typer.Option()] = "label",
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest macro-F1 drop accepted against the serving version.")
    ] = 0.01,
    force: Annotated[bool, typer.Option(help="Promote even if the candidate scores worse.")] = False,
    repository: RepositoryOption = Path("models"),
    inference: InferenceOption = "127.0.0.1:8001",
    admin_token: AdminTokenOption = "",
    store: StoreOption = "",
) -> None:
    """Make a candidate the serving version, if it is not worse than what serves."""
    from infermesh.model.data import parse_label_map
    from infermesh.model.rollout import LabelledFile, RolloutRefused, compare, current_rule
    from infermesh.model.rollout import promote as run_promote

    with refusals(1), _rollout_repository(repository, store) as repo:
        version = candidate or current_rule(repo, model).candidate or ""
        if not version:
            raise RolloutRefused("no candidate: give --candidate or start one with `infermesh rollout`")
        comparison = None
        if data is not None:
            labelled = LabelledFile(data, text_column, label_column, parse_label_map(label_map))
            comparison = compare(repo, model, version, labelled)
            typer.echo(json.dumps(comparison.as_dict(), indent=2))
        rule = run_promote(repo, model, version, comparison, tolerance, force)
    _apply_rule(inference, model, rule, admin_token, store)


@app.command()
def rollback(
    model: ModelOption,
    repository: RepositoryOption = Path("models"),
    inference: InferenceOption = "127.0.0.1:8001",
    admin_token: AdminTokenOption = "",
    store: StoreOption = "",
) -> None:
    """Return to the version that served before the last promotion."""
    from infermesh.model.rollout import rollback as run_rollback

    with refusals(1), _rollout_repository(repository, store) as repo:
        rule = run_rollback(repo, model)
    _apply_rule(inference, model, rule, admin_token, store)


@app.command()
def publish(
    folder: Annotated[Path, typer.Argument(help="The version folder (models/<name>/<version>), as built.")],
    store: Annotated[str, typer.Option("--store", help="s3://bucket/prefix or file:///path (INFERMESH_STORE_*).")],
    model: ModelOption,
    version: Annotated[str, typer.Option(help="The version number it is published as (its config.json's).")],
) -> None:
    """Publish a model version to the model store, once: its files, then a completion
    marker, so replicas never see half a version. A version next to a serving one waits
    for `infermesh rollout --store`."""
    from shared.model_store import StoreSettings, open_store, store_errors

    with refusals(1), store_errors(store):
        opened = open_store(StoreSettings().model_copy(update={"url": store}))
        manifest = opened.publish(folder, model, version)
        rule = opened.read_rule(model).rule
    typer.echo(
        json.dumps(
            {
                "published": f"{model}/{version}",
                "store": store,
                "files": len(manifest),
                "bytes": sum(int(item["size"]) for item in manifest.values()),
                "rule": rule.model_dump() if rule else None,
            },
            indent=2,
        )
    )


@app.command("build-engine")
def build_engine(
    repository: RepositoryOption = Path("models"),
    model: Annotated[str, typer.Option("--model", help="Model name in the repository.")] = "finance-sentiment",
    version: Annotated[str, typer.Option(help="Version; empty means the latest.")] = "",
    buckets: Annotated[str, typer.Option(help="Sequence-length buckets, one engine profile each.")] = "16,32,64,128",
    max_batch: Annotated[int, typer.Option(min=1, help="Most rows per batch (the service's max batch size).")] = 64,
    workspace_mb: Annotated[int, typer.Option(min=64, help="Builder workspace limit.")] = 2048,
    fp16: Annotated[bool, typer.Option(help="FP16 kernels.")] = True,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Engine cache; default: engines/ in the version folder.")
    ] = None,
) -> None:
    """Build (or find in the cache) the TensorRT engine the inference service will load."""
    from tqdm import tqdm

    from services.inference.backends.tensorrt import cached_engine, engine_spec, length_profiles
    from shared.model_repository import ModelRepository

    repo = ModelRepository(repository)
    bars: dict[str, tqdm[Any]] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total, desc=phase, position=len(bars), leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bars.pop(phase).close()

    with refusals(2):
        config = repo.config(model, version or None)
        fp32 = config.variants.get("fp32")
        if fp32 is None:
            raise ValueError(f"{model} version {config.version} has no fp32 ONNX variant")
        edges = [int(edge) for edge in buckets.split(",") if edge.strip()]
        profiles = length_profiles(edges, max_batch, config.max_sequence_length)
        spec = engine_spec(config.sha256.get(fp32, ""), profiles, fp16, workspace_mb << 20)
        folder = repo.path(model, config.version)
        _, path, built = cached_engine(folder / fp32, spec, cache_dir or folder / "engines", progress)
    typer.echo(json.dumps({"engine": str(path), "built": built, "spec": spec.cache_key()}, indent=2))


@app.command("build-model")
def build_model(
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    name: Annotated[str, typer.Option(help="Model name.")] = "finance-sentiment",
    version: Annotated[str, typer.Option(help="Version folder to write.")] = "1",
    weights: Annotated[Path, typer.Option(help="Trained adapter folder.")] = DEFAULT_WEIGHTS,
) -> None:
    """Build ONNX fp32/int8, tokenizer and config from the encoder package plus the weights."""
    from infermesh.model.build import build_model_repository

    logging.basicConfig(level=logging.WARNING)
    target = build_model_repository(weights, repository, name, version)
    typer.echo(f"built {target}")


@app.command("import")
def import_model(
    path: Annotated[Path, typer.Argument(help="A transformers checkpoint folder (a *ForSequenceClassification).")],
    model: Annotated[str, typer.Option("--model", help="Model name in the repository.")],
    version: Annotated[str, typer.Option(help="Version to write; default: the next free one.")] = "",
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    data: Annotated[
        Path | None,
        typer.Option(
            help="CSV with a `text` column and optionally `label` (names; multi-label: a|b): the int8 check,"
            " and with labels the temperature and thresholds. Default: bundled finance check sentences."
        ),
    ] = None,
    languages: Annotated[str, typer.Option(help="Comma-separated languages the model is for.")] = "en",
) -> None:
    """Turn your own fine-tuned classifier checkpoint into a servable model version."""
    from transformers.utils import logging as transformers_logging

    from infermesh.model.importer import import_checkpoint

    logging.basicConfig(level=logging.WARNING)
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with refusals(2):
        target = import_checkpoint(
            path,
            repository,
            model,
            version,
            data,
            [code.strip() for code in languages.split(",") if code.strip()],
        )
    metrics = json.loads((target / "metrics.json").read_text())
    typer.echo(
        json.dumps(
            {
                "version": str(target),
                "architecture": metrics["architecture"],
                "activation": metrics["activation"],
                "default_variant": metrics["default_variant"],
                "int8_fp32_label_agreement": metrics["int8_fp32_label_agreement"],
                "temperature": metrics["temperature"],
            },
            indent=2,
        )
    )


@app.command("add-head")
def add_head(
    train_file: Annotated[Path, typer.Option("--train", help="Training data for the new head: .csv or .jsonl.")],
    valid_file: Annotated[Path, typer.Option("--valid", help="Validation data, same format.")],
    model: Annotated[str, typer.Option(help="Model in the repository whose encoder the head reads.")],
    head: Annotated[str, typer.Option(help="The new head's name (e.g. topic); it names its outputs.")],
    base_version: Annotated[str, typer.Option(help="Version to add to; default: the serving one.")] = "",
    labels: Annotated[
        str, typer.Option(help="Comma-separated label set in output order; default: the training labels, sorted.")
    ] = "",
    label_map: Annotated[str, typer.Option(help="Map file values to labels first, e.g. 0=Earnings,1=Macro.")] = "",
    text_column: Annotated[str, typer.Option(help="Column (CSV) or key (JSONL) holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column or key holding the label.")] = "label",
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    version: Annotated[str, typer.Option(help="Version to write; default: the next free one.")] = "",
    lora: Annotated[
        bool,
        typer.Option(
            "--lora/--head-only",
            help="Also adapt the encoder with LoRA, the existing heads distilled from the base version"
            " (docs/models.md); default: head only, the existing heads unchanged.",
        ),
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="With --lora: training epochs [default: 3].", min=1)] = None,
    lora_rank: Annotated[int | None, typer.Option(help="With --lora: the adapters' rank [default: 8].", min=1)] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            help="With --lora: least share of validation texts on which every existing head keeps the base"
            " version's answer; below it, nothing is written [default: 0.95].",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    distillation_weight: Annotated[
        float | None,
        typer.Option(
            help="With --lora: weight of keeping the existing heads' answers against learning the new head"
            " [default: 1.0].",
            min=0.0,
        ),
    ] = None,
) -> None:
    """Add a head for a new label set onto a version's encoder: a new version whose heads all
    answer from one forward pass. Head only, the existing heads answer exactly as before;
    with --lora, the encoder adapts to the new task too and they stay close (measured)."""
    from infermesh.model.heads import EncoderTraining
    from infermesh.model.heads import add_head as run_add_head

    logging.basicConfig(level=logging.WARNING)
    lora_options = {
        "epochs": epochs,
        "lora_rank": lora_rank,
        "min_agreement": min_agreement,
        "distillation_weight": distillation_weight,
    }
    given = {name: value for name, value in lora_options.items() if value is not None}
    if given and not lora:
        typer.echo(f"error: {', '.join('--' + n.replace('_', '-') for n in given)} only apply with --lora", err=True)
        raise typer.Exit(2)
    encoder = None
    if lora:
        defaults = EncoderTraining()
        rank = lora_rank or defaults.lora_rank
        encoder = dataclasses.replace(
            defaults,
            epochs=epochs or defaults.epochs,
            lora_rank=rank,
            lora_alpha=2 * rank,
            min_agreement=defaults.min_agreement if min_agreement is None else min_agreement,
            distillation_weight=defaults.distillation_weight if distillation_weight is None else distillation_weight,
        )
    with refusals(2):
        spec = labelled_files(train_file, valid_file, text_column, label_column, labels, label_map)
        target = run_add_head(spec, repository, model, head, base_version, version, encoder=encoder)
    metrics = json.loads((target / "metrics.json").read_text())
    default = metrics["variants"][metrics["default_variant"]]
    typer.echo(
        json.dumps(
            {
                "version": str(target),
                "head": head,
                "encoder": metrics["encoder"],
                **({"chosen_epoch": metrics["history"][-1]["chosen_epoch"]} if lora else {}),
                "accuracy": round(default["accuracy"], 4),
                "macro_f1": round(default["macro_f1"], 4),
                "default_variant": metrics["default_variant"],
                "existing_heads_label_agreement": {
                    name: round(figures["label_agreement"], 4) for name, figures in metrics["kept_heads"].items()
                },
            },
            indent=2,
        )
    )


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Labelled CSV (text,label; TFNS coding).")],
    topic_data: Annotated[
        Path | None, typer.Option(help="Topic CSV (Twitter Financial News Topic coding) for the topic head.")
    ] = None,
    news_data: Annotated[
        Path | None, typer.Option(help="News sentences (text,label with label names) for the primary head.")
    ] = None,
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    name: Annotated[str, typer.Option(help="Model name.")] = "finance-sentiment",
    version: Annotated[str, typer.Option(help="Version; empty means the latest.")] = "",
    weights: Annotated[Path, typer.Option(help="Trained adapter folder (metrics.json goes here).")] = DEFAULT_WEIGHTS,
    card: Annotated[Path, typer.Option(help="Model card to (re)write.")] = Path("docs/model-card.md"),
) -> None:
    """Score the built ONNX variants on labelled data; write metrics.json and the model card."""
    from infermesh.model.card import write_model_card
    from infermesh.model.evaluate import evaluate_repository_model

    metrics = evaluate_repository_model(repository, name, version, data, topic_data, news_data)
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(weights, card)
    summaries = [metrics, *metrics.get("heads", {}).values(), *([metrics["news"]] if "news" in metrics else [])]
    brief = [{k: v for k, v in figures.items() if k not in ("variants", "heads", "news")} for figures in summaries]
    typer.echo(json.dumps(brief, indent=2))


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="JSON Lines file of finance.news.v1 items; - for stdin.")],
) -> None:
    """Send your own news items to finance.news.v1 (keyed by id); bad lines are reported, not sent."""
    from kafka import KafkaProducer
    from opentelemetry import trace

    from shared.kafka import KafkaSettings
    from shared.kafka_tracing import inject_headers
    from shared.messages import NEWS_TOPIC, PoisonRecord, decode_news
    from shared.telemetry import configure_tracing

    configure_tracing("infermesh-cli")
    tracer = trace.get_tracer(__name__)

    lines = sys.stdin.buffer.read().splitlines() if str(file) == "-" else file.read_bytes().splitlines()
    producer = KafkaProducer(**KafkaSettings().client_config(), acks="all", enable_idempotence=True)
    sent = rejected = 0
    pending = []
    try:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = decode_news(line, max_bytes=1 << 20)
            except PoisonRecord as poison:
                typer.echo(f"line {number}: {poison.reason}: {poison.detail}", err=True)
                rejected += 1
                continue
            with tracer.start_as_current_span("produce news", kind=trace.SpanKind.PRODUCER):
                pending.append(
                    (number, producer.send(NEWS_TOPIC, key=item.id.encode(), value=line, headers=inject_headers()))
                )
        producer.flush()
        for number, future in pending:
            try:
                future.get(timeout=30)
                sent += 1
            except Exception as error:  # the broker refused it (too large, unauthorised, ...)
                typer.echo(f"line {number}: not accepted by Kafka: {error}", err=True)
                rejected += 1
    finally:
        producer.close()
    typer.echo(json.dumps({"sent": sent, "rejected": rejected}))
    if rejected:
        raise typer.Exit(1)


@app.command()
def tail(
    topic: Annotated[
        Topic,
        typer.Argument(
            help="Which topic to print: news (finance.news.v1), sentiment (finance.sentiment.v1), windows"
            " (finance.sentiment.windows.v1), alerts (finance.alerts.v1), topics (finance.sentiment.topics.v1),"
            " topic-windows (finance.topics.windows.v1), topic-alerts (finance.topics.alerts.v1),"
            " dlq (finance.news.v1.dlq).",
            show_default=False,
        ),
    ],
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest record.")] = True,
    limit: Annotated[int, typer.Option(help="Stop after this many records (0: never).")] = 0,
    idle_seconds: Annotated[float, typer.Option(help="Stop after this long without records (0: never).")] = 0,
) -> None:
    """Print a topic's records as JSON lines (dead letters with their reason headers).

    Per ticker: sentiment (scored items), windows, alerts. Per topic: topics (scored items
    keyed by topic), topic-windows, topic-alerts. Also news (the input) and dlq."""
    from kafka import KafkaConsumer

    from shared import messages
    from shared.kafka import KafkaSettings

    name = {
        Topic.news: messages.NEWS_TOPIC,
        Topic.sentiment: messages.SENTIMENT_TOPIC,
        Topic.windows: messages.WINDOWS_TOPIC,
        Topic.alerts: messages.ALERTS_TOPIC,
        Topic.topics: messages.TOPIC_SENTIMENT_TOPIC,
        Topic.topic_windows: messages.TOPIC_WINDOWS_TOPIC,
        Topic.topic_alerts: messages.TOPIC_ALERTS_TOPIC,
        Topic.dlq: messages.DLQ_TOPIC,
    }[topic]
    consumer = KafkaConsumer(
        name,
        **KafkaSettings().client_config(),
        auto_offset_reset="earliest" if from_beginning else "latest",
        consumer_timeout_ms=int(idle_seconds * 1000) if idle_seconds else float("inf"),
    )
    printed = 0
    try:
        for record in consumer:
            if topic is Topic.dlq:
                line = {
                    "headers": {key: value.decode("utf-8", "replace") for key, value in record.headers},
                    "value": record.value.decode("utf-8", "replace"),
                }
                typer.echo(json.dumps(line))
            else:
                typer.echo(record.value.decode("utf-8", "replace"))
            printed += 1
            if limit and printed >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


@app.command()
def schema() -> None:
    """Print the JSON Schema of finance.news.v1 items."""
    from shared.messages import news_json_schema

    typer.echo(json.dumps(news_json_schema(), indent=2))


@app.command("hash-key")
def hash_key(
    name: Annotated[str, typer.Option(help="Name of the key in the gateway's api_keys (logs and limits use it).")],
    stdin: Annotated[bool, typer.Option("--stdin", help="Hash the key read from stdin instead of making one.")] = False,
) -> None:
    """Make a new random API key (or hash yours from stdin) and print the gateway's entry for it.

    The gateway keeps only the `sha256:` hash (INFERMESH_GATEWAY_API_KEYS='{"<name>": "sha256:..."}');
    a made key is printed this once, so hand it to its user now."""
    from gateway.apikeys import MIN_KEY_CHARS, check_key_name, hash_api_key, new_api_key

    with refusals(2):
        check_key_name(name)
        if stdin:
            key = sys.stdin.read().strip()
            # A fast hash protects only keys no one can guess, so short keys are refused.
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(
                    f"the key on stdin has {len(key)} characters; use a random one of {MIN_KEY_CHARS} or more"
                    " (run without --stdin to make one)"
                )
        else:
            key = new_api_key()
    entry = hash_api_key(key)
    printed: dict[str, object] = {"name": name, "hash": entry, "api_keys": {name: entry}}
    if not stdin:
        printed["key"] = key
        typer.echo("the key is shown only this once; the gateway keeps only its hash", err=True)
    typer.echo(json.dumps(printed, indent=2))
