"""python -m services.tokenizer"""

import asyncio

from services.tokenizer.server import serve
from services.tokenizer.settings import TokenizerSettings
from shared.telemetry import configure_logging

settings = TokenizerSettings()
configure_logging(settings.log_json, settings.log_level)
asyncio.run(serve(settings))
