"""python -m services.postprocessor"""

import asyncio

from services.postprocessor.server import serve
from services.postprocessor.settings import PostprocessorSettings
from shared.model_store import StoreSettings, local_repository, serve_following
from shared.telemetry import configure_logging, configure_tracing

settings = PostprocessorSettings()
store = StoreSettings()
# With a model store, the service reads the follower's copy of it (see shared/model_store.py).
settings = settings.model_copy(update={"model_repository": local_repository(store, settings.model_repository)})
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-postprocessor")
asyncio.run(serve_following("post-processor", store, settings.model_repository, lambda _: serve(settings)))
