"""Serving a run directory over HTTP: FastAPI app, micro-batching, live accuracy and drift monitoring."""

from capas.deploy.serve.app import create_app, serve
from capas.deploy.serve.settings import ServeSettings, make_settings

__all__ = ["ServeSettings", "create_app", "make_settings", "serve"]
