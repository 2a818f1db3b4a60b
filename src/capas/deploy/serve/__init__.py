"""Serving a run directory over HTTP: FastAPI app, micro-batching, live accuracy and drift monitoring.

The names below load on first use, so that reading the settings (`capas --help`) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capas.deploy.serve.app import create_app, serve
    from capas.deploy.serve.settings import ServeSettings, make_settings

_WHERE = {
    "create_app": "capas.deploy.serve.app",
    "serve": "capas.deploy.serve.app",
    "ServeSettings": "capas.deploy.serve.settings",
    "make_settings": "capas.deploy.serve.settings",
}

__all__ = ["ServeSettings", "create_app", "make_settings", "serve"]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
