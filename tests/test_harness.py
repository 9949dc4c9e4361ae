"""The harness itself: a hung rank is killed at the deadline and named; a failure shows its traceback."""

from __future__ import annotations

import os
import time

import pytest

import harness


def hang_on_rank_1() -> int:
    if os.environ["RANK"] == "1":
        time.sleep(600)
    return 0


def raise_on_rank_0() -> None:
    if os.environ["RANK"] == "0":
        raise RuntimeError("rank 0 broke")
    time.sleep(600)


def test_a_hung_rank_is_named_with_its_stack_and_killed() -> None:
    begin = time.monotonic()
    with pytest.raises(harness.RankHung) as info:
        harness.run(hang_on_rank_1, world=2, deadline=8)
    assert time.monotonic() - begin < 20
    message = str(info.value)
    assert "rank(s) [1]" in message and "hang_on_rank_1" in message  # the stack shows where


def test_a_failing_rank_fails_fast_with_its_traceback() -> None:
    begin = time.monotonic()
    with pytest.raises(harness.RankFailed, match="rank 0 of 2 failed(.|\n)*RuntimeError: rank 0 broke"):
        harness.run(raise_on_rank_0, world=2, deadline=60)
    assert time.monotonic() - begin < 20
