"""The reliability report: every fault and hostile input the suite tries, with what was
expected, what was observed and how many records were lost, written as a Markdown table.

A test joins the report with a marker, and says what it saw through the `observed` fixture:

    @pytest.mark.reliability("Faults", "Inference restarted under the worker", "0 lost, 0 dead-lettered")
    async def test_...(observed: Observed) -> None:
        ...
        observed.record(f"{n} scored, {dead} dead-lettered", lost=len(missing))

`INFERMESH_RELIABILITY_REPORT=<path>` makes the session write the table there
(`make reliability` regenerates docs/reliability.md). Every case counts: passed, failed,
or skipped with the reason it did not run. Only a session that collected and ran every
reliability case writes the table; a partial one (`-k`, `-m` that drops cases, a subset
of files, `--lf`, `-x` stopping early, a collection error, an interrupt) writes nothing and
says why, so a quick local run never overwrites the report with a fraction of it.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPORT_ENV = "INFERMESH_RELIABILITY_REPORT"
MARKER = "reliability"


@dataclass
class Observed:
    """What one reliability test saw; `lost` counts records that should have arrived
    somewhere (an output or the dead-letter topic) and did not."""

    text: str = ""
    lost: int | None = None

    def record(self, text: str, lost: int | None = None) -> None:
        self.text = text
        self.lost = lost


@dataclass
class Row:
    """One case of the report; `outcome` is "pass", "FAIL", "skipped" or "not run", and
    `reason` says why a skipped case did not run."""

    area: str
    case: str
    expected: str
    test: str
    observed: Observed = field(default_factory=Observed)
    outcome: str = "not run"
    reason: str = ""


@dataclass
class _Session:
    """The report's state for one pytest session (kept on its config, so a pytest run
    inside a test, as tests/test_reliability.py makes, has its own)."""

    rows: dict[str, Row] = field(default_factory=dict)
    deselected: list[str] = field(default_factory=list)
    collection_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_STATE = pytest.StashKey[_Session]()


def _state(config: pytest.Config) -> _Session:
    return config.stash.setdefault(_STATE, _Session())


@pytest.fixture
def observed(request: pytest.FixtureRequest) -> Observed:
    row = _state(request.config).rows.get(request.node.nodeid)
    return row.observed if row is not None else Observed()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(area, case, expected): the test is a row of docs/reliability.md")
    config.stash[_STATE] = _Session()


# trylast: after -k, -m and --deselect have removed what this session will not run.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rows = _state(config).rows
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is not None:
            area, case, expected = marker.args
            callspec = getattr(item, "callspec", None)
            if callspec is not None and marker in item.own_markers:  # one marker, many parameters
                case = f"{case}: {callspec.id}"
            rows[item.nodeid] = Row(area, case, expected, item.nodeid)


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker(MARKER) is not None:
            _state(item.config).deselected.append(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.failed:  # a module that does not import: its cases were never collected
        _state(collector.config).collection_errors.append(report.nodeid or collector.name)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    row = _state(item.config).rows.get(item.nodeid)
    if row is None or not isinstance(report, pytest.TestReport):
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            row.outcome, row.reason = "skipped", _skip_reason(report)
        else:
            row.outcome = "pass" if report.passed else "FAIL"
    elif report.when == "teardown" and report.failed:
        row.outcome = "FAIL"
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"expected to fail: {report.wasxfail}" if report.wasxfail else "expected to fail"
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr or "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _result(row: Row) -> str:
    return f"skipped: {row.reason}" if row.outcome == "skipped" and row.reason else row.outcome


def render(rows: list[Row]) -> str:
    """The report: totals over every case (skipped ones included), then a table per area."""
    ran = [row for row in rows if row.outcome in ("pass", "FAIL")]
    outcomes = Counter(row.outcome for row in rows)
    lost = sum(row.observed.lost or 0 for row in ran)
    counted = sum(1 for row in ran if row.observed.lost is not None)
    totals = (
        f"**Totals: {len(rows)} cases, {outcomes['pass']} passed, {outcomes['FAIL']} failed, "
        f"{outcomes['skipped']} skipped"
    )
    if outcomes["not run"]:
        totals += f", {outcomes['not run']} not run"
    lines = [
        "# Reliability report",
        "",
        "Generated by the test run (`make reliability`; tests marked `reliability`), not written by hand.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"{totals}; records lost: {lost} (counted in the {counted} cases that move records).**",
        "",
    ]
    if outcomes["skipped"]:
        lines += ["A skipped case did not run on this machine; its result says why.", ""]
    for area in dict.fromkeys(row.area for row in rows):
        lines += [f"## {area}", "", "| case | expected | observed | lost | result |", "|---|---|---|---|---|"]
        for row in (r for r in rows if r.area == area):
            lost_cell = "-" if row.observed.lost is None else str(row.observed.lost)
            lines.append(
                f"| {_cell(row.case)} | {_cell(row.expected)} | {_cell(row.observed.text or '-')} "
                f"| {lost_cell} | {_cell(_result(row))} |"
            )
        lines.append("")
    files = Counter(row.test.split("::")[0] for row in rows)
    lines += ["Where the cases are:", ""] + [f"- `{name}`: {count}" for name, count in sorted(files.items())] + [""]
    return "\n".join(lines)


def partial_run(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> list[str]:
    """Why this session did not run every reliability case (empty if it did)."""
    config = session.config
    state = _state(config)
    reasons = []
    if state.deselected:
        reasons.append(f"{len(state.deselected)} reliability case(s) deselected (-k, -m, --deselect or --lf)")
    if state.collection_errors:
        reasons.append(f"collection errors in {', '.join(state.collection_errors)}")
    narrowed = _narrowed_arguments(config)
    if narrowed:
        reasons.append(narrowed)
    for option, flag in (
        ("lf", "--lf"),
        ("stepwise", "--sw"),
        ("ignore", "--ignore"),
        ("ignore_glob", "--ignore-glob"),
    ):
        if config.getoption(option, None):
            reasons.append(f"{flag} given")
    not_run = [row.test for row in state.rows.values() if row.outcome == "not run"]
    if not_run:
        reasons.append(f"{len(not_run)} reliability case(s) collected but not run (stopped early or --collect-only)")
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        reasons.append("the session was interrupted")
    return reasons


def _narrowed_arguments(config: pytest.Config) -> str | None:
    """Whether the command line named less than the configured test paths (a file, a
    folder inside them, a node id)."""
    invoked = config.invocation_params.dir
    roots = [(config.rootpath / path).resolve() for path in config.getini("testpaths")] or [config.rootpath]
    scopes = []
    for arg in config.args:
        path, node, _ = arg.partition("::")
        if node:
            return f"{arg} selects tests inside a file"
        scopes.append((invoked / path).resolve())
    missing = [root for root in roots if not any(root.is_relative_to(scope) for scope in scopes)]
    if missing:
        return f"only {' '.join(config.args)} collected, not all of {' '.join(str(root) for root in roots)}"
    return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    target = os.environ.get(REPORT_ENV)
    rows = list(_state(session.config).rows.values())
    if not target or (not rows and not _state(session.config).deselected):
        return
    reasons = partial_run(session, exitstatus)
    if reasons:
        _say(session.config, f"reliability report: not writing {target}: a partial run ({'; '.join(reasons)})")
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows))
    _say(session.config, f"reliability report: {len(rows)} cases written to {target}")


def _say(config: pytest.Config, line: str) -> None:
    """Says `line` in the terminal summary (after the progress line), or on stderr."""
    if config.pluginmanager.get_plugin("terminalreporter") is not None:
        _state(config).notes.append(line)
    else:
        print(line, file=sys.stderr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for line in _state(config).notes:
        terminalreporter.write_line(line)
