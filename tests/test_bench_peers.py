"""The pure helpers of `make bench-peers` and the CPU line of every CPU table (no servers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks.cpu import CpuInfo, parse_cpu_text, read_cpu
from benchmarks.e2e import drive, top_label, workload_name
from benchmarks.peer_bench import (
    INFERMESH,
    InfinityPeer,
    PeerRow,
    agreement,
    bench_peer,
    compare,
    descendants,
    error_line,
    infinity_labels,
    mlserver_labels,
    mlserver_request,
    mlserver_settings,
    parent_of,
    pinned_version,
    render,
)

PROC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 fma bmi2
"""

LSCPU = """Architecture:                            x86_64
Model name:                              Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
Flags:                                   avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpuinfo_and_lscpu_give_the_model_and_the_kernel_flags() -> None:
    model, flags = parse_cpu_text(PROC_CPUINFO)
    assert model == "AMD EPYC 9B14"
    amd = CpuInfo(model, flags, 2).kernel_flags()
    assert amd["AVX2"] and not any(amd[name] for name in ("AVX-512F", "AVX-512 VNNI", "AVX-VNNI", "AMX-INT8"))

    model, flags = parse_cpu_text(LSCPU)
    assert model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    described = CpuInfo(model, flags, 2).describe()
    for name in ("AVX-512F yes", "AVX-512 VNNI yes", "AVX-VNNI no", "AMX-INT8 yes", "AMX-BF16 yes"):
        assert name in described


def test_a_missing_cpuinfo_still_describes_the_machine(tmp_path: Path) -> None:
    cpu = read_cpu(tmp_path / "absent")
    assert cpu.model and cpu.usable_cpus >= 1


def test_the_error_line_is_the_exception_not_the_noise_after_it() -> None:
    log = "\n".join(
        [
            "INFO: starting",
            "Traceback (most recent call last):",
            '  File "x.py", line 1',
            "ValueError: No onnx files found for /m/hf and revision None",
            "",
            "ERROR:    Application startup failed. Exiting.",
        ]
    )
    assert error_line(log) == "ValueError: No onnx files found for /m/hf and revision None"
    pip = "Collecting x\nERROR: Could not find a version that satisfies the requirement x==9\n"
    assert error_line(pip).startswith("ERROR: Could not find a version")
    assert error_line("a\nlast words\n\n") == "last words"
    assert error_line("") == "no output"
    assert len(error_line("E" * 500 + "Error: x", limit=50)) == 50


def test_pinned_versions_are_read_with_normalized_names() -> None:
    requirements = "# comment\ninfinity_emb==0.0.78\nmlserver-huggingface==1.7.1  # the runtime\ntorch==2.13.0\n"
    assert pinned_version(requirements, "infinity-emb") == "0.0.78"
    assert pinned_version(requirements, "MLServer_HuggingFace") == "1.7.1"
    assert pinned_version(requirements, "absent") == "?"


def test_peer_answers_become_labels() -> None:
    mlserver = {"outputs": [{"name": "output", "data": [json.dumps({"label": "negative", "score": 0.9})] * 2}]}
    assert mlserver_labels(mlserver) == ["negative", "negative"]
    infinity = {"data": [[{"label": "neutral", "score": 0.2}, {"label": "positive", "score": 0.7}]]}
    assert infinity_labels(infinity) == ["positive"]
    assert top_label({"negative": 0.1, "neutral": 0.5, "positive": 0.4}) == "neutral"


def test_mlserver_settings_point_at_the_local_folder_on_loopback() -> None:
    files = mlserver_settings(Path("/m/hf"), "finance-sentiment", 1, 2, 3, adaptive_batching=True)
    assert files["settings.json"] == {"host": "127.0.0.1", "http_port": 1, "grpc_port": 2, "metrics_port": 3}
    model = files["finance-sentiment/model-settings.json"]
    extra = {"task": "text-classification", "pretrained_model": "/m/hf", "pretrained_tokenizer": "/m/hf", "device": -1}
    assert model["parameters"] == {"extra": extra}
    assert model["max_batch_size"] == 32
    assert "max_batch_size" not in mlserver_settings(Path("/m"), "m", 1, 2, 3, False)["m/model-settings.json"]


def test_mlserver_requests_carry_the_batch_size_only_when_asked() -> None:
    plain = mlserver_request(["a", "b"], batch_size=False)
    assert plain == {"inputs": [{"name": "inputs", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    batched = mlserver_request(["a", "b"], batch_size=True)["inputs"]
    assert isinstance(batched, list) and batched[1]["name"] == "batch_size" and batched[1]["data"] == ["2"]


def test_process_trees_and_parents() -> None:
    assert parent_of("42 (python3 -m (odd) name) S 7 42 42 0 -1") == 7
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1}
    assert descendants(10, parents) == {10, 11, 12, 13}
    assert descendants(13, parents) == {13}


def test_agreement_counts_only_headlines_both_labelled() -> None:
    assert agreement({"a": "x", "b": "y", "c": "z"}, {"a": "x", "b": "q", "d": "x"}) == 0.5
    assert agreement({"a": "x"}, {}) is None


def row(server: str, workload: str, rate: float | None, p50: float | None = None, error: str = "") -> PeerRow:
    return PeerRow(server, workload, 32, rate, p50, p50, 100.0, None, error)


def test_infermesh_is_compared_with_the_best_peer_of_each_workload() -> None:
    one, bulk = workload_name(1, 1), workload_name(4, 32)
    rows = [
        row(INFERMESH, one, 100.0, 5.0),
        row("slow", one, 50.0, 4.0),
        row("fast", one, 80.0, 10.0),
        row("broken", one, None, error="could not serve: ValueError: no"),
        row(INFERMESH, bulk, 300.0, 100.0),
        row("broken", bulk, None, error="could not serve: ValueError: no"),
    ]
    comparisons = compare(rows)
    assert len(comparisons) == 1  # no peer served the bulk row
    (c,) = comparisons
    assert (c.workload, c.best_peer, c.throughput_ratio, c.p50_ratio) == (one, "fast", 1.25, 1.25)
    table = render(rows).splitlines()
    assert len(table) == 1 + len(rows)
    assert table[1].startswith(INFERMESH)  # infermesh first in each workload
    assert any(line.rstrip().endswith("could not serve: ValueError: no") for line in table)


def test_workload_names_match_the_rows_of_make_bench() -> None:
    assert workload_name(1, 1) == "1 client x 1 headline/request"
    assert workload_name(4, 32) == "4 clients x 32 headlines/request"


@pytest.mark.parametrize("seconds", [None, 0.05])
def test_drive_runs_the_clients_once_through_or_for_a_time(seconds: float | None) -> None:
    sent: list[list[str]] = []

    async def send(batch: list[str]) -> Sequence[str]:
        sent.append(batch)
        await asyncio.sleep(0.001)
        return [text.upper() for text in batch]

    texts = [f"t{i}" for i in range(10)]
    workload = asyncio.run(drive(send, texts, concurrency=3, per_request=4, seconds=seconds))
    assert sent[0] == texts[:4]  # the warm-up
    assert len(workload.latencies) == len(sent) - 1
    assert workload.labels == {text: text.upper() for text in texts}
    if seconds is None:
        assert workload.headlines == len(texts)
    else:
        assert workload.headlines >= len(texts) and workload.seconds >= seconds


def test_a_peer_that_did_not_install_gets_rows_saying_why(tmp_path: Path) -> None:
    (tmp_path / "infinity").mkdir()
    (tmp_path / "infinity" / "install-error.txt").write_text("ERROR: No matching distribution found for x==9\n")
    rows = bench_peer(InfinityPeer("torch"), tmp_path, tmp_path / "hf", "m", {}, 1.0, {}, 2, 1.0)
    assert len(rows) == 6  # 3 workloads x 2 lengths
    assert all(row.error == "did not install: ERROR: No matching distribution found for x==9" for row in rows)
    assert rows[0].server == "Infinity 0.0.78 /classify (torch)"
