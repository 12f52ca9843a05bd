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


def _scene(prompt: str) -> tuple[str, ...]:
    """A prompt's scene as the test reads it: every word but the direction."""
    return tuple(w for w in prompt.split() if w not in data.DIRECTIONS)


@pytest.mark.parametrize("num_eval", [1, 2, 5, 8, 16])
def test_held_out_scenes_are_never_trained_or_pretrained_on(num_eval):
    """No prompt a run or the shipped base's pretraining can make, direction switches and
    multi-prompt segments included, shows a held-out scene: the held-out reward measures scenes
    the generator never saw."""
    import torch

    train, held = data.split_prompts(num_eval=num_eval)
    pretrain_train, pretrain_held = data.split_prompts(num_eval=data.PRETRAINING_HELD_OUT)
    assert len(held) == num_eval and len(set(held)) == num_eval
    held_scenes = {_scene(p) for p in held}
    assert held_scenes <= {_scene(p) for p in pretrain_held}
    gen = torch.Generator().manual_seed(num_eval)
    for prompts in (train, pretrain_train):
        made = set()
        for _ in range(300):  # every switch draw of pretraining and training (p_switch 1)
            made.update(data.random_prompts(prompts, 6, 1.0, gen))
        made.update(s for p in prompts for s in data.segments([p] * 6))
        assert made >= set(prompts)
        assert not {_scene(p) for p in made} & held_scenes
    assert set(train) | set(held) <= {s.prompt for s in data.all_scenes()}


def test_split_prompts_refuses_a_split_with_nothing_to_train():
    with pytest.raises(ValueError, match="num_eval"):
        data.split_prompts(num_eval=0)
    with pytest.raises(ValueError, match="no scene to train on"):
        data.split_prompts(num_eval=len(data.all_scenes()))
