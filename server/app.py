"""The FastAPI app, assembled: lifespan (engine start and watch), routes, error handlers,
middleware. Everything it assembles lives in its own module:

    routes.py               the endpoints, thin functions over the serving objects
    serving.py              the pipeline shared by completions and chat
    serving_completion.py   /v1/completions        serving_chat.py   /v1/chat/completions
    serving_tokenize.py     /tokenize, /detokenize tools.py          forced tool calls
    admission.py            in-flight bound (429) and one observation per request
    store.py                what is servable and what is in a slot: folders, loads, eviction
    models.py               the loaded models: checkpoint name -> engine slot, base model
    admin.py                /v1/load_checkpoint, /v1/unload_checkpoint
    errors.py               OpenAI error bodies for every failure
    middleware.py           API key, body size limit (413)
    protocol.py             request / response models     logprobs.py   both logprob shapes
    engine_client.py        the AsyncLLM handle            metrics.py    /metrics
    settings.py             settings, one definition each (flags and environment)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request

from server.admin import CheckpointAdmin
from server.admission import Admission
from server.engine_client import RemixEngine
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from server.routes import Services, router
from server.serving_chat import ServingChat
from server.serving_completion import ServingCompletion
from server.serving_tokenize import ServingTokenize
from server.settings import ServerSettings
from server.store import CheckpointStore

log = logging.getLogger("remix_serve.app")


def build_services(engine: RemixEngine, settings: ServerSettings) -> Services:
    admission = Admission(settings.max_queue, settings.retry_after_s)
    metrics = Metrics(engine)
    admission.observers.append(metrics.serving.observe)
    store = CheckpointStore(engine, settings, metrics.store)
    return Services(
        engine=engine,
        settings=settings,
        admission=admission,
        metrics=metrics,
        store=store,
        completion=ServingCompletion(engine, settings, admission, store),
        chat=ServingChat(engine, settings, admission, store),
        tokenize=ServingTokenize(engine, store),
        admin=CheckpointAdmin(engine, settings, store),
    )


def engine_lifespan(
    engine: RemixEngine, store: CheckpointStore, on_engine_failure: Callable[[], None]
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start the engine in the background (/health answers and /ready says 503 while it loads),
    then watch it; on_engine_failure runs if it cannot start or dies later. The store rescans
    its directories beside it."""

    async def run_engine() -> None:
        try:
            await engine.start()
        except Exception:
            log.exception("the engine failed to start")
            on_engine_failure()
            return
        log.info("ready: %s", engine.describe())
        await engine.watch(on_engine_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(run_engine()), asyncio.create_task(store.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            engine.shutdown()

    return lifespan


def create_app(
    engine: RemixEngine,
    settings: ServerSettings | None = None,
    on_engine_failure: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The HTTP service over `engine` (started by the app's lifespan). on_engine_failure: what
    the process does when the engine cannot start or dies (remix-serve exits non-zero)."""
    settings = settings or ServerSettings()
    services = build_services(engine, settings)
    app = FastAPI(
        title="remix-serve", lifespan=engine_lifespan(engine, services.store, on_engine_failure)
    )
    app.state.services = services
    app.include_router(router)

    v1_posts = {s.endpoint for s in (services.completion, services.chat)}

    def observe_error(request: Request, status: int) -> None:
        if request.method == "POST" and request.url.path in v1_posts:
            services.admission.refused(request, request.url.path, status)

    install_error_handlers(app, observe_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # outermost: first
    return app
