"""The explainer's core: attributions per token and per word, and how faithful they are.

Integrated gradients run on the served version's weights in this process (fp32 torch,
not the served graph: each explanation says so and flags when the two disagree on the
label); occlusion and every faithfulness figure are scored through the inference service,
so they measure the model callers actually get (int8, ONNX Runtime today).

A version may have several classification heads over one encoder; an explanation is of
one head (the request's, else the primary), computed on that head's columns of the logits
alone with its own activation and temperature, so its labels, probabilities, attributions
and faithfulness figures are all that head's.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from services.explainer.gradients import GradientAttribution, IntegratedGradients
from services.tokenizer.api import Chunk, Tokenizer
from shared.errors import DeadlineExceeded, InputTooLarge, InvalidInput, UnknownHead
from shared.model_repository import Head

_tracer = trace.get_tracer(__name__)

#: ERASER-style "top k%" word sets.
TOP_PERCENTS = (0.1, 0.2, 0.5)


class Method(enum.Enum):
    INTEGRATED_GRADIENTS = "integrated_gradients"
    OCCLUSION = "occlusion"


class ProbabilityModel(Protocol):
    async def probabilities(
        self, sequences: Sequence[Sequence[int]], timeout: float, head: Head
    ) -> npt.NDArray[np.float64]:
        """`head`'s calibrated probabilities, one row per sequence, one column per label of it."""
        ...


@dataclass(frozen=True)
class ExplainLimits:
    max_texts: int = 8
    max_chunks: int = 8
    """Chunks per text (each is explained)."""
    default_steps: int = 32
    max_steps: int = 256
    max_gradient_token_steps: int = 32_768
    """Integrated-gradient work per request: tokens x steps, summed over every chunk."""
    random_trials: int = 5
    """Random word sets per top-k% size for the baseline figures."""
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class TokenAttribution:
    text: str
    start: int
    end: int
    word_index: int
    attribution: float


@dataclass(frozen=True)
class WordAttribution:
    text: str
    start: int
    end: int
    attribution: float


@dataclass(frozen=True)
class Faithfulness:
    top_percent: float
    comprehensiveness: float
    sufficiency: float
    random_comprehensiveness: float
    random_sufficiency: float


@dataclass
class ChunkExplanation:
    char_start: int
    char_end: int
    tokens: list[TokenAttribution]
    words: list[WordAttribution]
    target_probability: float
    faithfulness: list[Faithfulness] = field(default_factory=list)
    completeness_gap: float | None = None
    gradient_target_probability: float | None = None
    """Integrated gradients only: the target probability under the weights the gradients
    ran on; `target_probability` is the served model's."""


@dataclass
class Explanation:
    label: str
    probabilities: dict[str, float]
    target_label: str
    chunks: list[ChunkExplanation]
    deciding_chunk: int
    gradient_label: str = ""
    """Integrated gradients only: the label of the weights the gradients ran on, its
    chunks combined as `label`'s are; `label` and `probabilities` are the served model's."""
    gradient_probabilities: dict[str, float] = field(default_factory=dict)
    gradients_disagree: bool = False
    """`gradient_label` differs from `label`: the attributions explain a model that
    decides otherwise than the one that answered."""


@dataclass(frozen=True)
class ExplainPlan:
    """A validated, tokenized request: what `Explainer.run` works on."""

    texts: list[str]
    chunks: list[list[Chunk]]
    method: Method
    target_label: str
    steps: int
    head: Head
    """The head explained: labels, probabilities and attributions are its alone."""

    @property
    def gradient_token_steps(self) -> int:
        """Integrated-gradient work: tokens x steps over every chunk (0 for occlusion)."""
        if self.method is not Method.INTEGRATED_GRADIENTS:
            return 0
        return sum(len(chunk.input_ids) for chunks in self.chunks for chunk in chunks) * self.steps


@dataclass
class _Words:
    """A chunk's words: the token positions of each, in order."""

    positions: list[list[int]]

    def without(self, ids: Sequence[int], removed: set[int]) -> list[int]:
        dropped = {p for w in removed for p in self.positions[w]}
        return [token for position, token in enumerate(ids) if position not in dropped]

    def only(self, ids: Sequence[int], kept: set[int]) -> list[int]:
        wanted = sorted(p for w in kept for p in self.positions[w])
        return [ids[0], *(ids[p] for p in wanted), ids[-1]]


class Explainer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model: ProbabilityModel,
        gradients: IntegratedGradients,
        heads: Sequence[Head],
        limits: ExplainLimits | None = None,
        seed: int = 0,
    ) -> None:
        """`heads`: the version's heads, primary first (`ModelConfig.heads`)."""
        if not heads:
            raise ValueError("an explainer needs at least one head")
        self.tokenizer = tokenizer
        self.model = model
        self.gradients = gradients
        self.heads = list(heads)
        self.limits = limits or ExplainLimits()
        self.seed = seed

    def attribution_model(self, method: Method, served_variant: str) -> str:
        """The weights `method`'s attributions are computed on, in words; `served_variant`
        is what `model` (the inference service) serves, e.g. "int8"."""
        if method is Method.INTEGRATED_GRADIENTS:
            return self.gradients.description
        return f"served {served_variant} (inference service)"

    def head(self, name: str = "") -> Head:
        """The head called `name`; "" is the primary head. UnknownHead naming the heads
        there are for a name the version lacks."""
        for head in self.heads:
            if head.name == name or (not name and head.primary):
                return head
        raise UnknownHead(
            f"model {self.tokenizer.model_name!r} has no head {name!r}; heads are {[h.name for h in self.heads]}"
        )

    async def explain(
        self,
        texts: Sequence[str],
        method: Method,
        target_label: str = "",
        steps: int = 0,
        timeout_seconds: float | None = None,
        head: str = "",
    ) -> list[Explanation]:
        """`prepare` then `run`."""
        plan = await self.prepare(texts, method, target_label, steps, head)
        return await self.run(plan, timeout_seconds)

    async def prepare(
        self, texts: Sequence[str], method: Method, target_label: str = "", steps: int = 0, head: str = ""
    ) -> ExplainPlan:
        """Checks the request against every limit, its cost included, and tokenizes it:
        cheap, so a request that can never be served is refused before it queues. `head`:
        the head to explain ("" the primary); `target_label` must be one of its labels."""
        limits = self.limits
        explained = self.head(head)
        if not texts:
            raise InvalidInput("texts is empty; send at least one text")
        if len(texts) > limits.max_texts:
            raise InputTooLarge(f"request has {len(texts)} texts; max is {limits.max_texts} per explanation")
        steps = steps or limits.default_steps
        if steps > limits.max_steps:
            raise InputTooLarge(f"steps is {steps}; max is {limits.max_steps}")
        if target_label and target_label not in explained.labels:
            raise InvalidInput(
                f"unknown target label {target_label!r} for head {explained.name!r}; its labels are {explained.labels}"
            )
        with _tracer.start_as_current_span("tokenize", attributes={"infermesh.texts": len(texts)}):
            tokenized = await self.tokenizer.tokenize_async(texts, return_offsets=True)
        for index, result in enumerate(tokenized):
            if len(result.chunks) > limits.max_chunks:
                raise InputTooLarge(f"text {index} needs {len(result.chunks)} chunks; max is {limits.max_chunks}")
        plan = ExplainPlan(list(texts), [result.chunks for result in tokenized], method, target_label, steps, explained)
        if plan.gradient_token_steps > limits.max_gradient_token_steps:
            tokens = plan.gradient_token_steps // steps
            chunks = sum(len(c) for c in plan.chunks)
            raise InputTooLarge(
                f"integrated gradients over {tokens} tokens ({chunks} chunks) x {steps} steps = "
                f"{plan.gradient_token_steps} token-steps; max is {limits.max_gradient_token_steps} per request "
                "(send fewer or shorter texts, or fewer steps)"
            )
        return plan

    async def run(self, plan: ExplainPlan, timeout_seconds: float | None = None) -> list[Explanation]:
        """`timeout_seconds`: the caller's remaining budget (its gRPC deadline), capped by
        `limits.timeout_seconds`; every inference call gets what is left of it, and
        integrated gradients stop within one pass once it is gone. Nothing starts if it
        is gone already."""
        limits = self.limits
        budget = limits.timeout_seconds if timeout_seconds is None else min(timeout_seconds, limits.timeout_seconds)
        if budget <= 0:
            raise DeadlineExceeded("the caller's deadline had passed before the explanation started")
        deadline = time.monotonic() + budget
        return [
            await self._explain_text(text, chunks, plan.head, plan.method, plan.target_label, plan.steps, deadline)
            for text, chunks in zip(plan.texts, plan.chunks, strict=True)
        ]

    async def _explain_text(
        self,
        text: str,
        chunks: list[Chunk],
        head: Head,
        method: Method,
        target_label: str,
        steps: int,
        deadline: float,
    ) -> Explanation:
        labels = head.labels
        with _tracer.start_as_current_span(
            "score text", attributes={"infermesh.chunks": len(chunks), "infermesh.head": head.name}
        ):
            full = await self.model.probabilities([c.input_ids for c in chunks], _remaining(deadline), head)
        weights = np.array([len(c.input_ids) for c in chunks], dtype=np.float64)
        combined = (full * weights[:, None]).sum(axis=0) / weights.sum()
        # A sigmoid head's labels hold each on its own: the predicted one is the most probable.
        label = labels[int(combined.argmax())]
        target = labels.index(target_label or label)
        explained: list[ChunkExplanation] = []
        gradient_rows: list[npt.NDArray[np.float64]] = []
        for i, chunk in enumerate(chunks):
            chunk_explanation, gradient_probabilities = await self._explain_chunk(
                text, chunk, full[i, target], head, target, method, steps, deadline
            )
            explained.append(chunk_explanation)
            if gradient_probabilities is not None:
                gradient_rows.append(gradient_probabilities)
        explanation = Explanation(
            label=label,
            probabilities={name: float(p) for name, p in zip(labels, combined, strict=True)},
            target_label=labels[target],
            chunks=explained,
            deciding_chunk=int(full[:, target].argmax()),
        )
        if gradient_rows:
            # The gradients' own weights, combined over chunks exactly as the served label is.
            gradient_combined = (np.stack(gradient_rows) * weights[:, None]).sum(axis=0) / weights.sum()
            explanation.gradient_label = labels[int(gradient_combined.argmax())]
            explanation.gradient_probabilities = {
                name: float(p) for name, p in zip(labels, gradient_combined, strict=True)
            }
            explanation.gradients_disagree = explanation.gradient_label != label
        return explanation

    async def _explain_chunk(
        self,
        text: str,
        chunk: Chunk,
        probability: float,
        head: Head,
        target: int,
        method: Method,
        steps: int,
        deadline: float,
    ) -> tuple[ChunkExplanation, npt.NDArray[np.float64] | None]:
        """The chunk's explanation of `head`'s label `target`, and for integrated gradients
        every label of the head's probability under the gradients' weights."""
        assert chunk.offsets is not None and chunk.word_ids is not None
        ids = chunk.input_ids
        # Word ids restart per chunk in our numbering: map the chunk's word ids to 0..n-1.
        order: dict[int, int] = {}
        for word_id in chunk.word_ids:
            if word_id >= 0 and word_id not in order:
                order[word_id] = len(order)
        words = _Words([[] for _ in order])
        for position, word_id in enumerate(chunk.word_ids):
            if word_id >= 0:
                words.positions[order[word_id]].append(position)

        gap = None
        gradient: GradientAttribution | None = None
        if method is Method.INTEGRATED_GRADIENTS:
            special = [word_id < 0 for word_id in chunk.word_ids]
            with _tracer.start_as_current_span(
                "integrated gradients", attributes={"infermesh.steps": steps, "infermesh.tokens": len(ids)}
            ):
                result = gradient = await self._attribute(ids, special, head, target, steps, deadline)
            token_scores = result.tokens
            gap = abs(float(token_scores.sum()) - (result.at_input - result.at_baseline))
        else:
            variants = [words.without(ids, {w}) for w in range(len(words.positions))]
            with _tracer.start_as_current_span("occlusion", attributes={"infermesh.variants": len(variants)}):
                scored = await self.model.probabilities(variants, _remaining(deadline), head)
            token_scores = np.zeros(len(ids))
            for w, positions in enumerate(words.positions):
                drop = probability - scored[w, target]
                token_scores[positions] = drop / len(positions)

        word_scores = [float(sum(token_scores[p] for p in positions)) for positions in words.positions]
        spans = [(chunk.offsets[p[0]][0], chunk.offsets[p[-1]][1]) for p in words.positions]
        explanation = ChunkExplanation(
            char_start=chunk.char_start,
            char_end=chunk.char_end,
            tokens=[
                TokenAttribution(
                    text=text[start:end] if word_id >= 0 else ("[CLS]" if position == 0 else "[SEP]"),
                    start=start,
                    end=end,
                    word_index=order[word_id] if word_id >= 0 else -1,
                    attribution=float(token_scores[position]),
                )
                for position, ((start, end), word_id) in enumerate(zip(chunk.offsets, chunk.word_ids, strict=True))
            ],
            words=[
                WordAttribution(text=text[s:e], start=s, end=e, attribution=score)
                for (s, e), score in zip(spans, word_scores, strict=True)
            ],
            target_probability=float(probability),
            completeness_gap=gap,
            gradient_target_probability=None if gradient is None else gradient.at_input,
        )
        explanation.faithfulness = await self._faithfulness(
            ids, words, word_scores, probability, head, target, deadline
        )
        return explanation, None if gradient is None else gradient.probabilities

    async def _attribute(
        self, ids: list[int], special: list[bool], head: Head, target: int, steps: int, deadline: float
    ) -> GradientAttribution:
        """Integrated gradients in a worker thread that stops within one pass once the
        deadline passes or the caller goes away (a thread cannot be cancelled; without
        this it would hold the model long after anyone waited for the answer)."""
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the explanation's deadline ran out before integrated gradients started")
        stop = threading.Event()
        try:
            return await asyncio.to_thread(
                self.gradients.attribute, ids, special, head, target, steps, deadline=deadline, stop=stop
            )
        except asyncio.CancelledError:
            stop.set()
            raise

    async def _faithfulness(
        self,
        ids: list[int],
        words: _Words,
        scores: list[float],
        probability: float,
        head: Head,
        target: int,
        deadline: float,
    ) -> list[Faithfulness]:
        count = len(scores)
        if count == 0:
            return []
        rng = np.random.default_rng(self.seed)
        ranked = sorted(range(count), key=lambda w: -scores[w])
        plans: list[tuple[float, set[int], list[set[int]]]] = []
        for share in TOP_PERCENTS:
            size = max(1, round(share * count))
            randoms = [
                set(rng.choice(count, size=size, replace=False).tolist()) for _ in range(self.limits.random_trials)
            ]
            plans.append((share, set(ranked[:size]), randoms))
        sequences: list[list[int]] = []
        for _, top, randoms in plans:
            for chosen in (top, *randoms):
                sequences.append(words.without(ids, chosen))
                sequences.append(words.only(ids, chosen))
        with _tracer.start_as_current_span("faithfulness", attributes={"infermesh.variants": len(sequences)}):
            scored = (await self.model.probabilities(sequences, _remaining(deadline), head))[:, target]
        figures = []
        row = 0
        for share, _, randoms in plans:
            drops = probability - scored[row : row + 2 * (1 + len(randoms))]
            row += 2 * (1 + len(randoms))
            figures.append(
                Faithfulness(
                    top_percent=share,
                    comprehensiveness=float(drops[0]),
                    sufficiency=float(drops[1]),
                    random_comprehensiveness=float(drops[2::2].mean()),
                    random_sufficiency=float(drops[3::2].mean()),
                )
            )
        return figures


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the explanation's deadline ran out before its next inference call")
    return remaining
