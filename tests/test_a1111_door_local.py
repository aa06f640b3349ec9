"""The AUTOMATIC1111 door over the local model's tiny pipeline (tests/tiny_pipeline.py): real
seeds s, s+1 in `all_seeds` and in each image's infotext, and the same seed giving the same image."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import requests

from tests.servers import start_function
from tests.test_local_e2e import local_env, needs_diffusers, pixels

WAIT = 60


@needs_diffusers
def test_seeds_s_and_s_plus_1_reach_the_local_model_and_reproduce(tiny_model: str, tmp_path: Path) -> None:
    function = start_function(local_env(tmp_path, tiny_model), tmp_path / "function.log")
    try:
        body = {"prompt": "a red fox", "seed": 7, "batch_size": 2, "width": 256, "height": 256, "steps": 2, "cfg_scale": 5}
        answer = requests.post(f"{function.url}/sdapi/v1/txt2img", json=body, timeout=WAIT)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["all_seeds"] == [7, 8]
        assert "Seed: 7" in info["infotexts"][0] and "Seed: 8" in info["infotexts"][1]
        assert "Steps: 2" in info["infotexts"][0] and "CFG scale: 5" in info["infotexts"][0]
        assert info["sd_model_name"] == tiny_model and info["ignored"] == []
        first, second = (base64.b64decode(image) for image in answer.json()["images"])
        assert pixels(first) != pixels(second)
        # The second image alone, by its seed: the same pixels (served from the cache here).
        again = requests.post(f"{function.url}/sdapi/v1/txt2img", json={**body, "seed": 8, "batch_size": 1}, timeout=WAIT)
        assert again.status_code == 200, again.text
        assert pixels(base64.b64decode(again.json()["images"][0])) == pixels(second)
    finally:
        function.stop()
