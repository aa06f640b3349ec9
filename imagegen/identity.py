"""A short, one-way name for an account, so that cache keys differ per account without
holding the credential."""

from __future__ import annotations

import hashlib


def account_fingerprint(secret: str | None) -> str:
    if not secret:
        return "anonymous"
    return hashlib.sha256(b"imagegen account " + secret.encode("utf-8", "replace")).hexdigest()[:16]
