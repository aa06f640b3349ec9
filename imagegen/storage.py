"""Where generated PNGs are kept: a local directory (the default) or a Cloud Storage bucket.

A store's `save` returns the `filePath` the caller sees, or raises `StorageError`; the handler
then still returns the image, with a warning, so a paid-for generation is never lost.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from imagegen.png_info import PngParts

from imagegen.config import Settings
from imagegen.errors import StorageError

MAX_SLUG_CHARS = 40
MAX_METADATA_PROMPT_CHARS = 500
UPLOAD_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ImageMetadata:
    model: str
    prompt: str
    seed: int | None


class ImageStore(Protocol):
    def save(self, png: PngParts, name: str, metadata: ImageMetadata) -> str: ...


def image_name(prompt: str, now: datetime | None = None, suffix: str | None = None) -> str:
    """'20261124T211900Z-a-red-fox-3f9a1c2b': sortable by time, readable, unique, and safe.

    Only [a-z0-9-] come from the prompt, so no prompt can add a '/', '..' or a control
    character to a path or object name.
    """
    now = now or datetime.now(timezone.utc)
    ascii_prompt = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_prompt.lower()).strip("-")[:MAX_SLUG_CHARS].strip("-")
    return "-".join(
        part
        for part in (now.strftime("%Y%m%dT%H%M%S%fZ"), slug or "image", suffix or secrets.token_hex(4))
    )


class LocalImageStore:
    """Files in one directory, keeping the newest `max_files`.

    On Cloud Functions /tmp is memory that outlives requests, so an unbounded directory would
    eventually take the instance down.
    """

    def __init__(self, directory: Path, max_files: int) -> None:
        self._directory = directory.absolute()
        self._max_files = max_files
        self._prune_lock = threading.Lock()

    def save(self, png: PngParts, name: str, metadata: ImageMetadata) -> str:
        path = self._directory / f"{name}.png"
        partial = self._directory / f".{name}.png.partial"
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            # Write then rename, so nobody ever sees half a file under the final name.
            with open(partial, "wb") as file:
                file.writelines(png)
            os.replace(partial, path)
        except OSError as error:
            _remove_quietly(partial)
            raise StorageError(
                f"Could not write the image to {self._directory} ({error.strerror or error}). "
                "Check IMAGE_DIR"
            ) from None
        self._prune()
        return str(path)

    def _prune(self) -> None:
        if not self._prune_lock.acquire(blocking=False):
            return  # another request is pruning right now; one at a time is enough
        try:
            with os.scandir(self._directory) as entries:
                # Names start with a UTC timestamp, so name order is age order.
                names = sorted(e.name for e in entries if e.name.endswith(".png") and e.is_file())
            for old in names[: max(0, len(names) - self._max_files)]:
                (self._directory / old).unlink(missing_ok=True)
        except OSError:
            pass  # pruning is housekeeping; the image itself is already stored
        finally:
            self._prune_lock.release()


class GcsImageStore:
    """Objects `{prefix}{name}.png` in a bucket. The client is created on first save."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self._bucket_name = bucket
        self._prefix = prefix
        self._bucket = None
        self._client_lock = threading.Lock()

    def save(self, png: PngParts, name: str, metadata: ImageMetadata) -> str:
        object_name = f"{self._prefix}{name}.png"
        try:
            blob = self._get_bucket().blob(object_name)
            blob.metadata = {
                "model": metadata.model,
                "seed": "" if metadata.seed is None else str(metadata.seed),
                "prompt": metadata.prompt[:MAX_METADATA_PROMPT_CHARS],
            }
            # if_generation_match=0: never overwrite an object, and makes the upload safe to retry.
            blob.upload_from_string(
                png.tobytes(), content_type="image/png", if_generation_match=0, timeout=UPLOAD_TIMEOUT_SECONDS
            )
        except Exception as error:  # google-cloud-storage raises many unrelated types
            raise StorageError(
                f"Could not upload the image to gs://{self._bucket_name} "
                f"({type(error).__name__}: {_first_line(error)}). Check IMAGE_BUCKET and that "
                "the function's service account may create objects there"
            ) from None
        return f"gs://{self._bucket_name}/{object_name}"

    def _get_bucket(self):
        with self._client_lock:
            if self._bucket is None:
                # Without this the client starts a background request for bucket metadata
                # (google-cloud-storage 3.17), which costs time and fails offline.
                os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
                from google.cloud import storage  # ~165 ms: only deployments with a bucket pay

                self._bucket = storage.Client().bucket(self._bucket_name)
            return self._bucket


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:200]


def make_store(settings: Settings) -> ImageStore:
    if settings.image_bucket:
        return GcsImageStore(settings.image_bucket, settings.image_prefix)
    return LocalImageStore(settings.image_dir, settings.image_dir_max_files)
