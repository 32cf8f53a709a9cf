"""python -m services.inference"""

import asyncio

from services.inference.server import serve
from services.inference.settings import InferenceSettings
from shared.model_store import StoreSettings, local_repository, serve_following
from shared.telemetry import configure_logging, configure_tracing

settings = InferenceSettings()
store = StoreSettings()
# With a model store, the service reads the follower's copy of it (see shared/model_store.py).
settings = settings.model_copy(update={"model_repository": local_repository(store, settings.model_repository)})
configure_logging(settings.log_json, settings.log_level)
configure_tracing("infermesh-inference")
asyncio.run(serve_following("inference", store, settings.model_repository, lambda follower: serve(settings, follower)))
