"""The reliability report (tests/reliability.py): skipped cases count, with their reason,
and only a session that ran every reliability case writes the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import REPORT_ENV, Observed, Row, render

pytest_plugins = ["pytester"]

CASES = """
import pytest

@pytest.mark.reliability("Faults", "a fault", "survives")
def test_fault(observed):
    observed.record("survived", lost=0)

@pytest.mark.reliability("Faults", "a browser check", "the page shows it")
def test_browser():
    pytest.skip("Debian chromium is not installed")

@pytest.mark.reliability("Limits", "a limit", "refused")
@pytest.mark.parametrize("size", [1, 2])
def test_limit(observed, size):
    observed.record(f"refused {size}")

def test_plain():
    pass
"""

MORE_CASES = """
import pytest

@pytest.mark.reliability("Security", "a key", "401")
def test_key(observed):
    observed.record("401")
"""


def test_render_counts_skipped_cases_with_their_reason() -> None:
    rows = [
        Row("Faults", "kill", "0 lost", "tests/a.py::test_kill", Observed("0 lost", lost=0), "pass"),
        Row("Faults", "slow", "504", "tests/a.py::test_slow", Observed("200"), "FAIL"),
        Row(
            "Pages", "page", "shown", "tests/b.py::test_page", Observed(), "skipped", "Debian chromium is not installed"
        ),
    ]
    report = render(rows)
    assert "**Totals: 3 cases, 1 passed, 1 failed, 1 skipped; records lost: 0 (counted in the 1 cases" in report
    assert "| page | shown | - | - | skipped: Debian chromium is not installed |" in report
    assert "- `tests/b.py`: 1" in report


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with the report plugin, five reliability cases in two files, and the
    report variable pointing at report.md (which holds an older report)."""
    pytester.makeini(
        "[pytest]\ntestpaths = suite\naddopts = -p tests.reliability -p no:cacheprovider\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    folder = pytester.mkdir("suite")
    (folder / "test_cases.py").write_text(CASES)
    (folder / "test_more.py").write_text(MORE_CASES)
    report = pytester.path / "report.md"
    report.write_text("the previous report\n")
    monkeypatch.setenv(REPORT_ENV, str(report))
    return report


def test_a_full_run_writes_every_case_skipped_ones_included(pytester: pytest.Pytester, project: Path) -> None:
    result = pytester.runpytest()
    result.assert_outcomes(passed=5, skipped=1)
    report = project.read_text()
    assert "**Totals: 5 cases, 4 passed, 0 failed, 1 skipped; records lost: 0" in report
    assert "| a browser check | the page shows it | - | - | skipped: Debian chromium is not installed |" in report
    assert "| a limit: 2 | refused | refused 2 | - | pass |" in report
    result.stdout.fnmatch_lines([f"reliability report: 5 cases written to {project}"])


def test_only_the_reliability_cases_is_a_full_run(pytester: pytest.Pytester, project: Path) -> None:
    """`make reliability` (-m reliability) drops the other tests, none of the cases."""
    pytester.runpytest("-m", "reliability").assert_outcomes(passed=4, skipped=1, deselected=1)
    assert "**Totals: 5 cases" in project.read_text()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["-k", "limit"], "*3 reliability case(s) deselected*"),
        (["-m", "reliability and not parametrize"], "*deselected*"),
        (["suite/test_cases.py"], "*only suite/test_cases.py collected*"),
        (["suite/test_more.py::test_key"], "*selects tests inside a file*"),
        (["--deselect", "suite/test_more.py::test_key"], "*1 reliability case(s) deselected*"),
        (["--ignore", "suite/test_more.py"], "*--ignore given*"),
        (["--collect-only"], "*collected but not run*"),
    ],
    ids=["-k", "-m subset", "one file", "node id", "--deselect", "--ignore", "--collect-only"],
)
def test_a_partial_run_writes_nothing_and_says_why(
    pytester: pytest.Pytester, project: Path, args: list[str], why: str
) -> None:
    result = pytester.runpytest(*args)
    assert project.read_text() == "the previous report\n"
    result.stdout.fnmatch_lines([f"reliability report: not writing {project}: a partial run {why}"])


def test_a_run_stopped_early_writes_nothing(pytester: pytest.Pytester, project: Path) -> None:
    (pytester.path / "suite" / "test_cases.py").write_text(
        CASES.replace('observed.record("survived", lost=0)', "1 / 0")
    )
    result = pytester.runpytest("-x")
    result.assert_outcomes(failed=1)
    assert project.read_text() == "the previous report\n"
    result.stdout.fnmatch_lines(["*not writing*collected but not run*"])


def test_a_failing_case_is_in_a_full_report(pytester: pytest.Pytester, project: Path) -> None:
    (pytester.path / "suite" / "test_more.py").write_text(MORE_CASES.replace('observed.record("401")', "1 / 0"))
    pytester.runpytest().assert_outcomes(passed=4, skipped=1, failed=1)
    report = project.read_text()
    assert "**Totals: 5 cases, 3 passed, 1 failed, 1 skipped" in report
    assert "| a key | 401 | - | - | FAIL |" in report


def test_a_module_that_does_not_import_makes_the_run_partial(pytester: pytest.Pytester, project: Path) -> None:
    (pytester.path / "suite" / "test_more.py").write_text("import no_such_module\n" + MORE_CASES)
    result = pytester.runpytest("--continue-on-collection-errors")
    assert project.read_text() == "the previous report\n"
    result.stdout.fnmatch_lines(["*not writing*collection errors in suite/test_more.py*"])
