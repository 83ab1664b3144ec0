"""The vendored front end: htmx exactly as published, and nothing that needs inline script."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import collector.web

STATIC = Path(collector.web.__file__).parent / "static"
TEMPLATES = Path(collector.web.__file__).parent / "templates"
HTMX_VERSION = "2.0.11"
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
"""sha256 of dist/htmx.min.js in the npm package htmx.org 2.0.11 (static/htmx.VERSION)."""


def test_vendored_htmx_is_the_published_file() -> None:
    data = (STATIC / "htmx.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == HTMX_SHA256
    note = (STATIC / "htmx.VERSION").read_text()
    assert HTMX_VERSION in note and HTMX_SHA256 in note
    assert (STATIC / "htmx.LICENSE").is_file()


def test_templates_have_no_inline_script_style_or_handlers() -> None:
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert re.search(r"<script(?![^>]*\bsrc=)", text) is None, template.name
        assert "<style" not in text and " style=" not in text, template.name
        assert re.search(r"\son[a-z]+=", text) is None, template.name  # onclick= etc.
        assert "hx-on" not in text and "javascript:" not in text, template.name
        assert "|safe" not in text and "Markup(" not in text, template.name
        assert "http://" not in text and "https://" not in text, template.name  # no CDN


def test_every_post_form_carries_the_csrf_field() -> None:
    for template in TEMPLATES.glob("*.html"):
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", template.read_text(), re.S):
            assert 'name="csrf"' in form or "csrf_field(csrf)" in form, template.name
