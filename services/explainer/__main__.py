"""python -m services.explainer"""

import asyncio

from services.explainer.server import serve
from services.explainer.settings import ExplainerSettings
from shared.telemetry import configure_logging, configure_tracing

settings = ExplainerSettings()
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-explainer")
asyncio.run(serve(settings))
