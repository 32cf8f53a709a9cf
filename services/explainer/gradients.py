"""Integrated gradients on the served version's fine-tuned weights (the merged model in
the version's `hf/` folder), with respect to the input embeddings.

The merged model has one logits output with every head's columns side by side (a version
may have several classification heads over one encoder); each call explains one head, on
its columns alone, calibrated as `shared.calibration.calibrated` calibrates them."""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModelForSequenceClassification

from shared.errors import DeadlineExceeded
from shared.model_repository import Head

#: Path points evaluated per forward/backward pass; bounds memory for long paths.
STEPS_PER_PASS = 32

#: How often a call waiting for the model (another call holds it) looks at its deadline.
_LOCK_POLL_SECONDS = 0.05

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Abandoned(Exception):
    """The caller went away (its task was cancelled); the computation stopped early."""


@dataclass(frozen=True)
class GradientAttribution:
    tokens: npt.NDArray[np.float64]
    """One attribution per token of the target's calibrated probability (its head's)."""
    at_input: float
    """f(input): the target probability of the text."""
    at_baseline: float
    """f(baseline): the target probability with every word replaced by [PAD]."""
    probabilities: npt.NDArray[np.float64]
    """Every label's calibrated probability of the text under these weights, the explained
    head's labels only (not the served graph's: an int8 graph may rank them otherwise)."""


class IntegratedGradients:
    """Straight path from a baseline in which every non-special token's embedding is
    [PAD]'s; [CLS] and [SEP] stay, so they get no attribution."""

    def __init__(self, hf_folder: Path, pad_id: int = 0, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(hf_folder).eval()
        self.pad_id = pad_id
        self.num_logits = int(self.model.config.num_labels)
        """Columns of the model's logits: every head's labels."""
        # DistilBERT and ModernBERT take no token types; BERT-likes get zeros (one segment).
        self._token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        dtype = next(self.model.parameters()).dtype
        # What the attributions are computed on, as responses report it: "torch fp32 (hf/)".
        self.description = f"torch {_DTYPE_NAMES.get(dtype, str(dtype))} ({hf_folder.name}/)"
        # torch modules are not safe to run from several threads at once.
        self._lock = threading.Lock()

    def attribute(
        self,
        input_ids: list[int],
        special: list[bool],
        head: Head,
        target: int,
        steps: int,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> GradientAttribution:
        """Attributions of `head`'s label `target` (an index into `head.labels`): of its
        calibrated probability over the head's own columns of the logits, with the head's
        activation and temperature.

        Runs in a worker thread. `deadline` (time.monotonic()) and `stop` are looked at
        while waiting for the model and before every pass of `STEPS_PER_PASS` path points,
        so an explanation nobody waits for any more frees the model within one pass:
        DeadlineExceeded once the deadline has passed, Abandoned once `stop` is set."""

        def check() -> None:
            if stop is not None and stop.is_set():
                raise Abandoned("the caller went away; integrated gradients stopped")
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"the deadline ran out during integrated gradients ({steps} steps over {len(input_ids)} tokens)"
                )

        if head.stop > self.num_logits or not 0 <= target < len(head.labels):
            raise ValueError(
                f"head {head.name!r} (columns {head.start}..{head.stop - 1}, label {target}) does not fit "
                f"the model's {self.num_logits} logits"
            )
        check()
        while not self._lock.acquire(timeout=_LOCK_POLL_SECONDS):
            check()
        try:
            with torch.enable_grad():
                ids = torch.tensor([input_ids])
                embed = self.model.get_input_embeddings()
                inputs = embed(ids).detach()[0]
                baseline = inputs.clone()
                keep = torch.tensor(special)
                baseline[~keep] = embed(torch.tensor([self.pad_id])).detach()[0]
                alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint rule
                total = torch.zeros_like(inputs)
                for start in range(0, steps, STEPS_PER_PASS):
                    check()
                    chunk = alphas[start : start + STEPS_PER_PASS][:, None, None]
                    path = (baseline + chunk * (inputs - baseline)).requires_grad_(True)
                    probability = self._target_probability(path, head, target)
                    (gradient,) = torch.autograd.grad(probability.sum(), path)
                    total += gradient.sum(dim=0)
                attributions = ((inputs - baseline) * total / steps).sum(dim=-1)
                with torch.no_grad():
                    ends = self._probabilities(torch.stack([inputs, baseline]), head)
        finally:
            self._lock.release()
        return GradientAttribution(
            tokens=attributions.detach().double().numpy(),
            at_input=float(ends[0, target]),
            at_baseline=float(ends[1, target]),
            probabilities=ends[0].double().numpy(),
        )

    def _target_probability(self, embeddings: torch.Tensor, head: Head, target: int) -> torch.Tensor:
        return self._probabilities(embeddings, head)[:, target]

    def _probabilities(self, embeddings: torch.Tensor, head: Head) -> torch.Tensor:
        batch, length, _ = embeddings.shape
        extra = {"token_type_ids": torch.zeros((batch, length), dtype=torch.long)} if self._token_types else {}
        logits = self.model(
            inputs_embeds=embeddings, attention_mask=torch.ones((batch, length), dtype=torch.long), **extra
        ).logits[:, head.start : head.stop]
        # The same rule as shared.calibration.calibrated, on torch tensors (gradients flow).
        if head.activation == "sigmoid":
            return torch.sigmoid(logits / head.temperature)
        return torch.softmax(logits / head.temperature, dim=-1)
