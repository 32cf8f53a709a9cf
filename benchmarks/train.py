"""`make bench-train`: what `infermesh finetune` costs on this machine, and what it gives.

Fine-tunes the packaged encoder on a labelled data set (TFNS by default) into a scratch
copy of the model repository, then prints the training time, the whole command's time,
the process's peak resident memory, the trainable-parameter share, and the new version's
figures next to the default model's on the same validation file.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from infermesh.model.data import TFNS_TO_LABEL, read_labelled, to_examples
from infermesh.model.evaluate import evaluate_version
from infermesh.model.finetune import DataSpec, finetune
from infermesh.model.train import TrainConfig
from shared.model_repository import ModelRepository


def default_figures(repository: Path, name: str, valid: Path, label_map: dict[str, str]) -> dict[str, Any]:
    repo = ModelRepository(repository)
    config = repo.config(name)
    examples = to_examples(valid, read_labelled(valid), config.labels, label_map)
    report = evaluate_version(repo.path(name, config.version), examples, valid.name)
    return {"version": config.version, **report["variants"][report["default_variant"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--valid", type=Path, required=True)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="finance-sentiment")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("bench-results/train.json"))
    args = parser.parse_args()
    label_map = dict(TFNS_TO_LABEL)  # the default data set's coding
    labels = ModelRepository(args.repository).config(args.model).labels

    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch)
        (repository / args.model).mkdir()
        for version in ModelRepository(args.repository).versions(args.model):
            (repository / args.model / version).symlink_to((args.repository / args.model / version).resolve())
        started = time.perf_counter()
        target = finetune(
            DataSpec(args.train, args.valid, labels=tuple(labels), label_map=label_map),
            repository,
            args.model,
            config=TrainConfig(epochs=args.epochs),
        )
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = json.loads((target / "metrics.json").read_text())
    training = metrics["training"]
    new = metrics["variants"][metrics["default_variant"]]
    old = default_figures(args.repository, args.model, args.valid, label_map)

    print(f"\nfine-tuning {args.model} on {args.train.name} ({metrics['examples']:,} validation examples)")
    print(f"  epochs run / best          {training['epochs_run']} / {training['best_epoch']}")
    print(f"  training time              {training['training_seconds']:.0f} s")
    print(f"  whole command              {wall:.0f} s (training, ONNX export, int8, evaluation)")
    print(f"  peak resident memory       {peak_mb:.0f} MB")
    print(
        f"  trainable parameters       {training['trainable_parameters']:,} of {training['total_parameters']:,}"
        f" ({100 * training['trainable_share']:.2f}%)"
    )
    print(f"\n{'version':<28}{'accuracy':>10}{'macro-F1':>10}{'ECE (T)':>10}")
    for title, figures in ((f"default v{old['version']}", old), ("fine-tuned (new)", new)):
        print(f"{title:<28}{figures['accuracy']:>10.4f}{figures['macro_f1']:>10.4f}{figures['ece_calibrated']:>10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak_mb), "training": training}
    result |= {"default": old, "finetuned": new}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
