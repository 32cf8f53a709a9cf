"""python -m services.tokenizer"""

import asyncio

from services.tokenizer.server import serve
from services.tokenizer.settings import TokenizerSettings
from shared.telemetry import configure_logging, configure_tracing

settings = TokenizerSettings()
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-tokenizer")
asyncio.run(serve(settings))
