"""The side-by-side table of `./scripts/bench --peer NAME`: medians across runs, ratios per run.

Pure functions, so that tests/test_bench_table.py can check the arithmetic without starting
anything. A run gives, for every figure, one value for this function and one for the peer,
measured in the same run (both services alternating, the same stand-ins); a ratio is only ever
taken inside one run, then summarised across runs, so that a slow spell of a shared machine
that falls on one run does not pair one run's figure with another's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# figure key -> (this function's value, the peer's value), for one run
Run = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "ms", "s", "MB", "calls": how a value is printed
    digits: int = 1


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct` percentile with linear interpolation between closest ranks (numpy's default):
    of [1, 2, 3, 4] the 50th is 2.5, the 100th is 4."""
    if not values:
        raise ValueError("no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} is outside 0-100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * pct / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; infinite when the peer's figure is 0 and ours is not (1 when both are)."""
    if theirs == 0:
        return 1.0 if ours == 0 else math.inf
    return ours / theirs


def summarize(runs: Sequence[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    """This function's values, the peer's values, and the per-run ratios of figure `key`, in
    run order (runs that lack the figure are skipped)."""
    ours = [run[key][0] for run in runs if key in run]
    theirs = [run[key][1] for run in runs if key in run]
    return ours, theirs, [ratio(o, t) for o, t in zip(ours, theirs, strict=True)]


def spread(values: Sequence[float], digits: int, unit: str) -> str:
    """The median, and the range when there is more than one run: `17.9 ms (16.9–18.8)`."""
    middle = f"{statistics.median(values):.{digits}f} {unit}".rstrip()
    if len(values) == 1 or min(values) == max(values):
        return middle
    return f"{middle} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def rows(runs: Sequence[Run], figures: Sequence[Figure]) -> list[tuple[str, str, str, str]]:
    """(figure, this function, peer, ratio) for each figure some run measured."""
    table = []
    for figure in figures:
        ours, theirs, ratios = summarize(runs, figure.key)
        if not ours:
            continue
        table.append((figure.label, spread(ours, figure.digits, figure.unit), spread(theirs, figure.digits, figure.unit), spread(ratios, 2, "")))
    return table


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * width for width in widths], *body]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |" for row in lines)
