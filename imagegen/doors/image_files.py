"""The images a door hands out in another format than PNG, or as a URL instead of bytes.

- `output_format` jpeg/webp: the PNG the service made is converted here (Pillow) and stored
  beside it as `<name>-<format>[<compression>].<format>`: the name is made from the PNG's, whose
  name is the recipe's for a seeded request, so a repeat finds the converted file too (the key
  includes format and compression).
- URLs: with a bucket, a V4 signed URL of the object (imagegen.signing); without one, a URL this
  function serves itself, `*/images/files/<file>?expires=<unix time>&signature=<hex>`, an
  HMAC-SHA256 over the file and its expiry with IMAGE_URL_SIGNING_KEY (a random key per process
  when unset: then only the instance that made the URL can serve it).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import flask

from imagegen.config import Settings
from imagegen.errors import ImageNotFound, InvalidRequest, UrlSignatureInvalid
from imagegen.http import Endpoint, response
from imagegen.png_info import PngParts
from imagegen.record import RequestRecord
from imagegen.storage import CONTENT_TYPES, ImageMetadata, ImageStore, is_valid_image_name

FILES_SUFFIX = "/images/files/*"
# How long a converted copy may take to store: the answer is waiting and has the image anyway.
CONVERTED_SAVE_BUDGET_SECONDS = 5.0
# The Images API's default output_compression is 100 (the least lossy).
DEFAULT_COMPRESSION = 100
_FILE = re.compile(r"(?:([a-z0-9][a-z0-9-]{0,63})\.)?([A-Za-z0-9][A-Za-z0-9-]*)\.(png|jpeg|webp)")


@dataclass(frozen=True)
class ImageFile:
    """One image of an answer: its bytes in the asked format, and where it is stored (None
    when it is not: a placeholder, or storing failed)."""

    data: PngParts
    ext: str
    stored_name: str | None
    file_path: str | None


def convert(png: bytes, fmt: str, compression: int | None) -> bytes:
    """The PNG as JPEG or WebP; `compression` is the Images API's 0-100, used as the encoder's quality
    (100: the least lossy). JPEG has no alpha: a transparent image is put on white."""
    from PIL import Image

    quality = DEFAULT_COMPRESSION if compression is None else compression
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        if fmt == "jpeg" and image.mode != "RGB":
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        out = io.BytesIO()
        image.save(out, format=fmt.upper(), quality=quality)
    return out.getvalue()


def converted_name(stored_name: str, fmt: str, compression: int | None) -> str:
    return f"{stored_name}-{fmt}{'' if compression is None else compression}"


def in_format(
    store: ImageStore, png: PngParts, stored_name: str | None, file_path: str | None, metadata: ImageMetadata,
    fmt: str, compression: int | None,
) -> tuple[ImageFile, str | None]:  # fmt: skip
    """The image in `fmt`, stored beside its PNG when the PNG is stored; and a warning when
    the converted copy could not be stored (it is in the answer either way)."""
    if fmt == "png":
        return ImageFile(png, "png", stored_name, file_path), None
    name = converted_name(stored_name, fmt, compression) if stored_name else None
    if name is not None and (hit := store.load(name, ext=fmt)) is not None:
        data, path = hit
        return ImageFile(PngParts.of(data), fmt, name, path), None
    data = convert(png.tobytes(), fmt, compression)
    if name is None:
        return ImageFile(PngParts.of(data), fmt, None, None), None
    from imagegen.errors import StorageError

    try:
        path = store.save(PngParts.of(data), name, metadata, budget_seconds=CONVERTED_SAVE_BUDGET_SECONDS, ext=fmt)
    except StorageError as error:
        warning = f"The {fmt} image could not be stored: {error}. It is only in this answer."
        return ImageFile(PngParts.of(data), fmt, None, None), warning
    return ImageFile(PngParts.of(data), fmt, name, path), None


# --- URLs this function serves itself ----------------------------------------------------------


def file_token(name: str, ext: str) -> str:
    """The file as its URL names it: the name's one '/' (a folder) as '.', which names never hold."""
    return f"{name.replace('/', '.')}.{ext}"


class LocalFileUrls:
    """Signed, expiring URLs of the images in this function's own store, and the endpoint that
    serves them."""

    def __init__(self, store: ImageStore, key: bytes, expiry_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._key = key
        self._expiry = expiry_seconds
        self._clock = clock

    def signature(self, token: str, expires: int) -> str:
        return hmac.new(self._key, f"{token}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, base: str, name: str, ext: str) -> str:
        """`base`: the scheme, host and prefix the caller used (…/v1), without a final '/'."""
        token = file_token(name, ext)
        expires = int(self._clock()) + self._expiry
        query = urlencode({"expires": expires, "signature": self.signature(token, expires)})
        return f"{base}/images/files/{quote(token)}?{query}"

    def endpoint(self) -> Endpoint:
        return Endpoint(("GET", "HEAD"), self.serve, "Use GET to fetch an image (got {method}).")

    def serve(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        token = request.path.rsplit("/", 1)[-1]
        match = _FILE.fullmatch(token)
        expires_text, signature = request.args.get("expires", ""), request.args.get("signature", "")
        if match is None or not expires_text.isdigit() or len(expires_text) > 12:
            raise InvalidRequest("This is not an image URL this function made.", code="invalid_field")
        expires = int(expires_text)
        if not hmac.compare_digest(self.signature(token, expires), signature):
            raise UrlSignatureInvalid("The image URL's signature is not valid (or was made by another instance).")
        if expires < self._clock():
            raise UrlSignatureInvalid("The image URL has expired. Ask for the image again.", code="url_expired")
        folder, stem, ext = match.groups()
        name = f"{folder}/{stem}" if folder else stem
        hit = self._store.load(name, ext=ext) if is_valid_image_name(name) else None
        if hit is None:
            raise ImageNotFound("The image is no longer stored here (this instance may have pruned it, or another instance made it).")
        data, _ = hit
        left = max(0, expires - int(self._clock()))
        return response(200, data, {"Content-Type": CONTENT_TYPES[ext], "Cache-Control": f"private, max-age={left}"})


def image_url_maker(settings: Settings, store: ImageStore) -> tuple[Callable[[str, str, str], str], Endpoint | None]:
    """How this deployment makes image URLs, and the endpoint that serves them (None with a
    bucket: Cloud Storage serves its signed URLs)."""
    urls = settings.image_urls
    if settings.image_bucket:
        from imagegen.signing import BucketUrlSigner

        signer = BucketUrlSigner(settings.image_bucket, settings.image_prefix, urls)
        return (lambda base, name, ext: signer.url(f"{name}.{ext}")), None
    key = urls.signing_key.encode() if urls.signing_key else secrets.token_bytes(32)
    local = LocalFileUrls(store, key, urls.expiry_seconds)
    return local.url, local.endpoint()
