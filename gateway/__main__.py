"""python -m gateway"""

import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway.app import create_app, server_config
from gateway.settings import GatewaySettings
from shared.telemetry import configure_logging, configure_tracing
from shared.tls import TlsMisconfigured, environment_tls

try:
    settings = GatewaySettings()
except (ValidationError, SettingsError) as error:
    # An operator's mistake (a plaintext API key, a malformed origin): say what, no traceback.
    hint = "" if isinstance(error, ValidationError) else " (list and dict settings are JSON in the environment)"
    sys.exit(f"infermesh gateway: refusing to start with these settings{hint}:\n{error}")
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-gateway")
try:
    environment_tls()
except TlsMisconfigured as error:
    sys.exit(f"infermesh gateway: {error.detail}")
uvicorn.Server(server_config(create_app(settings), settings.host, settings.http_port)).run()
