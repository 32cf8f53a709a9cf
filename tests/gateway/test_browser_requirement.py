"""Browser tests never pass silently in CI: without chromium they skip locally (with the
reason) but fail under CI=true, and `make _browser` fails there when it cannot install it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.gateway.conftest import require_chromium

REPO = Path(__file__).resolve().parents[2]


def no_chromium(name: str) -> str | None:
    return None


def test_a_browser_test_without_chromium_skips_locally_with_the_reason() -> None:
    with pytest.raises(pytest.skip.Exception, match="Debian chromium is not installed"):
        require_chromium({}, which=no_chromium)
    with pytest.raises(pytest.skip.Exception):
        require_chromium({"CI": "false"}, which=no_chromium)


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_browser_test_without_chromium_fails_in_ci(value: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_chromium({"CI": value}, which=no_chromium)


def test_a_browser_test_with_chromium_runs_in_ci() -> None:
    require_chromium({"CI": "true"}, which=lambda name: f"/usr/bin/{name}")


def run_browser_target(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """`make _browser` on a PATH without chromium, where apt-get fails."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    apt = tools / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
    apt.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PATH"] = str(tools)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [make, "--no-print-directory", "-C", str(REPO), "_browser", "SUDO="],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_make_browser_warns_when_chromium_cannot_be_installed(tmp_path: Path) -> None:
    result = run_browser_target(tmp_path, ci=None)
    assert result.returncode == 0, result.stderr
    assert "WARNING: could not install chromium" in result.stdout


def test_make_browser_fails_in_ci_when_chromium_cannot_be_installed(tmp_path: Path) -> None:
    result = run_browser_target(tmp_path, ci="true")
    assert result.returncode != 0
    assert "could not install chromium" in result.stderr and "CI=true" in result.stderr
    assert "WARNING" not in result.stdout
