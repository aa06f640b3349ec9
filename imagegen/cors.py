"""CORS: which browser origins may read the function's answers.

Every API answer, errors included, carries the origin header: a browser hides the body of an
answer without it, and a frontend could then show only "Failed to fetch" instead of our message.
"""

from __future__ import annotations

ALLOWED_METHODS = "POST, OPTIONS"
ALLOWED_HEADERS = "Content-Type, Authorization, X-API-Key"
# Response headers a script may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = "Retry-After, X-Request-Id, Server-Timing, RateLimit, RateLimit-Policy"
PREFLIGHT_MAX_AGE_SECONDS = 3600


def cors_headers(origin: str | None, allowed_origins: tuple[str, ...]) -> dict[str, str]:
    if "*" in allowed_origins:
        return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSED_HEADERS}
    # The answer depends on Origin, so caches must key on it, also when the origin is refused.
    headers = {"Vary": "Origin"}
    if origin and origin.lower() in {allowed.lower() for allowed in allowed_origins}:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return headers


def preflight_headers(origin: str | None, allowed_origins: tuple[str, ...]) -> dict[str, str]:
    headers = cors_headers(origin, allowed_origins)
    if "Access-Control-Allow-Origin" in headers:
        headers.update(
            {
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
            }
        )
    return headers
