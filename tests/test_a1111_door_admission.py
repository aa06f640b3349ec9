"""The AUTOMATIC1111 door's admissions: one per image, seeds s, s+1, ..., and the admitted
given back when a later image is refused (rate limit or budget)."""

from __future__ import annotations

import time

import pytest

from imagegen.catalog import Catalog, Offer
from imagegen.doors.a1111 import A1111Api, Txt2Img, parse_txt2img
from imagegen.doors.common import DoorParts
from imagegen.domain import GenerationRequest
from imagegen.errors import RateLimited
from imagegen.record import RequestRecord

CATALOG = Catalog((Offer("demo", "placeholder", ("placeholder",), (), "DEMO_ALLOWED_MODELS", None),))


class CountingService:
    """admit/release as GenerationService has them; refuses the `refuse_at`-th admission."""

    def __init__(self, refuse_at: int | None = None) -> None:
        self.refuse_at = refuse_at
        self.admitted: list[GenerationRequest] = []
        self.released: list[object] = []

    def admit(self, generation: GenerationRequest, caller: str, record: RequestRecord) -> object:
        if len(self.admitted) == self.refuse_at:
            raise RateLimited("slow down")
        self.admitted.append(generation)
        return ("admission", len(self.admitted))

    def release(self, admission: object) -> None:
        self.released.append(admission)


def door(service: CountingService) -> A1111Api:
    return A1111Api(DoorParts(service, None, CATALOG, None, max_prompt_chars=1000, trusted_proxy_hops=0))  # type: ignore[arg-type]


def record() -> RequestRecord:
    return RequestRecord("r", time.monotonic, time.monotonic())


def asked(body: bytes) -> Txt2Img:
    return parse_txt2img(body, CATALOG, 1000)


def test_each_image_is_admitted_with_seeds_s_s_plus_1_and_so_on() -> None:
    service = CountingService()
    door(service)._admit_all(asked(b'{"prompt": "a cat", "seed": 41, "batch_size": 2, "n_iter": 2}'), "key:x", record())
    assert [generation.seed for generation in service.admitted] == [41, 42, 43, 44]


def test_seed_minus_one_lets_the_server_choose_each_images_seed() -> None:
    service = CountingService()
    door(service)._admit_all(asked(b'{"prompt": "a cat", "seed": -1, "batch_size": 3}'), "key:x", record())
    assert [generation.seed for generation in service.admitted] == [None, None, None]


def test_a_refused_image_gives_the_admitted_ones_back() -> None:
    service = CountingService(refuse_at=2)
    with pytest.raises(RateLimited):
        door(service)._admit_all(asked(b'{"prompt": "a cat", "batch_size": 4}'), "key:x", record())
    assert service.released == [("admission", 1), ("admission", 2)]


def test_sides_round_down_to_a_multiple_of_8_as_automatic1111_does() -> None:
    generation = asked(b'{"prompt": "a cat", "width": 513, "height": 767}').generation
    assert (generation.width, generation.height) == (512, 760)
