"""python -m services.postprocessor"""

import asyncio

from services.postprocessor.server import serve
from services.postprocessor.settings import PostprocessorSettings
from shared.telemetry import configure_logging, configure_tracing

settings = PostprocessorSettings()
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-postprocessor")
asyncio.run(serve(settings))
