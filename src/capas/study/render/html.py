"""The report as one self-contained HTML page (report.html), rendered from templates/report.html."""

from __future__ import annotations

import base64
from functools import cache

import jinja2

from capas.study.render.text import Document


@cache
def _template() -> jinja2.Template:
    # Autoescaping: variant names and error messages come from users' files and runs.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("capas.study.render", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the tests instead of printing nothing
        keep_trailing_newline=True,
    )
    return environment.get_template("report.html")


def html_page(doc: Document, images: dict[str, bytes]) -> str:
    """The page with each plot (file name -> PNG bytes) embedded as a base64 data URL."""
    encoded = {name: base64.b64encode(png).decode() for name, png in images.items()}
    return _template().render(doc=doc, images=encoded)
