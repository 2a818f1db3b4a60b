"""The pages: the index (upload and predict), the monitor, and the API docs served without a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from capas.deploy.serve.deps import State

STATIC = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS = "/docs-assets"  # swagger-ui's files, shipped by the fastapi-offline package

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/monitor")
async def monitor() -> FileResponse:
    return FileResponse(STATIC / "monitor.html")


@router.get("/docs")
async def docs(state: State) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"capas serve {state.run.spec.name} - API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
    )
