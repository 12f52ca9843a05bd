"""kvpo.generators.data helpers that also serve user prompts."""

import pytest

from kvpo.generators import data


def test_segments_spread_a_multi_prompt_over_the_chunks():
    assert data.segments(["a cat"] * 3) == ["a cat"] * 3
    assert data.segments(["a | b"] * 4) == ["a", "a", "b", "b"]
    assert data.segments(["a | b | c"] * 7) == ["a", "a", "a", "b", "b", "c", "c"]
    assert data.segments(["a|b"] * 2) == ["a", "b"]
    # already one prompt per chunk (a switch the caller made): each keeps its own
    assert data.segments(["a", "a", "b"]) == ["a", "a", "b"]
    with pytest.raises(ValueError, match="3 segments for 2 chunks"):
        data.segments(["a | b | c"] * 2)
    with pytest.raises(ValueError, match="none empty"):
        data.segments(["a | | b"] * 3)
