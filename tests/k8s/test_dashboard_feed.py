"""The gateway's dashboard feed as the manifests configure it: every gateway replica
follows every partition of the monitor's topics, so each starts from a bounded history
(never the earliest offset) and keeps a bounded summary (gateway/dashboard.py)."""

from __future__ import annotations

from gateway.settings import DashboardSettings
from tests.k8s.manifests import Manifests, env_name, load_settings, quantity, settings_classes


def test_every_gateway_replicas_dashboard_feed_is_bounded(manifests: Manifests) -> None:
    process = manifests.process("gateway")
    assert DashboardSettings in settings_classes("gateway"), "python -m gateway does not read DashboardSettings"
    env = manifests.environment(process.container)
    for field in ("history_records", "max_tickers", "windows_per_ticker", "fetch_max_bytes"):
        name = env_name(DashboardSettings, field)
        assert name in env, f"{manifests.overlay}: the gateway leaves {name} to its default"
    settings = load_settings(DashboardSettings, env)
    assert isinstance(settings, DashboardSettings)
    assert 0 < settings.history_records <= 10_000
    memory = quantity(process.container["resources"]["limits"]["memory"])
    assert settings.fetch_max_bytes <= memory / 16, f"{manifests.overlay}: fetches of {settings.fetch_max_bytes} B"
