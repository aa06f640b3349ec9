"""Where generated PNGs are kept: a local directory (the default) or a Cloud Storage bucket.

A store's `save` returns the `filePath` the caller sees, or raises `StorageError`; the handler
then still returns the image, with a warning, so a paid-for generation is never lost.

Both calls fit a time budget the caller may pass (the request's remaining time): the Cloud
Storage client's default retry runs for up to 120 s, so with the bucket unreachable a request
once took 72 to 214 s. A cache `load` gets at most `LOAD_BUDGET_SECONDS`, a `save` at most
`SAVE_BUDGET_SECONDS`. The warning a caller sees says what kind of failure it was in words of
our own; the client's error text (hosts, URLs, paths) goes only to the function's log.
The client sends through the outbound exchange, inside a deadline of that budget: a Cloud
Storage (or emulator) that trickles its answer, or reads an upload slowly, is cut off at the
budget's end, and so is the token request of the client's credentials.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from imagegen.png_info import PngParts

from imagegen import outbound
from imagegen.config import Settings
from imagegen.errors import StorageError
from imagegen.logs import get_logger

MAX_SLUG_CHARS = 40
MAX_METADATA_PROMPT_CHARS = 500
# A cache lookup is an optimisation: when storage is slow, generating is the better bet.
LOAD_BUDGET_SECONDS = 5.0
# Storing is worth more (the image is paid for), but the answer is worth more still.
SAVE_BUDGET_SECONDS = 20.0
# Connecting to Cloud Storage takes milliseconds when it works.
CONNECT_TIMEOUT_SECONDS = 3.0
# The formats a store keeps, by file extension: PNG (what the service makes), and what a door
# may convert it to (the Images API door's output_format).
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class ImageMetadata:
    model: str
    prompt: str
    seed: int | None


class ImageStore(Protocol):
    def save(
        self, png: PngParts, name: str, metadata: ImageMetadata, budget_seconds: float | None = None, ext: str = "png"
    ) -> str:
        """Store under `name` (no extension; may hold one '/') within `budget_seconds` (at most
        SAVE_BUDGET_SECONDS), as `name.ext` (a key of CONTENT_TYPES); the filePath, or StorageError."""
        ...

    def load(self, name: str, budget_seconds: float | None = None, ext: str = "png") -> tuple[bytes, str] | None:
        """(the image, its filePath) when `name` is stored; None when not, when it cannot be read,
        or when it cannot be read within `budget_seconds` (at most LOAD_BUDGET_SECONDS)."""
        ...


# What `image_name` and `cache.cached_image_name` make: [A-Za-z0-9-] words, at most one folder
# before them, no dots. A name read back from anywhere (a single-flight outcome in Redis) is
# checked against it before it becomes a path or an object name.
MAX_NAME_CHARS = 200
_NAME = re.compile(r"(?:[a-z0-9][a-z0-9-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9-]*")


def is_valid_image_name(name: object) -> bool:
    """True for a name this store could have made: nothing that leaves its folder or bucket prefix."""
    return isinstance(name, str) and len(name) <= MAX_NAME_CHARS and _NAME.fullmatch(name) is not None


def image_name(prompt: str, now: datetime | None = None, suffix: str | None = None) -> str:
    """'20261124T211900Z-a-red-fox-3f9a1c2b': sortable by time, readable, unique, and safe.

    Only [a-z0-9-] come from the prompt, so no prompt can add a '/', '..' or a control
    character to a path or object name.
    """
    now = now or datetime.now(timezone.utc)
    return "-".join((now.strftime("%Y%m%dT%H%M%S%fZ"), prompt_slug(prompt), suffix or secrets.token_hex(4)))


def prompt_slug(prompt: str) -> str:
    """A short [a-z0-9-] rendering of the prompt for file names; 'image' when nothing is left."""
    ascii_prompt = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_prompt.lower()).strip("-")[:MAX_SLUG_CHARS].strip("-")
    return slug or "image"


class LocalImageStore:
    """Files in one directory, keeping the newest `max_files`.

    On Cloud Functions /tmp is memory that outlives requests, so an unbounded directory would
    eventually take the instance down. Listing the directory costs about a millisecond of CPU
    at 200 files, more than everything else a save does, so it is cleaned up once every
    `max_files // 20` saves: between clean-ups it may hold up to 5% more files.
    """

    def __init__(self, directory: Path, max_files: int) -> None:
        self._directory = directory.absolute()
        self._max_files = max_files
        self._prune_every = max(1, max_files // 20)
        self._saves_since_prune = 0
        self._prune_lock = threading.Lock()

    def save(
        self, png: PngParts, name: str, metadata: ImageMetadata, budget_seconds: float | None = None, ext: str = "png"
    ) -> str:
        # A local write has no network to wait for: the budget is not needed.
        _check_name(name, ext)
        path = self._directory / f"{name}.{ext}"
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so nobody ever sees half a file under the final name.
            with open(partial, "wb") as file:
                file.writelines(png)
            os.replace(partial, path)
        except OSError as error:
            _remove_quietly(partial)
            # The directory's absolute path stays in the log: the caller sees only the setting.
            _log_failure("write", error, str(self._directory))
            raise StorageError(
                f"the directory in IMAGE_DIR could not be written ({error.strerror or type(error).__name__})"
            ) from None
        if self._prune_due():
            self._prune(path.parent)
        return str(path)

    def load(self, name: str, budget_seconds: float | None = None, ext: str = "png") -> tuple[bytes, str] | None:
        if not is_valid_image_name(name) or ext not in CONTENT_TYPES:
            return None
        path = self._directory / f"{name}.{ext}"
        try:
            return path.read_bytes(), str(path)
        except OSError:
            return None

    def _prune_due(self) -> bool:
        with self._prune_lock:
            self._saves_since_prune += 1
            if self._saves_since_prune < self._prune_every:
                return False
            self._saves_since_prune = 0
            return True

    def _prune(self, directory: Path) -> None:
        try:
            with os.scandir(directory) as entries:
                # Names start with a UTC timestamp, so name order is age order.
                # Oldest first: timestamped names sort by age, cached ones need their mtime.
                files = sorted(
                    (entry.stat().st_mtime, entry.name)
                    for entry in entries
                    if entry.name.endswith((".png", ".jpeg", ".webp")) and entry.is_file()
                )
            for _, old in files[: max(0, len(files) - self._max_files)]:
                (directory / old).unlink(missing_ok=True)
        except OSError:
            pass  # pruning is housekeeping; the image itself is already stored


class GcsImageStore:
    """Objects `{prefix}{name}.png` in a bucket. The client is created on first save."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self._bucket_name = bucket
        self._prefix = prefix
        self._bucket = None
        self._client_lock = threading.Lock()

    def save(
        self, png: PngParts, name: str, metadata: ImageMetadata, budget_seconds: float | None = None, ext: str = "png"
    ) -> str:
        _check_name(name, ext)
        object_name = f"{self._prefix}{name}.{ext}"
        budget = _budget(budget_seconds, SAVE_BUDGET_SECONDS)
        ends = time.monotonic() + budget
        try:
            blob = self._get_bucket().blob(object_name)
            blob.metadata = {
                "model": metadata.model,
                "seed": "" if metadata.seed is None else str(metadata.seed),
                "prompt": metadata.prompt[:MAX_METADATA_PROMPT_CHARS],
            }
            # if_generation_match=0: never overwrite an object, and makes the upload safe to retry.
            with outbound.deadline(budget):
                blob.upload_from_string(
                    png.tobytes(),
                    content_type=CONTENT_TYPES[ext],
                    if_generation_match=0,
                    timeout=_timeout(budget),
                    retry=_retry(budget),
                )
        except Exception as error:  # google-cloud-storage raises many unrelated types
            if type(error).__name__ == "PreconditionFailed":
                # Another instance stored the same content-addressed image first: it is there.
                return f"gs://{self._bucket_name}/{object_name}"
            _log_failure("upload", error, f"gs://{self._bucket_name}/{object_name}")
            if time.monotonic() >= ends:
                # Cut off at the budget: whatever the client made of the half answer.
                raise StorageError("Cloud Storage did not answer in time") from None
            raise StorageError(_gcs_failure(error)) from None
        return f"gs://{self._bucket_name}/{object_name}"

    def load(self, name: str, budget_seconds: float | None = None, ext: str = "png") -> tuple[bytes, str] | None:
        if not is_valid_image_name(name) or ext not in CONTENT_TYPES:
            return None
        object_name = f"{self._prefix}{name}.{ext}"
        budget = _budget(budget_seconds, LOAD_BUDGET_SECONDS)
        try:
            blob = self._get_bucket().blob(object_name)
            with outbound.deadline(budget) as deadline:
                data = blob.download_as_bytes(timeout=_timeout(budget), retry=_retry(budget))
            if deadline.expired:
                # The deadline cut the answer short, and an answer without a length (or a
                # checksum) looks whole to the client: never serve it as the cached image.
                raise TimeoutError("the storage budget ran out")
        except Exception as error:  # NotFound, or storage trouble: either way, generate instead
            if type(error).__name__ != "NotFound":
                _log_failure("cache lookup", error, f"gs://{self._bucket_name}/{object_name}")
            return None
        return data, f"gs://{self._bucket_name}/{object_name}"

    def _get_bucket(self):
        with self._client_lock:
            if self._bucket is None:
                # main.py sets DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA for the process.
                from google.cloud import storage  # ~165 ms: only deployments with a bucket pay

                client = storage.Client()
                # The client's session is made here, not by the client: our connections (the
                # deadline held at the socket) and a bounded transport for token refreshes.
                # `_http_internal` is what the client's own `_http` property fills in lazily.
                client._http_internal = _session(client._credentials)
                self._bucket = client.bucket(self._bucket_name)
            return self._bucket


def _check_name(name: str, ext: str = "png") -> None:
    if not is_valid_image_name(name) or ext not in CONTENT_TYPES:
        # Names are made here, never taken from a caller: this is a bug, not bad input.
        raise StorageError("the image's name is not one this store makes")
def _session(credentials):
    from google.auth.transport.requests import AuthorizedSession

    session = AuthorizedSession(credentials, auth_request=outbound.google_auth_transport(outbound.new_session(4)))
    outbound.mount(session, pool_size=64)
    return session


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _budget(asked: float | None, most: float) -> float:
    return most if asked is None else max(0.5, min(most, asked))


def _timeout(budget: float) -> tuple[float, float]:
    """(connect, read) seconds for one try; the retry below ends the tries with the budget."""
    return (min(CONNECT_TIMEOUT_SECONDS, budget), budget)


def _retry(budget: float):
    from google.cloud.storage.retry import DEFAULT_RETRY

    # The client's own policy (what to retry, backoff), ended when the budget is spent: a try
    # never starts, and no backoff sleeps, past it.
    return DEFAULT_RETRY.with_timeout(budget).with_delay(initial=0.25, maximum=2.0)


def _gcs_failure(error: Exception) -> str:
    """What went wrong, in our words: the client's text carries hosts, URLs and JSON."""
    causes = {type(error).__name__}
    cause = getattr(error, "cause", None) or error.__cause__ or error.__context__
    if cause is not None:
        causes.add(type(cause).__name__)
    if causes & {"Forbidden", "Unauthorized", "RefreshError", "DefaultCredentialsError"}:
        return "the function's service account may not create objects in the IMAGE_BUCKET bucket"
    if "NotFound" in causes:
        return "the IMAGE_BUCKET bucket does not exist"
    if causes & {"RetryError", "Timeout", "ReadTimeout", "ConnectTimeout", "ConnectionError", "TransportError", "TimeoutError"}:
        return "Cloud Storage did not answer in time"
    return "Cloud Storage refused it"


def _log_failure(what: str, error: Exception, where: str) -> None:
    """The details for whoever runs the function: the log, never the answer."""
    text = str(error).strip().splitlines()
    get_logger().warning(
        "Storage %s failed: %s", what, type(error).__name__,
        extra={"fields": {"storage": {"where": where, "error": type(error).__name__, "detail": (text[0] if text else "")[:300]}}},
    )


def make_store(settings: Settings) -> ImageStore:
    if settings.image_bucket:
        return GcsImageStore(settings.image_bucket, settings.image_prefix)
    return LocalImageStore(settings.image_dir, settings.image_dir_max_files)
