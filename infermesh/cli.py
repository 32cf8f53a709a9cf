"""The `infermesh` command."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="infermesh: finance sentiment inference mesh.", no_args_is_help=True)

DEFAULT_WEIGHTS = Path(__file__).parent / "model" / "weights" / "finance-sentiment"


class Service(StrEnum):
    tokenizer = "tokenizer"
    inference = "inference"
    postprocessor = "postprocessor"


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def run(
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
) -> None:
    """Run every service as a local process until Ctrl-C."""
    from infermesh.mesh import SERVICES, LocalMesh

    if not any(repository.glob("*/*/config.json")):
        typer.echo(f"no model in {repository}; run `infermesh build-model` (or `make model`) first", err=True)
        raise typer.Exit(2)
    mesh = LocalMesh(repository.resolve())
    typer.echo("starting tokenizer, inference and post-processor ...")
    mesh.start()
    for spec in SERVICES:
        typer.echo(f"  {spec.name:<14} grpc://{mesh.address(spec)}")
    typer.echo('ready. try: infermesh classify "Apple shares plunge after weak iPhone sales"   (Ctrl-C stops)')
    # Installed explicitly: a shell that starts us in the background sets SIGINT to
    # "ignore", and Python then never raises KeyboardInterrupt on Ctrl-C.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _raise_keyboard_interrupt)
    try:
        exited = mesh.wait()
        typer.echo(f"{exited} exited; stopping the others", err=True)
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        mesh.stop()
    typer.echo("stopped")


@app.command()
def serve(service: Service) -> None:
    """Run one service in the foreground (settings from INFERMESH_<SERVICE>_* variables)."""
    from shared.telemetry import configure_logging

    if service is Service.tokenizer:
        from services.tokenizer.server import serve as serve_tokenizer
        from services.tokenizer.settings import TokenizerSettings

        tokenizer_settings = TokenizerSettings()
        configure_logging(tokenizer_settings.log_json, tokenizer_settings.log_level)
        asyncio.run(serve_tokenizer(tokenizer_settings))
    elif service is Service.inference:
        from services.inference.server import serve as serve_inference
        from services.inference.settings import InferenceSettings

        inference_settings = InferenceSettings()
        configure_logging(inference_settings.log_json, inference_settings.log_level)
        asyncio.run(serve_inference(inference_settings))
    else:
        from services.postprocessor.server import serve as serve_postprocessor
        from services.postprocessor.settings import PostprocessorSettings

        post_settings = PostprocessorSettings()
        configure_logging(post_settings.log_json, post_settings.log_level)
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
    """Classify texts through the running services and print JSON."""
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
) -> None:
    """Fine-tune the finance classifier with LoRA on the packaged encoder."""
    from infermesh.model.train import train as run_training

    logging.basicConfig(level=logging.INFO)
    summary = run_training(train_file, valid_file, out)
    typer.echo(json.dumps(summary["validation_torch"], indent=2))


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


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Labelled CSV (text,label; TFNS coding).")],
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    name: Annotated[str, typer.Option(help="Model name.")] = "finance-sentiment",
    version: Annotated[str, typer.Option(help="Version; empty means the latest.")] = "",
    weights: Annotated[Path, typer.Option(help="Trained adapter folder (metrics.json goes here).")] = DEFAULT_WEIGHTS,
    card: Annotated[Path, typer.Option(help="Model card to (re)write.")] = Path("docs/model-card.md"),
) -> None:
    """Score the built ONNX variants on labelled data; write metrics.json and the model card."""
    from infermesh.model.card import write_model_card
    from infermesh.model.evaluate import evaluate_repository_model

    metrics = evaluate_repository_model(repository, name, version, data)
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(weights, card)
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "variants"}, indent=2))
