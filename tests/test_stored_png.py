"""A cache hit checks the structure of the PNG this function stored (every chunk's CRC, IEND),
not its pixels again: storage that lost or changed bytes never answers, and a hit stays cheap."""

from __future__ import annotations

import pytest

from imagegen.images import NotAnImage, check_png, check_stored_png
from tests.standin import make_png


def test_a_sound_png_passes_both_checks():
    png = make_png(64, 64)
    check_stored_png(png)
    check_png(png)


@pytest.mark.parametrize("where", [20, 40, -20])
def test_a_changed_byte_anywhere_is_refused(where):
    png = bytearray(make_png(64, 64))
    png[where] ^= 0x01
    with pytest.raises(NotAnImage):
        check_stored_png(bytes(png))


@pytest.mark.parametrize("keep", [8, 33, 60, -13, -1])
def test_a_png_cut_short_is_refused(keep):
    with pytest.raises(NotAnImage):
        check_stored_png(make_png(64, 64)[:keep])


def test_not_a_png_is_refused():
    with pytest.raises(NotAnImage):
        check_stored_png(b"<html>not an image</html>")


def test_a_corrupted_stored_file_is_made_again_not_served(make_app, tmp_path, mocked):
    from tests.conftest import HF_URL

    mocked.post(HF_URL, body=make_png(64, 64), content_type="image/png")
    mocked.post(HF_URL, body=make_png(64, 64), content_type="image/png")
    app = make_app(IMAGE_DIR=str(tmp_path / "images"), RATE_LIMIT_PER_MINUTE="0")
    first = app.post("/", json={"prompt": "a fox", "seed": 5}).get_json()
    stored = tmp_path / "images" / first["filePath"].split("/images/", 1)[1]
    data = bytearray(stored.read_bytes())
    data[-30] ^= 0xFF  # inside the image data: only the CRC can tell
    stored.write_bytes(bytes(data))
    again = app.post("/", json={"prompt": "a fox", "seed": 5}).get_json()
    assert again["cached"] is False and len(mocked.calls) == 2
