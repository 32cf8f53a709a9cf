"""python -m services.inference"""

import asyncio

from services.inference.server import serve
from services.inference.settings import InferenceSettings
from shared.telemetry import configure_logging

settings = InferenceSettings()
configure_logging(settings.log_json, settings.log_level)
asyncio.run(serve(settings))
