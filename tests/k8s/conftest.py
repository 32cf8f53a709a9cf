"""Fixtures of tests/k8s: each overlay rendered once per session."""

from __future__ import annotations

import pytest

from tests.k8s.manifests import OVERLAYS, Manifests, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, Manifests]:
    return {overlay: Manifests(overlay, render(overlay)) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def manifests(request: pytest.FixtureRequest, rendered: dict[str, Manifests]) -> Manifests:
    """Each overlay in turn."""
    return rendered[str(request.param)]


@pytest.fixture
def prod(rendered: dict[str, Manifests]) -> Manifests:
    return rendered["prod"]


@pytest.fixture
def dev(rendered: dict[str, Manifests]) -> Manifests:
    return rendered["dev"]


@pytest.fixture
def gpu(rendered: dict[str, Manifests]) -> Manifests:
    return rendered["gpu"]
