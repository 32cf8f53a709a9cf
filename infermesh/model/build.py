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

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from infermesh.model.encoder import BASE_PACKAGE, base_encoder_path, base_package_version

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
#: Tokens per chunk the services feed the model; longer texts are split into chunks.
SERVING_MAX_LENGTH = 128
NUM_HEADS = 12
HIDDEN_SIZE = 384


class _LogitsOnly(torch.nn.Module):
    """Exports a two-input graph: BERT's token_type_ids are always zero for one segment."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        logits: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        return logits


def load_merged_model(weights_dir: Path) -> Any:
    """The base encoder with the LoRA adapters merged in: a plain BertForSequenceClassification."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((weights_dir / "training.json").read_text())
    labels = summary["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(
        base_encoder_path(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    merged = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
    merged.eval()
    return merged


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    example_ids = torch.ones((2, 16), dtype=torch.int64)
    example_mask = torch.ones((2, 16), dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            _LogitsOnly(model),
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


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Fuses BERT subgraphs (attention, skip-layernorm, gelu) then quantises weights to
    7-bit int8 (see INT8_WEIGHT_LIMIT)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as scratch:
        fused = Path(scratch) / "fused.onnx"
        optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=NUM_HEADS, hidden_size=HIDDEN_SIZE)
        optimized.save_model_to_file(str(fused))
        quantize_dynamic(
            fused,
            int8_path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            # Fused contrib ops defeat shape inference; their outputs are fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_model_repository(
    weights_dir: Path,
    repository: Path,
    name: str,
    version: str = "1",
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Builds `repository/name/version` from `weights_dir`; returns the version folder.

    The version is assembled in a hidden staging folder and renamed into place whole, so a
    server watching the repository never sees half a version; `before_publish` may add
    files to the staging folder (evaluation figures, a card) before that happens."""
    summary = json.loads((weights_dir / "training.json").read_text())
    target = repository / name / version
    staging = repository / name / f".{version}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    torch.manual_seed(0)
    merged = load_merged_model(weights_dir)
    merged.save_pretrained(staging / "hf")
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(base_encoder_path() / tokenizer_file, staging / "hf" / tokenizer_file)
    shutil.copy(base_encoder_path() / "tokenizer.json", staging / "tokenizer.json")
    logger.info("exporting ONNX fp32")
    export_onnx(merged, staging / "model.fp32.onnx")
    logger.info("fusing and quantising to int8")
    quantize_int8(staging / "model.fp32.onnx", staging / "model.int8.onnx")

    labels = summary["labels"]
    config = {
        "name": name,
        "version": version,
        "platform": "onnxruntime_onnx",
        "base_model": f"{BASE_PACKAGE}=={base_package_version()}",
        "labels": labels,
        "max_sequence_length": SERVING_MAX_LENGTH,
        "vocab_size": merged.config.vocab_size,
        "temperature": summary["temperature"],
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}],
        "variants": {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"},
        "default_variant": "int8",
        "tokenizer": "tokenizer.json",
        "sha256": {
            file: sha256_of(staging / file) for file in ("model.fp32.onnx", "model.int8.onnx", "tokenizer.json")
        },
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if before_publish is not None:
        before_publish(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
