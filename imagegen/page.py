"""The try-it page, served on GET / and /index.html.

One HTML document with its CSS and JS inline: a deployed function's URL has no trailing slash
(`…/imagegen`), so relative links to separate files would miss it. Inline code stays allowed by
a strict Content-Security-Policy through the sha256 of each block, not 'unsafe-inline'.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Page:
    html: bytes
    content_security_policy: str


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def _template() -> tuple[str, str, str]:
    return tuple((STATIC_DIR / name).read_text() for name in ("index.html", "style.css", "app.js"))  # type: ignore[return-value]


def render_page(max_prompt_chars: int, auth_mode: str) -> Page:
    """The page; what it may pick (backends, models, providers) it reads from /capabilities.json."""
    template, style, script = _template()
    config = {"maxPromptChars": max_prompt_chars, "authMode": auth_mode}
    # "</" would end the data block early; "<\/" is the same JSON string.
    config_json = json.dumps(config).replace("</", "<\\/")
    html = template.replace("{{STYLE}}", style).replace("{{SCRIPT}}", script).replace("{{CONFIG}}", config_json)
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_sha256(script)}",
            f"style-src {_sha256(style)}",
            "img-src data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return Page(html.encode(), policy)
