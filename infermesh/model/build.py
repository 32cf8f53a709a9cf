"""Serving artifacts from the packaged encoder plus the committed LoRA weights.

`build_model_repository` writes one version of a model into a Triton-style repository:

    models/<name>/<version>/
      config.json          signature, labels, max length, temperature, file hashes
      model.fp32.onnx      merged encoder + head, dynamic batch and sequence axes
      model.int8.onnx      the same after BERT graph fusion and dynamic int8 quantisation
      tokenizer.json       the encoder's WordPiece tokenizer
      hf/                  the merged model in transformers format (benchmarks, explainer)

Everything is derived from pinned packages and committed files, so a rebuild gives the
same artifacts without touching the network.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from infermesh.model.encoder import BASE_PACKAGE, base_encoder_path, base_package_version
from shared.classification import sentiment_scores
from shared.model_store import sha256_of

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
#: Tokens per chunk the services feed the model; longer texts are split into chunks.
SERVING_MAX_LENGTH = 128
#: transformers model types whose graphs ONNX Runtime's BERT optimizer fuses (the ones
#: optimum maps to its "bert" optimizer); others are quantised without fusion.
BERT_FUSION_TYPES = frozenset({"bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra"})


class _LogitsOnly(torch.nn.Module):
    """Exports a two-input graph: token_type_ids, where the model takes them, are always
    zero for one segment (DistilBERT and ModernBERT take none)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return logits


def output_columns(summary: dict[str, Any]) -> list[str]:
    """The output layer's columns from `training.json`: every head's labels side by side,
    primary head first (one head: its labels)."""
    heads = summary.get("heads")
    if not heads:
        return list(summary["labels"])
    return [label for head in heads for label in head["labels"]]


def head_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """config.json's head entries from `training.json`: the primary head's name, and the
    further heads with their labels and temperatures (see shared.model_repository)."""
    heads = summary.get("heads")
    if not heads:
        return {}
    return {
        "head": heads[0]["name"],
        "extra_heads": [
            {
                "name": head["name"],
                "labels": head["labels"],
                "temperature": head["temperature"],
                "scores": sentiment_scores(head["labels"]),
            }
            for head in heads[1:]
        ],
    }


def load_merged_model(weights_dir: Path) -> Any:
    """The base encoder with the LoRA adapters merged in: a plain BertForSequenceClassification
    whose output layer carries every head's columns."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((weights_dir / "training.json").read_text())
    columns = output_columns(summary)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_encoder_path(),
        num_labels=len(columns),
        id2label=dict(enumerate(columns)),
        # Heads may share a label name; ids keep the columns apart.
        label2id={f"{i}:{name}": i for i, name in enumerate(columns)},
    )
    merged = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
    merged.eval()
    return merged


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    example_ids = torch.ones((2, 16), dtype=torch.int64)
    example_mask = torch.ones((2, 16), dtype=torch.int64)
    wrapper = _LogitsOnly(model)
    # A new module is in training mode; torch.onnx.export exports in eval mode and then
    # restores the wrapper's mode on everything under it, which would leave `model`
    # training (dropout on) for whoever uses it next.
    wrapper.train(model.training)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example_ids, example_mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


#: Largest |weight| in the int8 graph. ONNX Runtime multiplies u8 activations by s8 weights;
#: without VNNI (AVX2 only) it sums adjacent products in int16 (vpmaddubsw), which saturates
#: when 2 x 255 x |w| > 32767, so full-range weights (127) gave other numbers there than on
#: VNNI/AMX machines. 7-bit weights (64: 2 x 255 x 64 = 32640) compute the same integers on
#: every x86 CPU (onnxruntime's `reduce_range`).
INT8_WEIGHT_LIMIT = 64


def quantize_int8(fp32_path: Path, int8_path: Path, encoder_config: Any) -> None:
    """Fuses BERT subgraphs (attention, skip-layernorm, gelu) where ONNX Runtime's
    optimizer knows the model type (BERT_FUSION_TYPES), with the head count and hidden size
    of `encoder_config` (a transformers config), then quantises weights to 7-bit int8 (see
    INT8_WEIGHT_LIMIT). Other types (DeBERTa-v2, ModernBERT) are quantised unfused."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as scratch:
        fused = Path(scratch) / "fused.onnx"
        if encoder_config.model_type in BERT_FUSION_TYPES:
            optimized = optimize_model(
                str(fp32_path),
                model_type="bert",
                num_heads=encoder_config.num_attention_heads,
                hidden_size=encoder_config.hidden_size,
            )
            optimized.save_model_to_file(str(fused))
        else:
            shutil.copy(fp32_path, fused)
        quantize_dynamic(
            fused,
            int8_path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            # Fused contrib ops defeat shape inference; their outputs are fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


@contextmanager
def staged_version(repository: Path, name: str, version: str, replace: bool = False) -> Iterator[Path]:
    """Yields a hidden staging folder for `repository/name/version`; when the block ends
    without an error the folder is renamed into place whole, so a server watching the
    repository never sees half a version. On an error everything this made is removed
    (the staging folder, and the model and repository folders if it created them).
    `replace` allows an existing version to be overwritten; without it, FileExistsError."""
    target = repository / name / version
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; versions are never overwritten")
    made = [folder for folder in (repository, repository / name) if not folder.exists()]
    staging = repository / name / f".{version}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def serving_config(
    staging: Path,
    name: str,
    version: str,
    labels: list[str],
    *,
    max_sequence_length: int,
    vocab_size: int,
    temperature: float,
    default_variant: str,
    **fields: Any,
) -> dict[str, Any]:
    """A version's config.json contents (see shared.model_repository.ModelConfig) for the
    ONNX variants in `staging`, with their and the tokenizer's hashes; `fields` adds or
    overrides entries (activation, thresholds, languages, base_model, extra_heads, ...)."""
    extra_columns = sum(len(head["labels"]) for head in fields.get("extra_heads", []))
    variants = {
        variant: file
        for variant, file in (("fp32", "model.fp32.onnx"), ("int8", "model.int8.onnx"))
        if (staging / file).is_file()
    }
    hashed = [*variants.values(), "tokenizer.json"]
    return {
        "name": name,
        "version": version,
        "platform": "onnxruntime_onnx",
        "labels": labels,
        "max_sequence_length": max_sequence_length,
        "vocab_size": vocab_size,
        "temperature": temperature,
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels) + extra_columns]}],
        "variants": variants,
        "default_variant": default_variant,
        "tokenizer": "tokenizer.json",
        **fields,
        "sha256": {file: sha256_of(staging / file) for file in hashed},
    }


def build_model_repository(
    weights_dir: Path,
    repository: Path,
    name: str,
    version: str = "1",
    before_publish: Callable[[Path], None] | None = None,
    languages: Sequence[str] = ("en",),
) -> Path:
    """Builds `repository/name/version` from `weights_dir`; returns the version folder.

    The version is assembled in a hidden staging folder and renamed into place whole, so a
    server watching the repository never sees half a version; `before_publish` may add
    files to the staging folder (evaluation figures, a card) before that happens."""
    summary = json.loads((weights_dir / "training.json").read_text())
    with staged_version(repository, name, version, replace=True) as staging:
        torch.manual_seed(0)
        merged = load_merged_model(weights_dir)
        merged.save_pretrained(staging / "hf")
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(base_encoder_path() / tokenizer_file, staging / "hf" / tokenizer_file)
        shutil.copy(base_encoder_path() / "tokenizer.json", staging / "tokenizer.json")
        logger.info("exporting ONNX fp32")
        export_onnx(merged, staging / "model.fp32.onnx")
        logger.info("fusing and quantising to int8")
        quantize_int8(staging / "model.fp32.onnx", staging / "model.int8.onnx", merged.config)
        config = serving_config(
            staging,
            name,
            version,
            summary["labels"],
            max_sequence_length=SERVING_MAX_LENGTH,
            vocab_size=merged.config.vocab_size,
            temperature=summary["temperature"],
            default_variant="int8",
            base_model=f"{BASE_PACKAGE}=={base_package_version()}",
            scores=sentiment_scores(summary["labels"]),
            languages=list(languages),
            **head_fields(summary),
        )
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if before_publish is not None:
            before_publish(staging)
    return repository / name / version
