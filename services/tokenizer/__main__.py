"""python -m services.tokenizer"""

import asyncio

from services.tokenizer.server import serve
from services.tokenizer.settings import TokenizerSettings
from shared.model_store import StoreSettings, local_repository, serve_following
from shared.telemetry import configure_logging, configure_tracing

settings = TokenizerSettings()
store = StoreSettings()
# With a model store, the service reads the follower's copy of it (see shared/model_store.py).
settings = settings.model_copy(update={"model_repository": local_repository(store, settings.model_repository)})
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-tokenizer")
asyncio.run(serve_following("tokenizer", store, settings.model_repository, lambda _: serve(settings)))
