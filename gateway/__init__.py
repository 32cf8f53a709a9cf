"""The REST gateway: /v1 sentiment API, the live monitoring dashboard, problem+json errors."""
