"""The app factory: `create_app(settings)` for `python -m service`, tests and other tools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .errors import install_handlers
from .loading import TaskModel, load_models
from .middleware import RequestContext
from .routes import router
from .runtime import Service
from .settings import Settings
from .v2.routes import router as v2_router


def create_app(settings: Settings | None = None, models: dict[str, TaskModel] | None = None) -> FastAPI:
    """Load the models (or take `models`, e.g. fakes in tests) and build the app; raises StartupError."""
    settings = settings or Settings()
    service = Service(settings, models if models is not None else load_models(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()  # warm-up runs in the background; /readyz says when it is done
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="mprnet-serve",
        version="0.1.0",
        summary="MPRNet image restoration (deblurring, deraining, denoising) with a dynamic micro-batcher",
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    app.add_middleware(RequestContext, metrics=service.metrics)
    app.include_router(router)
    app.include_router(v2_router)  # the Open Inference Protocol (KServe v2) beside our own API
    if settings.ui_enabled:
        try:
            from .ui import router as ui_router
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.ui":
                raise
        else:
            app.include_router(ui_router)
    return app
