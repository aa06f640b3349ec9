"""Local storage on a temp dir, and Cloud Storage against a real emulator on loopback."""

import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from imagegen.errors import StorageError
from imagegen.png_info import PngParts
from imagegen.storage import LOAD_BUDGET_SECONDS, GcsImageStore, ImageMetadata, LocalImageStore, image_name, make_store
from tests.fake_router import make_png
from tests.servers import free_port

METADATA = ImageMetadata(model="owner/model", prompt="a red fox", seed=7)


def test_image_name_is_timestamp_slug_and_suffix():
    now = datetime(2026, 11, 24, 21, 19, 0, 123456, tzinfo=timezone.utc)
    assert image_name("A Red Fox, in snow!", now, "abcd1234") == "20261124T211900123456Z-a-red-fox-in-snow-abcd1234"


@pytest.mark.parametrize(
    "prompt",
    ["../../etc/passwd", "/abs/path", "..\\..\\windows", "a\nb\x00c", "ⓐⓑ 東京 ", "", "-" * 200, "x" * 5000],
)
def test_no_prompt_can_steer_a_name(prompt):
    name = image_name(prompt)
    assert re.fullmatch(r"\d{8}T\d{12}Z-[a-z0-9-]{1,40}-[0-9a-f]{8}", name), name
    assert ".." not in name and "/" not in name


def test_names_are_unique():
    assert len({image_name("same prompt") for _ in range(200)}) == 200


def test_local_store_writes_the_bytes(tmp_path):
    png = make_png()
    path = LocalImageStore(tmp_path / "nested" / "dir", 10).save(PngParts.of(png), "n1", METADATA)
    assert path == str(tmp_path / "nested" / "dir" / "n1.png")
    assert os.path.isabs(path)
    with open(path, "rb") as stored:
        assert stored.read() == png


def test_local_store_keeps_only_the_newest_files(tmp_path):
    store = LocalImageStore(tmp_path, 3)
    for index in range(6):
        store.save(PngParts.of(make_png()), f"2026010{index}T000000Z-p-x", METADATA)
    (tmp_path / "notes.txt").write_text("not ours")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"2026010{i}T000000Z-p-x.png" for i in (3, 4, 5)]
    assert (tmp_path / "notes.txt").exists()


def test_local_store_lists_the_directory_once_per_twentieth_of_its_files(tmp_path, monkeypatch):
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr("imagegen.storage.os.scandir", lambda path: listings.append(path) or real_scandir(path))
    store = LocalImageStore(tmp_path, 40)
    names = [f"202601{index:02d}T000000Z-p-x" for index in range(1, 61)]
    for name in names:
        store.save(PngParts.of(make_png()), name, METADATA)
    assert len(listings) == 60 // 2
    kept = sorted(p.stem for p in tmp_path.glob("*.png"))
    assert kept == names[-40:]


def test_local_store_failure_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(StorageError) as caught:
        LocalImageStore(blocker, 3).save(PngParts.of(make_png()), "n", METADATA)
    assert "IMAGE_DIR" in str(caught.value)
    assert list(tmp_path.iterdir()) == [blocker]


def test_make_store_picks_the_bucket_when_set(make_settings):
    assert isinstance(make_store(make_settings()), LocalImageStore)
    assert isinstance(make_store(make_settings(IMAGE_BUCKET="b-images")), GcsImageStore)


# --- Cloud Storage, against gcp-storage-emulator ----------------------------------------------


@pytest.fixture
def gcs(storage_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    from google.cloud import storage

    client = storage.Client()
    bucket = client.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    return bucket


def test_gcs_store_uploads_with_type_and_metadata(gcs):
    png = make_png()
    long_prompt = "fox " * 500
    file_path = GcsImageStore(gcs.name, "images/").save(
        PngParts.of(png), "20261124T000000Z-fox-1234", ImageMetadata(model="owner/model", prompt=long_prompt, seed=None)
    )
    assert file_path == f"gs://{gcs.name}/images/20261124T000000Z-fox-1234.png"
    blob = gcs.get_blob("images/20261124T000000Z-fox-1234.png")
    assert blob.download_as_bytes() == png
    assert blob.content_type == "image/png"
    assert blob.metadata == {"model": "owner/model", "seed": "", "prompt": long_prompt[:500]}


def test_gcs_store_with_empty_prefix(gcs):
    assert GcsImageStore(gcs.name, "").save(PngParts.of(make_png()), "n", METADATA) == f"gs://{gcs.name}/n.png"
    assert gcs.get_blob("n.png").metadata["seed"] == "7"


def test_gcs_missing_bucket_is_a_storage_error(storage_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    with pytest.raises(StorageError) as caught:
        GcsImageStore("no-such-bucket-here", "images/").save(PngParts.of(make_png()), "n", METADATA)
    assert str(caught.value) == "the IMAGE_BUCKET bucket does not exist"


# --- 4. Cloud Storage unreachable: storage calls fit a time budget ---------------------------

@pytest.fixture
def silent_storage(monkeypatch):
    """A port that accepts connections and never answers: Cloud Storage as seen through a
    black-holed network. The client is pointed at it as at the emulator."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    stop.set()
    thread.join(timeout=5)
    listener.close()
    for sock in held:
        sock.close()


@pytest.fixture
def refused_storage(monkeypatch):
    """A port nothing listens on: Cloud Storage down, or the emulator stopped."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    return url


def timed(call):
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - the caller looks at what was raised
        return error, time.monotonic() - started


@pytest.mark.parametrize("unreachable", ["silent_storage", "refused_storage"])
def test_a_cache_lookup_gives_up_within_its_budget(request, unreachable):
    url = request.getfixturevalue(unreachable)
    found, took = timed(lambda: GcsImageStore("images-bucket", "images/").load("seeded/x-1234"))
    assert found is None
    assert took < LOAD_BUDGET_SECONDS + 2, took  # was 72 s and more with the client's default retry
    found, took = timed(lambda: GcsImageStore("images-bucket", "images/").load("seeded/x-1234", budget_seconds=1))
    assert found is None and took < 3, took
    assert url  # the fixture pointed the client there


@pytest.mark.parametrize("unreachable", ["silent_storage", "refused_storage"])
def test_a_save_gives_up_within_the_budget_it_is_given_and_says_so_plainly(request, unreachable, capsys):
    url = request.getfixturevalue(unreachable)
    error, took = timed(
        lambda: GcsImageStore("images-bucket", "images/").save(PngParts.of(make_png()), "n", METADATA, budget_seconds=2)
    )
    assert isinstance(error, StorageError) and took < 4, (error, took)
    assert str(error) == "Cloud Storage did not answer in time"
    # The details are for the operator: in the log, not in the caller's warning.
    log = capsys.readouterr().out
    assert "images-bucket/images/n.png" in log and "Storage upload failed" in log
    port = url.rsplit(":", 1)[1]
    assert port not in str(error) and "127.0.0.1" not in str(error)


def test_a_local_write_failure_does_not_show_the_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(StorageError) as caught:
        LocalImageStore(blocker, 3).save(PngParts.of(make_png()), "n", METADATA)
    assert str(tmp_path) not in str(caught.value) and "IMAGE_DIR" in str(caught.value)
