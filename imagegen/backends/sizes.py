"""Mapping a requested width and height onto what a backend can make.

Vendors take either a free size within rules, a short list of sizes, or an aspect ratio.
Each function picks the nearest by shape first (log of the ratio) and area second, so a
request for 1024x576 gets 16:9 rather than the closest area. The answer reports the size of
the image actually made, read from the PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def requested_shape(width: int | None, height: int | None) -> tuple[int, int] | None:
    """(width, height) as asked; one side alone means a square; neither means the default."""
    if width is None and height is None:
        return None
    return (width or height or 0, height or width or 0)


def _ratio_distance(width: int, height: int, other_width: float, other_height: float) -> float:
    return abs(math.log(width / height) - math.log(other_width / other_height))


def nearest_aspect_ratio(width: int, height: int, ratios: tuple[str, ...]) -> str:
    """The ratio ("16:9") closest in shape to width:height."""

    def distance(ratio: str) -> float:
        w, h = (int(part) for part in ratio.split(":"))
        return _ratio_distance(width, height, w, h)

    return min(ratios, key=distance)


def nearest_size(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The listed size closest in shape, then in area."""
    return min(
        sizes,
        key=lambda size: (round(_ratio_distance(width, height, *size), 6), abs(size[0] * size[1] - width * height)),
    )


def free_size(
    width: int, height: int, step: int, max_long: int, max_short: int, max_ratio: float, min_pixels: int = 0
) -> tuple[int, int]:
    """The nearest size whose sides are multiples of `step`, within the long/short side
    limits and with long/short at most `max_ratio`."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side > max_ratio:
        short_side = math.ceil(long_side / max_ratio)
    scale = min(1.0, max_long / long_side, max_short / short_side)
    long_side, short_side = long_side * scale, short_side * scale
    if min_pixels and long_side * short_side < min_pixels:
        grow = math.sqrt(min_pixels / (long_side * short_side))
        long_side, short_side = long_side * grow, short_side * grow

    def snap(value: float, limit: int, rounding: Callable[[float], int] = round) -> int:
        return max(step, min(limit // step * step, rounding(value / step) * step))

    exact_long, exact_short = long_side, short_side
    long_side, short_side = snap(exact_long, max_long), snap(exact_short, max_short)
    if long_side * short_side < min_pixels:
        # Rounding to the nearest step fell below the minimum: round both sides up instead.
        long_side, short_side = snap(exact_long, max_long, math.ceil), snap(exact_short, max_short, math.ceil)
    while long_side / short_side > max_ratio or (long_side * short_side < min_pixels and short_side + step <= max_short):
        short_side += step
    return (long_side, short_side) if width >= height else (short_side, long_side)
