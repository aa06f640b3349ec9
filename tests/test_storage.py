"""Local storage on a temp dir, and Cloud Storage against a real emulator on loopback."""

import os
import re
import uuid
from datetime import datetime, timezone

import pytest

from imagegen.errors import StorageError
from imagegen.png_info import PngParts
from imagegen.storage import GcsImageStore, ImageMetadata, LocalImageStore, image_name, make_store
from tests.fake_router import make_png

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
