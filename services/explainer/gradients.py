"""Integrated gradients on the served version's fine-tuned weights (the merged model in
the version's `hf/` folder), with respect to the input embeddings."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModelForSequenceClassification

#: Path points evaluated per forward/backward pass; bounds memory for long paths.
STEPS_PER_PASS = 32


@dataclass(frozen=True)
class GradientAttribution:
    tokens: npt.NDArray[np.float64]
    """One attribution per token of the target's calibrated probability."""
    at_input: float
    """f(input): the target probability of the text."""
    at_baseline: float
    """f(baseline): the target probability with every word replaced by [PAD]."""


class IntegratedGradients:
    """Straight path from a baseline in which every non-special token's embedding is
    [PAD]'s; [CLS] and [SEP] stay, so they get no attribution."""

    def __init__(self, hf_folder: Path, temperature: float, pad_id: int = 0, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(hf_folder).eval()
        self.temperature = temperature
        self.pad_id = pad_id
        # torch modules are not safe to run from several threads at once.
        self._lock = threading.Lock()

    def attribute(self, input_ids: list[int], special: list[bool], target: int, steps: int) -> GradientAttribution:
        with self._lock, torch.enable_grad():
            ids = torch.tensor([input_ids])
            embed = self.model.get_input_embeddings()
            inputs = embed(ids).detach()[0]
            baseline = inputs.clone()
            keep = torch.tensor(special)
            baseline[~keep] = embed(torch.tensor([self.pad_id])).detach()[0]
            alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint rule
            total = torch.zeros_like(inputs)
            for start in range(0, steps, STEPS_PER_PASS):
                chunk = alphas[start : start + STEPS_PER_PASS][:, None, None]
                path = (baseline + chunk * (inputs - baseline)).requires_grad_(True)
                probability = self._target_probability(path, target)
                (gradient,) = torch.autograd.grad(probability.sum(), path)
                total += gradient.sum(dim=0)
            attributions = ((inputs - baseline) * total / steps).sum(dim=-1)
            with torch.no_grad():
                ends = self._target_probability(torch.stack([inputs, baseline]), target)
        return GradientAttribution(
            tokens=attributions.detach().double().numpy(),
            at_input=float(ends[0]),
            at_baseline=float(ends[1]),
        )

    def _target_probability(self, embeddings: torch.Tensor, target: int) -> torch.Tensor:
        batch, length, _ = embeddings.shape
        logits = self.model(
            inputs_embeds=embeddings,
            attention_mask=torch.ones((batch, length), dtype=torch.long),
            token_type_ids=torch.zeros((batch, length), dtype=torch.long),
        ).logits
        return torch.softmax(logits / self.temperature, dim=-1)[:, target]
