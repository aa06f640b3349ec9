"""The side-by-side bench's arithmetic (bench/peer_table.py) and its refusal of an unknown peer."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from bench.peer_table import Figure, markdown, percentile, ratio, rows, spread, summarize
from tests.servers import REPO_ROOT


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([4, 1, 3, 2], 0) == 1
    # 20 values 1..20: the 95th lies at rank 18.05 (0-based), between 19 and 20.
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert percentile([7.0], 95) == 7.0


def test_percentile_refuses_nothing_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 95)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ratio_is_ours_over_theirs():
    assert ratio(17.0, 20.0) == pytest.approx(0.85)
    assert ratio(0.0, 0.0) == 1.0
    assert ratio(1.0, 0.0) == math.inf


def test_ratios_are_taken_inside_each_run_then_summarised():
    runs = [{"added": (10.0, 20.0)}, {"added": (30.0, 20.0)}, {"added": (18.0, 40.0)}]
    ours, theirs, ratios = summarize(runs, "added")
    assert ours == [10.0, 30.0, 18.0]
    assert theirs == [20.0, 20.0, 40.0]
    assert ratios == pytest.approx([0.5, 1.5, 0.45])
    # The median ratio is the median of per-run ratios (0.5), not median(ours)/median(theirs) (0.9).
    (row,) = rows(runs, [Figure("added", "added latency", "ms")])
    assert row == ("added latency", "18.0 ms (10.0–30.0)", "20.0 ms (20.0–40.0)", "0.50 (0.45–1.50)")


def test_one_run_prints_no_range_and_unmeasured_figures_are_left_out():
    runs = [{"cold": (0.3, 6.5)}]
    table = rows(runs, [Figure("cold", "cold start", "s", 2), Figure("burst_rss", "peak RSS", "MB", 0)])
    assert table == [("cold start", "0.30 s", "6.50 s", "0.05")]
    assert spread([2.0, 2.0], 1, "") == "2.0"


def test_markdown_pads_columns():
    text = markdown(("a", "bb"), [("ccc", "d")])
    assert text.splitlines() == ["| a   | bb |", "| --- | -- |", "| ccc | d  |"]


@pytest.mark.parametrize("peer", ["nope", "LiteLLM"])
def test_bench_refuses_an_unknown_peer(peer):
    """Before installing or starting anything: exit 2 and a message naming the peers it knows."""
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--peer", peer], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert f"unknown peer '{peer}'" in result.stderr
    assert "litellm" in result.stderr
    assert result.stdout == ""


def test_misbehaving_calls_are_an_exact_evenly_spread_share():
    from bench.peer import every

    assert [n for n in range(1, 21) if every(0.3, n)] == [4, 7, 10, 14, 17, 20]
    assert [n for n in range(1, 21) if every(0.1, n)] == [10, 20]
    assert all(every(1.0, n) for n in range(1, 50))
    assert sum(every(0.3, n) for n in range(1, 1001)) == 300
