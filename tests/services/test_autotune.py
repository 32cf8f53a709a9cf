"""`backend=auto` on CPU picks by measurement: the decision rule on given figures (no
timing), the timing loop on a fake clock, the cache, and one run on the built model that
checks only that a valid choice is made and explained (never which backend is faster)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import REGISTRY

from services.inference.autotune import (
    OBJECTIVE_WEIGHTS,
    SHAPES,
    AutotuneConfig,
    Candidate,
    Figures,
    Shape,
    autotune_version,
    cache_key,
    choose,
    cpu_candidates,
    label_agreement,
    measure,
    recorded_agreement,
    report_choice,
    weighted_speedup,
)
from services.inference.backends.base import Backend
from services.inference.server import autotune_settings, measures_cpu_backends
from services.inference.settings import InferenceSettings
from shared.cpu import CpuInfo, read_cpu
from shared.model_repository import ModelConfig

INT8 = Candidate("onnxruntime", "int8")
FP32 = Candidate("onnxruntime", "fp32")
BF16 = Candidate("torch", "bf16")
ALL = [INT8, FP32, BF16]
AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"})
AVX2 = frozenset({"avx2", "fma"})


def times(scale: dict[Shape, float]) -> dict[Shape, float]:
    return {s: scale.get(s, 1.0) for s in SHAPES}


#: docs/backends.md's AMX machine, in ms: int8 ahead at one short headline, bf16 ahead in bulk.
AMX_FIGURES = {
    INT8.label: {(1, 32): 2.9, (1, 128): 9.8, (32, 32): 40.0, (32, 128): 170.0},
    FP32.label: {(1, 32): 4.0, (1, 128): 15.0, (32, 32): 80.0, (32, 128): 320.0},
    BF16.label: {(1, 32): 4.3, (1, 128): 7.6, (32, 32): 27.4, (32, 128): 80.2},
}


def decide(
    seconds: dict[str, dict[Shape, float]],
    agreement: dict[str, float] | None = None,
    objective: str = "balanced",
    margin: float = 0.10,
    trials: int = 5,
    default: Candidate = INT8,
) -> tuple[str, str]:
    agree = {INT8.label: 0.98, BF16.label: 0.9996} if agreement is None else agreement
    decision = choose(
        Figures(seconds, trials, agree), ALL, default, OBJECTIVE_WEIGHTS[objective], margin, 0.99, min_trials=3
    )
    return decision.label, decision.reason


def test_a_candidate_faster_by_more_than_the_margin_replaces_the_default() -> None:
    label, reason = decide(AMX_FIGURES, objective="throughput")
    assert label == BF16.label
    assert "torch-bf16 is" in reason and "margin" in reason


def test_the_objective_decides_between_latency_and_bulk_winners() -> None:
    """On the AMX figures int8 wins one short headline and bf16 the bulk: latency keeps int8."""
    assert decide(AMX_FIGURES, objective="latency")[0] == INT8.label
    assert decide(AMX_FIGURES, objective="throughput")[0] == BF16.label


def test_the_default_stays_unless_the_margin_is_passed() -> None:
    figures = {INT8.label: times({}), FP32.label: times({}), BF16.label: {s: 1 / 1.08 for s in SHAPES}}
    label, reason = decide(figures)
    assert label == INT8.label and "under the 1.10x margin" in reason
    assert decide(figures, margin=0.05)[0] == BF16.label


def test_a_candidate_below_the_agreement_floor_is_never_chosen_however_fast() -> None:
    figures = {INT8.label: times({}), FP32.label: times({}), BF16.label: {s: 0.2 for s in SHAPES}}
    label, _ = decide(figures, agreement={BF16.label: 0.985})
    assert label == INT8.label
    decision = choose(Figures(figures, 5, {}), ALL, INT8, OBJECTIVE_WEIGHTS["balanced"], 0.1, 0.99, 3)
    assert decision.label == INT8.label and "unknown" in decision.excluded[BF16.label]


def test_fp32_is_the_reference_and_needs_no_agreement_figure() -> None:
    figures = {INT8.label: times({}), FP32.label: {s: 0.5 for s in SHAPES}}
    assert decide(figures, agreement={})[0] == FP32.label


def test_int8_challenging_an_fp32_default_must_pass_the_floor() -> None:
    """A version whose build made fp32 the default (int8 failed its check) keeps fp32."""
    figures = {INT8.label: {s: 0.5 for s in SHAPES}, FP32.label: times({})}
    assert decide(figures, agreement={INT8.label: 0.97}, default=FP32)[0] == FP32.label


def test_too_few_trials_or_a_missing_default_figure_keep_the_default() -> None:
    fast = {INT8.label: times({}), BF16.label: {s: 0.2 for s in SHAPES}}
    label, reason = decide(fast, trials=2)
    assert label == INT8.label and "2 trials" in reason
    label, reason = decide({BF16.label: {s: 0.2 for s in SHAPES}})
    assert label == INT8.label and "no figure" in reason


def test_the_speedup_is_a_weighted_geometric_mean() -> None:
    weights = {(1, 32): 1.0, (32, 128): 1.0}
    assert weighted_speedup({(1, 32): 1.0, (32, 128): 1.0}, {(1, 32): 2.0, (32, 128): 0.5}, weights) == pytest.approx(1)
    assert weighted_speedup({(1, 32): 2.0, (32, 128): 2.0}, {(1, 32): 1.0, (32, 128): 1.0}, weights) == pytest.approx(2)


def test_bf16_is_a_candidate_only_where_amx_multiplies_it() -> None:
    without, excluded = cpu_candidates(AVX2, ["fp32", "int8"], has_torch_weights=True)
    assert without == [FP32, INT8] and "AMX" in excluded[BF16.label]
    with_amx, _ = cpu_candidates(AMX, ["fp32", "int8"], has_torch_weights=True)
    assert BF16 in with_amx
    no_weights, excluded = cpu_candidates(AMX, ["fp32", "int8"], has_torch_weights=False)
    assert BF16 not in no_weights and "hf/" in excluded[BF16.label]
    assert Candidate("torch", "fp32") in cpu_candidates(AMX, ["int8"], True, include_torch_fp32=True)[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Advances the fake clock by seconds-per-row times rows, and records its calls."""

    name = "fake"
    static_shapes = False

    def __init__(self, clock: FakeClock, per_row: float, log: list[str], label: str) -> None:
        self.clock, self.per_row, self.log, self.label = clock, per_row, log, label

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        self.clock.now += self.per_row * input_ids.shape[0] * input_ids.shape[1]
        self.log.append(self.label)
        return np.zeros((input_ids.shape[0], 3), dtype=np.float32)

    def close(self) -> None:
        pass


def test_measurement_interleaves_candidates_and_stops_within_the_budget() -> None:
    clock, log = FakeClock(), list[str]()
    backends: dict[str, Backend] = {
        "a": FakeBackend(clock, 1e-5, log, "a"),
        "b": FakeBackend(clock, 2e-5, log, "b"),
    }
    figures, trials = measure(backends, SHAPES, 30522, deadline=2.0, max_trials=50, clock=clock)
    assert 1 <= trials < 50
    assert clock.now <= 2.0 + 2e-5 * 32 * 128  # at most one call past the budget
    assert figures["a"][(32, 128)] == pytest.approx(1e-5 * 32 * 128)
    assert figures["b"][(1, 32)] == pytest.approx(2e-5 * 32)
    firsts = {log[i] for i in range(2, len(log)) if log[i] != log[i - 1]}
    assert firsts == {"a", "b"}, "both take turns going first"


def test_recorded_agreement_comes_from_metrics_json(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {"int8_fp32_label_agreement": 0.9812, "candidates": {"torch-bf16": {"fp32_label_agreement": 0.9996}}}
        )
    )
    assert recorded_agreement(tmp_path) == {"onnxruntime-int8": 0.9812, "torch-bf16": 0.9996}
    assert recorded_agreement(tmp_path / "missing") == {}


def test_auto_on_cpu_measures_unless_skipped_or_a_variant_is_named() -> None:
    assert measures_cpu_backends(InferenceSettings(autotune=True), "onnxruntime", "cpu")
    assert not measures_cpu_backends(InferenceSettings(autotune=False), "onnxruntime", "cpu")
    assert not measures_cpu_backends(InferenceSettings(autotune=True, variant="fp32"), "onnxruntime", "cpu")
    assert not measures_cpu_backends(InferenceSettings(autotune=True, backend="onnxruntime"), "onnxruntime", "cpu")
    assert not measures_cpu_backends(InferenceSettings(autotune=True), "onnxruntime", "cuda")


def config_of(folder: Path) -> ModelConfig:
    return ModelConfig.model_validate_json((folder / "config.json").read_text())


def test_a_cached_decision_is_used_without_measuring(built_model: Path, tmp_path: Path) -> None:
    config = config_of(built_model)
    cpu = CpuInfo("Test CPU", AVX2, 2)
    settings = autotune_settings(InferenceSettings(autotune=True, autotune_cache_dir=tmp_path))
    key = cache_key(built_model, config, cpu, settings)
    entry = {"key": key, "backend": "onnxruntime", "variant": "fp32", "record": {"reason": "from an earlier start"}}
    (tmp_path / f"{key}.json").write_text(json.dumps(entry))
    choice = autotune_version(built_model, config, cpu, settings)
    assert (choice.backend, choice.variant, choice.source) == ("onnxruntime", "fp32", "cache")
    assert choice.record["reason"] == "from an earlier start" and choice.loaded is None
    other_cpu = CpuInfo("Test CPU", AMX, 2)
    assert cache_key(built_model, config, other_cpu, settings) != key, "other kernel flags, other decision"


def test_auto_on_the_built_model_resolves_to_a_valid_backend_and_says_why(built_model: Path, tmp_path: Path) -> None:
    """A tiny budget on the real model: whatever is faster on this machine, the choice must
    be one of the candidates, loaded, explained, cached and exported."""
    config = config_of(built_model)
    cpu = read_cpu()
    settings = AutotuneConfig(
        budget_seconds=3.0,
        objective="latency",
        margin=0.10,
        agreement_floor=0.99,
        min_trials=1,
        max_trials=1,
        cache_dir=tmp_path,
        intra_op_threads=0,
        allow_spinning=False,
    )
    choice = autotune_version(built_model, config, cpu, settings)
    candidates, _ = cpu_candidates(cpu.flags, list(config.variants), (built_model / "hf" / "config.json").is_file())
    assert Candidate(choice.backend, choice.variant) in candidates
    assert choice.source == "measured" and choice.loaded is not None
    assert choice.record["reason"] and choice.record["chosen"] == f"{choice.backend}-{choice.variant}"
    assert set(choice.record["median_ms"]) <= {c.label for c in candidates}
    logits = choice.loaded.run(np.ones((2, 8), dtype=np.int64), np.ones((2, 8), dtype=np.int64))
    assert logits.shape == (2, config.num_logits)
    choice.loaded.close()

    again = autotune_version(built_model, config, cpu, settings)
    assert (again.backend, again.variant, again.source) == (choice.backend, choice.variant, "cache")

    report_choice(config.name, "autotune-test", choice.backend, choice.variant, choice.source)
    labels = {"model": config.name, "version": "autotune-test", "backend": choice.backend, "variant": choice.variant}
    assert REGISTRY.get_sample_value("infermesh_inference_backend_choice", {**labels, "source": "measured"}) == 1


def test_agreement_is_judged_per_head_on_its_own_columns() -> None:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "version": "1",
            "platform": "onnxruntime_onnx",
            "labels": ["negative", "neutral", "positive"],
            "max_sequence_length": 16,
            "vocab_size": 10,
            "temperature": 1.0,
            "inputs": [],
            "outputs": [],
            "variants": {},
            "default_variant": "fp32",
            "head": "sentiment",
            "extra_heads": [{"name": "topic", "labels": ["earnings", "macro"]}],
        }
    )
    reference = np.array([[3.0, 0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    # Row 0: both heads decide alike, though a topic logit outgrows every sentiment logit
    # (one argmax over all columns would call that a disagreement); row 1: the topic flips.
    other = np.array([[3.0, 0.0, 0.0, 9.0, -1.0], [0.0, 0.0, 2.0, -1.0, 1.0]], dtype=np.float32)
    assert label_agreement(reference, other, config.heads) == 0.5
    assert label_agreement(reference, reference, config.heads) == 1.0
    tags = config.model_copy(update={"extra_heads": []}).heads + [
        dataclasses.replace(config.heads[1], activation="sigmoid")
    ]
    # A sigmoid head agrees only when every label stays on its side of 0.
    crossed = reference.copy()
    crossed[0, 4] = 0.5
    assert label_agreement(reference, crossed, config.heads) == 1.0
    assert label_agreement(reference, crossed, tags) == 0.5
