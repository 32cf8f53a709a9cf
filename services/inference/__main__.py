"""python -m services.inference"""

import asyncio

from services.inference.server import serve
from services.inference.settings import InferenceSettings
from shared.telemetry import configure_logging, configure_tracing

settings = InferenceSettings()
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-inference")
asyncio.run(serve(settings))
