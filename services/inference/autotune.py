"""`backend=auto` on CPU: the fastest backend *on the CPU it runs on*, by measurement.

At a version's load the service times the candidates on synthetic inputs at the typical
shapes (batch 1 and 32, 32 and 128 tokens), interleaved and repeated, within a small time
budget, and keeps the default (ONNX Runtime with the version's default variant, int8)
unless a candidate whose labels agree with fp32 is faster by a margin. The decision is
cached per (version files, CPU model and kernel flags, settings), so restarts do not
measure again. docs/backends.md, "CPU: the default chosen by measurement", has the rule.

The parts:
- `cpu_candidates` and `choose` are pure (no clock, no files): tested on given figures;
- `measure` times backends with an injectable clock;
- `autotune_version` ties them to a version folder, the cache, the log and `/metrics`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from prometheus_client import Gauge
from tokenizers import Tokenizer

from services.inference.backends.base import Backend
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.backends.pytorch import TorchBackend
from shared.cpu import KERNEL_FLAGS, CpuInfo
from shared.model_repository import Head, ModelConfig
from shared.padding import pad_right

logger = logging.getLogger(__name__)

Objective = Literal["latency", "throughput", "balanced"]
Shape = tuple[int, int]
"""(rows, tokens) of one synthetic batch."""

#: The shapes timed: one headline and a bulk batch, short and at the model's usual cap.
SHAPES: tuple[Shape, ...] = ((1, 32), (1, 128), (32, 32), (32, 128))
#: Weight of each shape in the comparison, per objective (each row sums to 1).
OBJECTIVE_WEIGHTS: dict[str, dict[Shape, float]] = {
    "latency": {(1, 32): 0.4, (1, 128): 0.4, (32, 32): 0.1, (32, 128): 0.1},
    "throughput": {(1, 32): 0.1, (1, 128): 0.1, (32, 32): 0.4, (32, 128): 0.4},
    "balanced": {(1, 32): 0.25, (1, 128): 0.25, (32, 32): 0.25, (32, 128): 0.25},
}
#: Calls per batch-1 trial (one 3 ms call is too short to time alone on a busy machine).
SINGLE_ROW_CALLS = 4
#: Bumped when the cached decision's meaning changes; old cache files are then ignored.
CACHE_SCHEMA = 1
#: Check sentences the int8 build check uses; the agreement inputs when a version records none.
CHECK_SENTENCES = Path(__file__).resolve().parents[2] / "infermesh" / "model" / "check_sentences.txt"

BACKEND_CHOICE = Gauge(
    "infermesh_inference_backend_choice",
    "1 for the backend and variant each loaded version runs; source: measured, cache, or setting",
    ["model", "version", "backend", "variant", "source"],
)


@dataclass(frozen=True, order=True)
class Candidate:
    backend: str
    """onnxruntime or torch."""
    variant: str
    """int8 or fp32 (ONNX Runtime's graph), bf16 or fp32 (torch's dtype)."""

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.variant}"


REFERENCE = Candidate("onnxruntime", "fp32")
"""What agreement is measured against: the exported graph, unquantised."""


def cpu_candidates(
    flags: frozenset[str], variants: Sequence[str], has_torch_weights: bool, include_torch_fp32: bool = False
) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates worth timing on a CPU with these flags, and why the others are not.

    ONNX Runtime runs each of the version's variants. torch bf16 only where AMX multiplies
    bf16 (`amx_bf16`): elsewhere it is emulated and slower than fp32. torch fp32 runs the
    same fp32 arithmetic as ONNX Runtime fp32, eagerly, and was never faster here; it is
    timed only when asked for."""
    chosen = [Candidate("onnxruntime", v) for v in sorted(variants) if v in ("int8", "fp32")]
    excluded: dict[str, str] = {}
    bf16 = Candidate("torch", "bf16")
    if not has_torch_weights:
        excluded[bf16.label] = "the version has no transformers weights (hf/)"
    elif "amx_bf16" not in flags:
        excluded[bf16.label] = "no AMX (amx_bf16) on this CPU"
    else:
        chosen.append(bf16)
    torch_fp32 = Candidate("torch", "fp32")
    if include_torch_fp32 and has_torch_weights:
        chosen.append(torch_fp32)
    else:
        excluded[torch_fp32.label] = "same fp32 arithmetic as onnxruntime-fp32, eager; not timed"
    return chosen, excluded


@dataclass(frozen=True)
class Figures:
    """What was measured: the inputs of `choose`."""

    seconds: Mapping[str, Mapping[Shape, float]]
    """Candidate label -> shape -> median seconds per call over the trials."""
    trials: int
    """Interleaved rounds completed (each round times every candidate at every shape once)."""
    agreement: Mapping[str, float]
    """Candidate label -> share of inputs given the same label as ONNX Runtime fp32."""
    agreement_source: Mapping[str, str] = field(default_factory=dict)
    """Candidate label -> where its agreement comes from (metrics.json, or the inputs used)."""


@dataclass(frozen=True)
class Decision:
    backend: str
    variant: str
    reason: str
    speedups: dict[str, float]
    """Candidate label -> weighted speed relative to the default (above 1: faster)."""
    excluded: dict[str, str]
    """Candidate label -> why it could not be chosen."""

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.variant}"


def weighted_speedup(
    default: Mapping[Shape, float], other: Mapping[Shape, float], weights: Mapping[Shape, float]
) -> float:
    """exp(sum w·ln(t_default / t_other) / sum w): the weighted geometric mean of the
    candidate's speed ratio to the default, so that a 2x at one shape and a 0.5x at another
    with the same weight cancel out whatever their absolute times."""
    total = sum(w for s, w in weights.items() if w > 0)
    if total <= 0:
        raise ValueError("the shape weights sum to zero")
    log_sum = sum(w * math.log(default[s] / other[s]) for s, w in weights.items() if w > 0)
    return math.exp(log_sum / total)


def choose(
    figures: Figures,
    candidates: Sequence[Candidate],
    default: Candidate,
    weights: Mapping[Shape, float],
    margin: float,
    agreement_floor: float,
    min_trials: int,
    excluded: Mapping[str, str] | None = None,
) -> Decision:
    """The candidate to run, from measured figures alone.

    The default stays unless another candidate, whose label agreement with fp32 is at least
    `agreement_floor`, is faster by more than `margin` (0.10: 1.10x) on the shapes weighted
    as the objective says. The default itself needs no agreement figure: the version's build
    made it the default after its own int8 check. Too few trials, or a figure missing for
    the default, keeps the default."""
    out_of_race = dict(excluded or {})
    speedups: dict[str, float] = {}

    def keep(reason: str) -> Decision:
        return Decision(default.backend, default.variant, reason, speedups, out_of_race)

    base = figures.seconds.get(default.label, {})
    needed = [s for s, w in weights.items() if w > 0]
    if figures.trials < min_trials:
        return keep(f"kept the default: {figures.trials} trials measured, fewer than the {min_trials} needed")
    if any(s not in base or base[s] <= 0 for s in needed):
        return keep("kept the default: it has no figure at every weighted shape")
    for candidate in candidates:
        if candidate == default:
            continue
        seconds = figures.seconds.get(candidate.label, {})
        if any(s not in seconds or seconds[s] <= 0 for s in needed):
            out_of_race.setdefault(candidate.label, "not measured at every weighted shape")
            continue
        speedups[candidate.label] = weighted_speedup(base, seconds, weights)
        agreement = figures.agreement.get(candidate.label)
        if candidate != REFERENCE and (agreement is None or agreement < agreement_floor):
            shown = "unknown" if agreement is None else f"{agreement:.2%}"
            out_of_race[candidate.label] = f"label agreement with fp32 {shown}, below {agreement_floor:.0%}"
    eligible = {label: x for label, x in speedups.items() if label not in out_of_race}
    if not eligible:
        return keep("kept the default: no other candidate is eligible")
    best = max(eligible, key=lambda label: eligible[label])
    if eligible[best] < 1 + margin:
        return keep(
            f"kept the default: the best other, {best}, is {eligible[best]:.2f}x, under the {1 + margin:.2f}x margin"
        )
    backend, _, variant = best.partition("-")
    return Decision(
        backend,
        variant,
        f"{best} is {eligible[best]:.2f}x {default.label}, at or above the {1 + margin:.2f}x margin",
        speedups,
        out_of_race,
    )


def synthetic_batch(
    shape: Shape, vocab_size: int, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Token ids drawn past the special tokens, every position attended."""
    rows, tokens = shape
    rng = np.random.default_rng(seed + rows * 1000 + tokens)
    low = min(1000, max(1, vocab_size // 2))
    ids = rng.integers(low, vocab_size, size=(rows, tokens), dtype=np.int64)
    return ids, np.ones((rows, tokens), dtype=np.int64)


def measure(
    backends: Mapping[str, Backend],
    shapes: Sequence[Shape],
    vocab_size: int,
    deadline: float,
    max_trials: int,
    clock: Callable[[], float] = time.perf_counter,
    max_tokens: int | None = None,
) -> tuple[dict[str, dict[Shape, float]], int]:
    """Median seconds per call of each backend at each shape, and the trials completed.

    One warm-up call per backend, then rounds (the median absorbs a slow first call at a
    new shape); in each round the shapes and the
    backends take turns in a rotated order, so a burst of load from a neighbour falls on all
    of them rather than on one. A round starts only if the last one would still fit before
    `deadline`. `max_tokens`, the version's maximum length, caps each shape's tokens (a
    model with 64 positions cannot take 128)."""
    inputs = {s: synthetic_batch((s[0], min(s[1], max_tokens or s[1])), vocab_size) for s in shapes}
    order = list(shapes)
    labels = list(backends)
    for label in labels:  # first-call costs (thread pools, arenas) stay out of the figures
        backends[label].run(*inputs[min(shapes)])
    samples: dict[str, dict[Shape, list[float]]] = {label: {s: [] for s in shapes} for label in labels}
    trials = 0
    last_round = 0.0
    while trials < max_trials and clock() + last_round <= deadline:
        started = clock()
        complete = True
        for i, s in enumerate(order[trials % len(order) :] + order[: trials % len(order)]):
            turn = (trials + i) % len(labels)
            for label in labels[turn:] + labels[:turn]:
                if clock() > deadline:  # a round slower than the last one stops at the budget
                    complete = False
                    break
                calls = SINGLE_ROW_CALLS if s[0] == 1 else 1
                t0 = clock()
                for _ in range(calls):
                    backends[label].run(*inputs[s])
                samples[label][s].append((clock() - t0) / calls)
        if not complete:
            break
        last_round = clock() - started
        trials += 1
    figures = {label: {s: median(v) for s, v in by_shape.items() if v} for label, by_shape in samples.items()}
    return figures, trials


def label_agreement(reference: npt.NDArray[np.float32], other: npt.NDArray[np.float32], heads: Sequence[Head]) -> float:
    """Share of rows given the same decision by every head, each on its own columns: the
    top label (softmax), or every label's side of 0 in logit space (sigmoid, the
    uncalibrated 0.5 threshold)."""
    same = np.ones(len(reference), dtype=bool)
    for head in heads:
        ours, theirs = reference[:, head.start : head.stop], other[:, head.start : head.stop]
        if head.activation == "sigmoid":
            same &= ((ours > 0) == (theirs > 0)).all(axis=1)
        else:
            same &= ours.argmax(-1) == theirs.argmax(-1)
    return float(same.mean())


def check_inputs(folder: Path, config: ModelConfig) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], str]:
    """The inputs agreement is computed on when the version recorded none: the build's check
    sentences (real headlines) through the version's tokenizer, padded to their longest;
    a synthetic batch of 32 rows of 32 tokens where either file is missing."""
    tokenizer_file = folder / config.tokenizer
    if CHECK_SENTENCES.is_file() and tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.enable_truncation(config.max_sequence_length)
        texts = [t for t in CHECK_SENTENCES.read_text(encoding="utf-8").splitlines() if t.strip()]
        ids, mask = pad_right([e.ids for e in tokenizer.encode_batch(texts)])
        return ids, mask, f"{len(texts)} check sentences"
    ids, mask = synthetic_batch((32, 32), config.vocab_size, seed=1)
    return ids, mask, "32 synthetic rows of 32 tokens"


def recorded_agreement(folder: Path) -> dict[str, float]:
    """Per-candidate agreement with fp32 the version's build recorded (metrics.json on the
    validation or check data): `int8_fp32_label_agreement`, and any
    `fp32_label_agreement` of a candidate under `candidates`."""
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, float] = {}
    if isinstance(metrics.get("int8_fp32_label_agreement"), int | float):
        found["onnxruntime-int8"] = float(metrics["int8_fp32_label_agreement"])
    for label, figures in (metrics.get("candidates") or {}).items():
        if isinstance(figures, dict) and isinstance(figures.get("fp32_label_agreement"), int | float):
            found[str(label)] = float(figures["fp32_label_agreement"])
    return found


@dataclass(frozen=True)
class AutotuneConfig:
    budget_seconds: float
    objective: Objective
    margin: float
    agreement_floor: float
    min_trials: int
    max_trials: int
    cache_dir: Path | None
    intra_op_threads: int
    allow_spinning: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infermesh" / "autotune"


def file_sha256(folder: Path, config: ModelConfig, name: str) -> str:
    recorded = config.sha256.get(name)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    with (folder / name).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(folder: Path, config: ModelConfig, cpu: CpuInfo, settings: AutotuneConfig) -> str:
    """What makes a decision valid: the graphs' sha256, the CPU model, its kernel flags and
    usable CPUs, and the settings that bound or weigh the measurement."""
    facts = {
        "schema": CACHE_SCHEMA,
        "files": {name: file_sha256(folder, config, name) for name in sorted(config.variants.values())},
        "torch_weights": sorted(p.name for p in (folder / "hf").glob("*.safetensors")),
        "cpu": cpu.model,
        "flags": sorted(flag for _, flag in KERNEL_FLAGS if flag in cpu.flags),
        "usable_cpus": cpu.usable_cpus,
        "threads": settings.intra_op_threads,
        "objective": settings.objective,
        "margin": settings.margin,
        "agreement_floor": settings.agreement_floor,
        "budget_seconds": settings.budget_seconds,
        "min_trials": settings.min_trials,
        "max_trials": settings.max_trials,
        "default_variant": config.default_variant,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def read_cached(cache_dir: Path, key: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        entry = json.loads((cache_dir / f"{key}.json").read_text(encoding="utf-8"))
        if isinstance(entry, dict) and entry.get("key") == key and entry.get("backend") and entry.get("variant"):
            return entry
    return None


def write_cached(cache_dir: Path, key: str, entry: dict[str, Any]) -> None:
    """One rename, so a concurrent reader sees the whole file or none; a cache that cannot
    be written (read-only home) only costs a measurement at the next start."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = cache_dir / f".{key}.{os.getpid()}.writing"
        staging.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, cache_dir / f"{key}.json")
    except OSError as error:
        logger.warning(
            "backend autotune: cannot write the cache in %s (%s); the next start measures again", cache_dir, error
        )


@dataclass
class Choice:
    """What a version runs on CPU under `backend=auto`, and the figures behind it."""

    backend: str
    variant: str
    source: Literal["measured", "cache", "skipped"]
    record: dict[str, Any]
    """The structured log line's fields."""
    loaded: Backend | None = None
    """The chosen backend, already loaded by the measurement (None: load it)."""


def _load(candidate: Candidate, folder: Path, config: ModelConfig, settings: AutotuneConfig) -> Backend:
    if candidate.backend == "torch":
        return TorchBackend(folder / "hf", device="cpu", dtype=candidate.variant, threads=settings.intra_op_threads)
    return OnnxRuntimeBackend(
        folder / config.variants[candidate.variant],
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.allow_spinning,
    )


def _ms(figures: Mapping[str, Mapping[Shape, float]]) -> dict[str, dict[str, float]]:
    return {label: {f"{r}x{t}": round(s * 1000, 3) for (r, t), s in by.items()} for label, by in figures.items()}


def autotune_version(
    folder: Path,
    config: ModelConfig,
    cpu: CpuInfo,
    settings: AutotuneConfig,
    clock: Callable[[], float] = time.perf_counter,
) -> Choice:
    """The CPU backend for one version: from the cache, else measured now (within the budget)."""
    started = clock()
    default = Candidate("onnxruntime", config.default_variant)
    base_record: dict[str, Any] = {
        "event": "backend_autotune",
        "model": config.name,
        "version": config.version,
        "cpu": cpu.model,
        "kernel_flags": sorted(flag for _, flag in KERNEL_FLAGS if flag in cpu.flags),
        "objective": settings.objective,
        "margin": settings.margin,
        "agreement_floor": settings.agreement_floor,
        "default": default.label,
    }
    key = cache_key(folder, config, cpu, settings)
    cache_dir = settings.cache_dir or default_cache_dir()
    cached = read_cached(cache_dir, key)
    if cached is not None:
        record = {
            **cached.get("record", {}),
            **base_record,
            "source": "cache",
            "cache_file": str(cache_dir / f"{key}.json"),
        }
        return Choice(str(cached["backend"]), str(cached["variant"]), "cache", record)

    candidates, excluded = cpu_candidates(cpu.flags, list(config.variants), (folder / "hf" / "config.json").is_file())
    deadline = started + settings.budget_seconds
    loaded: dict[str, Backend] = {}
    agreement = recorded_agreement(folder)
    sources = {label: "metrics.json" for label in agreement}
    figures: dict[str, dict[Shape, float]] = {}
    trials = 0
    try:
        for candidate in sorted(candidates, key=lambda c: (c != default, c != REFERENCE)):
            if loaded and clock() > deadline:
                excluded[candidate.label] = "not loaded: the time budget ran out"
                continue
            try:
                loaded[candidate.label] = _load(candidate, folder, config, settings)
            except Exception as error:  # noqa: BLE001 - a candidate that cannot load is only out of the race
                excluded[candidate.label] = f"failed to load: {error}"
        if REFERENCE.label in loaded:
            ids, mask, described = check_inputs(folder, config)
            reference = loaded[REFERENCE.label].run(ids, mask)
            for label, backend in loaded.items():
                if label not in agreement and label != REFERENCE.label:
                    agreement[label] = label_agreement(reference, backend.run(ids, mask), config.heads)
                    sources[label] = described
        if clock() < deadline:
            figures, trials = measure(
                loaded, SHAPES, config.vocab_size, deadline, settings.max_trials, clock, config.max_sequence_length
            )
        decision = choose(
            Figures(figures, trials, agreement, sources),
            [c for c in candidates if c.label in loaded],
            default,
            OBJECTIVE_WEIGHTS[settings.objective],
            settings.margin,
            settings.agreement_floor,
            settings.min_trials,
            excluded,
        )
    except BaseException:
        for backend in loaded.values():
            backend.close()
        raise
    chosen = loaded.pop(decision.label, None)
    for backend in loaded.values():
        backend.close()
    record = {
        **base_record,
        "source": "measured",
        "chosen": decision.label,
        "reason": decision.reason,
        "speedups": {label: round(x, 3) for label, x in decision.speedups.items()},
        "median_ms": _ms(figures),
        "trials": trials,
        "agreement": {label: round(x, 4) for label, x in agreement.items()},
        "agreement_source": sources,
        "excluded": decision.excluded,
        "seconds": round(clock() - started, 2),
        "cache_file": str(cache_dir / f"{key}.json"),
    }
    # Cached even when the budget allowed too few trials (the default kept, the record says
    # why): a start is never slowed twice by the same measurement. A larger budget is a new key.
    write_cached(
        cache_dir, key, {"key": key, "backend": decision.backend, "variant": decision.variant, "record": record}
    )
    return Choice(decision.backend, decision.variant, "measured", record, chosen)


def report_choice(model: str, version: str, backend: str, variant: str, source: str) -> None:
    """`infermesh_inference_backend_choice{...} 1` for this version, the series of any
    earlier choice for it removed."""
    for labels in list(BACKEND_CHOICE._metrics):  # noqa: SLF001 - prometheus_client has no label listing
        if labels[0] == model and labels[1] == version:
            BACKEND_CHOICE.remove(*labels)
    BACKEND_CHOICE.labels(model, version, backend, variant, source).set(1)


def log_choice(record: Mapping[str, Any]) -> None:
    logger.info("backend autotune %s", json.dumps(record, sort_keys=True))
