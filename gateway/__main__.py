"""python -m gateway"""

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.telemetry import configure_logging, configure_tracing

settings = GatewaySettings()
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-gateway")
# Our access log (gateway.access) has the route template and the trace id; uvicorn's would repeat it.
uvicorn.run(create_app(settings), host=settings.host, port=settings.http_port, log_config=None, access_log=False)
