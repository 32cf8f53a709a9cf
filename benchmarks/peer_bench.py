"""infermesh's REST gateway against the servers a user would pick instead (`make bench-peers`).

Every server serves the same merged model (`models/<name>/<version>/hf/`, from disk, offline)
on the same CPUs, and the same client workloads as the REST rows drive each one
(`benchmarks.e2e.drive`): 1 client x 1 headline, 16 clients x 1 headline, 4 clients x 32
headlines per request, at ~32 and ~128 tokens. Per row: throughput, p50, p99, resident memory
of the server's process tree after the row, the share of headlines whose label matches
infermesh's, and per workload infermesh's ratio to the best peer.

Peers (each in its own venv, `build/peers/<name>/venv`, from `benchmarks/peers/<name>/requirements.txt`):
- MLServer with its HuggingFace runtime (text-classification, torch fp32): out of the box, with
  adaptive batching (32 requests or 5 ms), and with `batch_size` sent in each request;
- Infinity (`infinity-emb`) on its `/classify` route, with its optimum (ONNX Runtime) engine
  and with its torch engine.
A peer that cannot install, start or answer gets a row that says why (one line of its error).

Usage: python -m benchmarks.peer_bench [--seconds 10] [--peers mlserver,infinity] [--cpus 0,1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.e2e import (
    REST_ROW,
    Workload,
    _free_port,
    bench_rest,
    drive,
    make_headlines,
    mesh_env,
    workload_name,
)
from benchmarks.heads import slice_head
from infermesh.mesh import LocalMesh
from shared.cpu import read_cpu
from shared.model_repository import ModelRepository

#: (clients, headlines per request), as the REST rows.
WORKLOADS: tuple[tuple[int, int], ...] = ((1, 1), (16, 1), (4, 32))
LENGTHS: tuple[int, ...] = (32, 128)
INFERMESH = "infermesh REST (int8)"


@dataclass
class PeerRow:
    server: str
    workload: str
    tokens: int
    headlines_per_second: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    memory_mb: float | None = None
    agreement: float | None = None
    """Share of the row's headlines given the label infermesh gave them in its own row."""
    error: str = ""


class PeerFailed(Exception):
    """A peer could not install, start or answer; the message is the one line its row shows."""


class Peer:
    """How to start one server in its venv, ask it for labels and read them back."""

    name: str  # its folder in benchmarks/peers and the peers directory
    package: str  # the pinned package whose version the rows show
    ready_path: str
    infer_path: str

    def title(self, version: str) -> str:
        raise NotImplementedError

    def prepare(self, venv: Path, hf: Path, model: str, workdir: Path, port: int) -> list[str]:
        """Writes what the server needs into `workdir`; returns its command line."""
        raise NotImplementedError

    def body(self, texts: list[str], model: str) -> dict[str, object]:
        raise NotImplementedError

    def labels(self, answer: object) -> list[str]:
        raise NotImplementedError


class MLServerPeer(Peer):
    """MLServer's HF runtime: `plain` as it comes; `adaptive` with adaptive batching (32
    requests or 5 ms); `request-batch` sends `batch_size` (the request's text count) with each
    request, which the runtime passes to the pipeline."""

    name = "mlserver"
    package = "mlserver-huggingface"
    MODES = {"plain": "", "adaptive": ", adaptive batching", "request-batch": ", batch_size per request"}

    def __init__(self, mode: str = "plain") -> None:
        assert mode in self.MODES
        self.mode = mode
        self.ready_path = self.infer_path = ""

    def title(self, version: str) -> str:
        return f"MLServer {version} HF runtime (torch fp32{self.MODES[self.mode]})"

    def prepare(self, venv: Path, hf: Path, model: str, workdir: Path, port: int) -> list[str]:
        self.ready_path = f"/v2/models/{model}/ready"
        self.infer_path = f"/v2/models/{model}/infer"
        files = mlserver_settings(hf, model, port, _free_port(), _free_port(), self.mode == "adaptive")
        for relative, content in files.items():
            path = workdir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2))
        return [str(venv / "bin" / "mlserver"), "start", str(workdir)]

    def body(self, texts: list[str], model: str) -> dict[str, object]:
        return mlserver_request(texts, self.mode == "request-batch")

    def labels(self, answer: object) -> list[str]:
        return mlserver_labels(answer)


class InfinityPeer(Peer):
    name = "infinity"
    package = "infinity-emb"
    ready_path = "/health"
    infer_path = "/classify"

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def title(self, version: str) -> str:
        return f"Infinity {version} /classify ({self.engine})"

    def prepare(self, venv: Path, hf: Path, model: str, workdir: Path, port: int) -> list[str]:
        return [
            str(venv / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            str(hf),
            "--served-model-name",
            model,
            "--engine",
            self.engine,
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]

    def body(self, texts: list[str], model: str) -> dict[str, object]:
        return {"model": model, "input": texts}

    def labels(self, answer: object) -> list[str]:
        return infinity_labels(answer)


PEERS: tuple[Peer, ...] = (
    MLServerPeer("plain"),
    MLServerPeer("adaptive"),
    MLServerPeer("request-batch"),
    InfinityPeer("optimum"),
    InfinityPeer("torch"),
)


def mlserver_settings(
    hf: Path, model: str, http_port: int, grpc_port: int, metrics_port: int, adaptive_batching: bool
) -> dict[str, dict[str, object]]:
    """MLServer's settings.json and the model's model-settings.json: its HuggingFace runtime
    on the local folder, loopback only."""
    model_settings: dict[str, object] = {
        "name": model,
        "implementation": "mlserver_huggingface.HuggingFaceRuntime",
        "parameters": {
            "extra": {
                "task": "text-classification",
                "pretrained_model": str(hf),
                "pretrained_tokenizer": str(hf),
                "device": -1,
            }
        },
    }
    if adaptive_batching:
        model_settings |= {"max_batch_size": 32, "max_batch_time": 0.005}
    return {
        "settings.json": {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
        },
        f"{model}/model-settings.json": model_settings,
    }


def mlserver_request(texts: list[str], batch_size: bool) -> dict[str, object]:
    """An OIP v2 request for the HF runtime: the texts as the pipeline's `inputs`, and with
    `batch_size` the pipeline's batch size as a JSON-coded input (without it the pipeline
    runs the texts one at a time)."""
    inputs: list[dict[str, object]] = [{"name": "inputs", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]
    if batch_size:
        inputs.append(
            {
                "name": "batch_size",
                "shape": [1],
                "datatype": "BYTES",
                "data": [str(len(texts))],
                "parameters": {"content_type": "hg_json"},
            }
        )
    return {"inputs": inputs}


def mlserver_labels(answer: object) -> list[str]:
    """Labels from an OIP v2 answer of MLServer's HF runtime: one JSON string per text."""
    if not isinstance(answer, dict) or not answer.get("outputs"):
        raise PeerFailed(f"unexpected answer: {str(answer)[:160]}")
    return [str(json.loads(item)["label"]) for item in answer["outputs"][0]["data"]]


def infinity_labels(answer: object) -> list[str]:
    """Labels from Infinity's /classify answer: per text, every label with its score."""
    if not isinstance(answer, dict) or "data" not in answer:
        raise PeerFailed(f"unexpected answer: {str(answer)[:160]}")
    return [str(max(scores, key=lambda s: float(s["score"]))["label"]) for scores in answer["data"]]


_EXCEPTION_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception)\b:?")
_ERROR_LINE = re.compile(r"^\s*ERROR\b")


def error_line(log: str, limit: int = 200) -> str:
    """The line of a log that says why something failed: the last exception (`ValueError:
    ...`), else the last `ERROR` line (pip, uvicorn), else the last non-empty line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    chosen = next(
        (line for pattern in (_EXCEPTION_LINE, _ERROR_LINE) for line in reversed(lines) if pattern.match(line)),
        lines[-1] if lines else "no output",
    )
    return chosen if len(chosen) <= limit else chosen[: limit - 3] + "..."


def pinned_version(requirements: str, package: str) -> str:
    """The `==` version of a package in a requirements file (names compared normalized)."""

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    for line in requirements.splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and normal(name.split("[")[0]) == normal(package):
            return version.strip()
    return "?"


def parent_of(stat: str) -> int:
    """The parent pid in a /proc/<pid>/stat line (the command name may hold spaces and ')')."""
    return int(stat.rpartition(")")[2].split()[1])


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process under it, from a pid -> parent pid map."""
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def tree_rss_mb(roots: Sequence[int]) -> float:
    """Resident memory of these processes and all their descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = parent_of((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    total_kb = 0
    for pid in set[int]().union(*(descendants(root, parents) for root in roots)):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


def agreement(ours: dict[str, str], theirs: dict[str, str]) -> float | None:
    """Share of the headlines both labelled on which the labels are the same."""
    shared = ours.keys() & theirs.keys()
    return sum(ours[text] == theirs[text] for text in shared) / len(shared) if shared else None


@dataclass(frozen=True)
class Comparison:
    workload: str
    tokens: int
    best_peer: str
    throughput_ratio: float
    """infermesh's headlines/s over the best peer's (the peer with the most headlines/s)."""
    p50_ratio: float | None
    """infermesh's p50 over the lowest p50 among the peers."""


def compare(rows: Sequence[PeerRow]) -> list[Comparison]:
    """For each workload and length infermesh measured, its ratio to the best peer."""
    comparisons = []
    for ours in rows:
        if ours.server != INFERMESH or ours.headlines_per_second is None:
            continue
        peers = [
            row
            for row in rows
            if row.server != INFERMESH
            and row.workload == ours.workload
            and row.tokens == ours.tokens
            and row.headlines_per_second is not None
        ]
        if not peers:
            continue
        best = max(peers, key=lambda row: row.headlines_per_second or 0.0)
        p50s = [row.p50_ms for row in peers if row.p50_ms is not None]
        p50_ratio = ours.p50_ms / min(p50s) if ours.p50_ms is not None and p50s else None
        comparisons.append(
            Comparison(
                ours.workload,
                ours.tokens,
                best.server,
                (ours.headlines_per_second or 0.0) / (best.headlines_per_second or 1.0),
                p50_ratio,
            )
        )
    return comparisons


def render(rows: Sequence[PeerRow]) -> str:
    def number(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    lines = [
        f"{'server':<64} {'workload':<31} {'tok':>4} {'headlines/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'MB':>6} {'agree':>6}"
    ]
    for row in sorted(rows, key=lambda r: (r.tokens, WORKLOAD_ORDER.get(r.workload, 99), r.server != INFERMESH)):
        if row.error:
            lines.append(f"{row.server:<64} {row.workload:<31} {row.tokens:>4} {row.error}")
            continue
        lines.append(
            f"{row.server:<64} {row.workload:<31} {row.tokens:>4} {number(row.headlines_per_second, '12.1f')} "
            f"{number(row.p50_ms, '8.2f')} {number(row.p99_ms, '8.2f')} {number(row.memory_mb, '6.0f')} "
            f"{number(row.agreement, '6.3f')}"
        )
    return "\n".join(lines)


WORKLOAD_ORDER = {workload_name(c, n): i for i, (c, n) in enumerate(WORKLOADS)}


def render_comparisons(comparisons: Sequence[Comparison]) -> str:
    lines = ["infermesh REST / best peer (throughput: the peer with most headlines/s; p50: the lowest peer p50):"]
    for c in comparisons:
        p50 = f"{c.p50_ratio:.2f}x" if c.p50_ratio is not None else "-"
        lines.append(
            f"  {c.workload:<31} {c.tokens:>4} tok  throughput {c.throughput_ratio:5.2f}x  p50 {p50:>6}  "
            f"(best: {c.best_peer})"
        )
    return "\n".join(lines)


Sender = Callable[[list[str]], Awaitable[list[str]]]


def _row(server: str, workload: Workload, name: str, tokens: int, memory: float, ours: dict[str, str]) -> PeerRow:
    row = workload.row(name, "")
    return PeerRow(
        server,
        name,
        tokens,
        row.headlines_per_second,
        row.p50_ms,
        row.p99_ms,
        memory,
        agreement(ours, workload.labels) if server != INFERMESH else None,
    )


def bench_infermesh(
    repository: Path, texts: dict[int, list[str]], seconds: float
) -> tuple[list[PeerRow], dict[tuple[str, int], dict[str, str]]]:
    """The mesh as `make run` starts it (tracing on, no exporter), through the gateway."""
    mesh = LocalMesh(repository.resolve(), extra_env=mesh_env())
    mesh.start()
    rows, labels = [], {}
    try:
        url = mesh.start_gateway("", _free_port())
        pids = [mesh.processes[name].pid for name in ("tokenizer", "inference", "postprocessor", "gateway")]
        for tokens in LENGTHS:
            for concurrency, per_request in WORKLOADS:
                name = workload_name(concurrency, per_request)
                workload = asyncio.run(bench_rest(url, texts[tokens], concurrency, per_request, seconds))
                rows.append(_row(INFERMESH, workload, name, tokens, tree_rss_mb(pids), {}))
                labels[name, tokens] = workload.labels
    finally:
        mesh.stop()
    return rows, labels


class PeerServer:
    """One peer server as a child process in its own session (stopped as a group)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, ready_url: str, timeout: float) -> None:
        self.command, self.env, self.log, self.ready_url, self.timeout = command, env, log, ready_url, timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PeerServer:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerFailed(f"exited ({self.process.returncode}): {error_line(self._log_text())}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise PeerFailed(f"not ready after {self.timeout:.0f} s: {error_line(self._log_text())}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def peer_env(peer_dir: Path, threads: int) -> dict[str, str]:
    """Offline, no telemetry, the same number of threads as cores, caches in the peer's folder."""
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("OTEL_", "VIRTUAL_ENV"))]:
        env.pop(key)
    return env | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str((peer_dir / "hf-home").resolve()),
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }


def bench_peer(
    peer: Peer,
    peers_dir: Path,
    hf: Path,
    model: str,
    texts: dict[int, list[str]],
    seconds: float,
    ours: dict[tuple[str, int], dict[str, str]],
    threads: int,
    startup_timeout: float,
) -> list[PeerRow]:
    requirements = Path(__file__).parent / "peers" / peer.name / "requirements.txt"
    title = peer.title(pinned_version(requirements.read_text(), peer.package))
    print(f"peer: {title}", flush=True)
    everywhere = [(workload_name(c, n), t) for t in LENGTHS for c, n in WORKLOADS]
    folder = peers_dir / peer.name
    venv = folder / "venv"
    if not (folder / ".installed").exists():
        failure = folder / "install-error.txt"
        why = failure.read_text().strip() if failure.exists() else "not installed (make bench-peers installs it)"
        return [PeerRow(title, name, tokens, error=f"did not install: {why}") for name, tokens in everywhere]
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    workdir = folder / "serve" / slug
    port = _free_port()
    command = peer.prepare(venv.resolve(), hf.resolve(), model, workdir, port)
    url = f"http://127.0.0.1:{port}"
    rows: list[PeerRow] = []
    try:
        with PeerServer(
            command, peer_env(folder, threads), folder / f"{slug}.log", url + peer.ready_path, startup_timeout
        ) as server:
            assert server.process is not None
            for name, tokens in everywhere:
                concurrency, per_request = WORKLOADS[WORKLOAD_ORDER[name]]
                try:
                    workload = asyncio.run(
                        _drive_peer(peer, url, model, texts[tokens], concurrency, per_request, seconds)
                    )
                except (httpx.HTTPError, PeerFailed, KeyError, ValueError, TypeError) as error:
                    rows.append(PeerRow(title, name, tokens, error=f"failed: {_one_line(error)}"))
                    continue
                memory = tree_rss_mb([server.process.pid])
                rows.append(_row(title, workload, name, tokens, memory, ours.get((name, tokens), {})))
    except PeerFailed as error:
        done = {(row.workload, row.tokens) for row in rows}
        rows += [
            PeerRow(title, name, tokens, error=f"could not serve: {error}")
            for name, tokens in everywhere
            if (name, tokens) not in done
        ]
    return rows


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, PeerFailed) else str(error)
    return error_line(text)


async def _drive_peer(
    peer: Peer, url: str, model: str, texts: list[str], concurrency: int, per_request: int, seconds: float
) -> Workload:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def send(batch: list[str]) -> list[str]:
            reply = await client.post(peer.infer_path, json=peer.body(batch, model))
            if reply.status_code != 200:
                raise PeerFailed(f"HTTP {reply.status_code}: {reply.text[:160]}")
            labels = peer.labels(reply.json())
            if len(labels) != len(batch):
                raise PeerFailed(f"{len(labels)} labels for {len(batch)} texts")
            return labels

        return await drive(send, texts, concurrency, per_request, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="finance-sentiment")
    parser.add_argument("--peers-dir", type=Path, default=Path("build/peers"))
    parser.add_argument("--peers", default="", help="comma-separated peer folders (default: all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds each row's workload runs")
    parser.add_argument("--headlines", type=int, default=512, help="distinct headlines per length")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--cpus", default="", help="CPUs for every server and the clients, e.g. 0,1 (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/peers.json"))
    args = parser.parse_args()

    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})  # inherited by every server
    cpu = read_cpu()
    repository = ModelRepository(args.repository)
    config = repository.config(args.model)
    folder = repository.path(args.model, config.version)
    texts = {tokens: make_headlines(folder / config.tokenizer, args.headlines, tokens) for tokens in LENGTHS}
    wanted = {name for name in args.peers.split(",") if name}
    peers = [peer for peer in PEERS if not wanted or peer.name in wanted]
    print(f"peers against infermesh {args.model} v{config.version}: {args.seconds:g} s per row")

    peer_model = folder / "hf"
    if len(config.heads) > 1:
        # A peer's text-classification pipeline would softmax over every head's columns at
        # once; it gets the primary head alone (same encoder, same cost), infermesh the whole
        # version, and labels are compared on that head.
        primary = config.heads[0]
        print(f"{args.model} has {len(config.heads)} heads; peers serve its {primary.name!r} head alone")
        peer_model = slice_head(folder, config, primary, args.peers_dir / "models", f"{args.model}-peers") / "hf"
    rows, ours = bench_infermesh(args.repository, texts, args.seconds)
    for peer in peers:
        rows += bench_peer(
            peer,
            args.peers_dir,
            peer_model,
            args.model,
            texts,
            args.seconds,
            ours,
            cpu.usable_cpus,
            args.startup_timeout,
        )
    comparisons = compare(rows)
    print()
    print(cpu.describe())
    print(f"{REST_ROW} against peers; memory: the server's process tree; agree: labels equal to infermesh's")
    print(render(rows))
    print()
    print(render_comparisons(comparisons))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": [asdict(row) for row in rows],
                "comparisons": [asdict(c) for c in comparisons],
                "seconds_per_row": args.seconds,
                "cpu": {"model": cpu.model, "usable_cpus": cpu.usable_cpus, "kernel_flags": cpu.kernel_flags()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
