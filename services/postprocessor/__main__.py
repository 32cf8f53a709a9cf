"""python -m services.postprocessor"""

import asyncio

from services.postprocessor.server import serve
from services.postprocessor.settings import PostprocessorSettings
from shared.telemetry import configure_logging

settings = PostprocessorSettings()
configure_logging(settings.log_json, settings.log_level)
asyncio.run(serve(settings))
