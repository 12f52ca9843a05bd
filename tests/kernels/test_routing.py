"""KV routing: route_pages (drop) and sample_pages (refill a local window from older history)."""

import pytest
import torch

import kvpo_kernels


def _setup(B=2, N=10):
    table = torch.stack([torch.arange(N, dtype=torch.int32) + 100 * b for b in range(B)])
    droppable = torch.zeros(N, dtype=torch.bool)
    droppable[1:8] = True  # the window's history; the last pages (current chunk) stay
    return table, droppable


def test_shape_order_and_what_is_kept():
    table, droppable = _setup()
    gen = torch.Generator().manual_seed(0)
    routed = kvpo_kernels.route_pages(table, 4, 0.5, droppable, sink_pages=2, generator=gen)
    assert routed.shape == (8, 10) and routed.dtype == torch.int32
    for b in range(2):
        for g in range(4):
            row = routed[b * 4 + g]
            kept = row >= 0
            assert torch.equal(row[kept], table[b][kept])  # kept slots keep their page
            assert kept[:2].all() and kept[8:].all()  # sinks and non-droppable slots
    assert (routed[:, 2:8] == -1).any()  # something was routed out


def test_reproducible_with_generator_and_branches_differ():
    table, droppable = _setup(B=1, N=30)
    droppable[:] = True
    a = kvpo_kernels.route_pages(
        table, 8, 0.5, droppable, generator=torch.Generator().manual_seed(7)
    )
    b = kvpo_kernels.route_pages(
        table, 8, 0.5, droppable, generator=torch.Generator().manual_seed(7)
    )
    c = kvpo_kernels.route_pages(
        table, 8, 0.5, droppable, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) > 1


def test_keep_rate_matches_p_keep():
    table, droppable = _setup(B=4, N=50)
    droppable[:] = True
    p_keep, G = 0.3, 64
    routed = kvpo_kernels.route_pages(
        table, G, p_keep, droppable, generator=torch.Generator().manual_seed(1)
    )
    n = routed.numel()
    rate = (routed >= 0).float().mean().item()
    sigma = (p_keep * (1 - p_keep) / n) ** 0.5
    assert abs(rate - p_keep) < 5 * sigma


def test_extremes_keep_all_or_drop_all_droppable():
    table, droppable = _setup()
    assert torch.equal(
        kvpo_kernels.route_pages(table, 3, 1.0, droppable), table.repeat_interleave(3, 0)
    )
    none = kvpo_kernels.route_pages(table, 3, 0.0, droppable)
    assert (none[:, 1:8] == -1).all() and (none[:, [0, 8, 9]] >= 0).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_branches": 0}, ValueError, "num_branches"),
        ({"p_keep": 1.5}, ValueError, "p_keep"),
        ({"droppable": torch.zeros(3, dtype=torch.bool)}, ValueError, "droppable must be"),
        ({"page_table": torch.zeros(2, 10)}, TypeError, "page_table must be int32"),
        ({"sink_pages": 11}, ValueError, "sink_pages"),
        ({"sink_pages": 1.5}, ValueError, "sink_pages must be an int in"),
        ({"generator": 3}, TypeError, "generator must be a CPU torch.Generator or None, got int"),
    ],
)
def test_errors(kwargs, exc, match):
    table, droppable = _setup()
    args = {"page_table": table, "num_branches": 2, "p_keep": 0.5, "droppable": droppable}
    sink = kwargs.pop("sink_pages", 0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kvpo_kernels.route_pages(**args, sink_pages=sink)


# ---- sample_pages ----------------------------------------------------------------------------


def _history(B=2, N=12):
    return torch.stack([torch.arange(N, dtype=torch.int32) + 100 * (b + 1) for b in range(B)])


def test_sample_keeps_sinks_and_recent_and_draws_distinct_older_pages_in_order():
    hist = _history()
    gen = torch.Generator().manual_seed(0)
    out = kvpo_kernels.sample_pages(hist, 5, 4, sink_pages=2, recent_pages=3, generator=gen)
    assert out.shape == (10, 2 + 4 + 3) and out.dtype == torch.int32
    for b in range(2):
        older = set(hist[b, 2:9].tolist())
        for g in range(5):
            row = out[b * 5 + g]
            assert torch.equal(row[:2], hist[b, :2]) and torch.equal(row[-3:], hist[b, -3:])
            drawn = row[2:6].tolist()
            assert set(drawn) <= older and len(set(drawn)) == 4  # from the older pages, no repeat
            assert drawn == sorted(drawn)  # chronological
    assert len({tuple(r.tolist()) for r in out}) > 1  # branches remember different moments


def test_sample_is_uniform_over_older_pages():
    hist = _history(B=1, N=20)
    G, slots = 4000, 5
    out = kvpo_kernels.sample_pages(
        hist, G, slots, sink_pages=1, recent_pages=4, generator=torch.Generator().manual_seed(3)
    )
    drawn = out[:, 1 : 1 + slots]
    counts = torch.bincount(drawn.flatten().long() - 100, minlength=20)[1:16].double()
    p = slots / 15  # each of the 15 older pages is in a branch's draw with probability 5/15
    sigma = (G * p * (1 - p)) ** 0.5
    assert ((counts - G * p).abs() < 5 * sigma).all(), counts


def test_sample_skips_unavailable_pages_and_pads_when_short():
    hist = _history(B=1, N=8)
    hist[0, 2] = -1
    out = kvpo_kernels.sample_pages(
        hist, 50, 3, sink_pages=1, recent_pages=2, generator=torch.Generator().manual_seed(1)
    )
    assert not (out[:, 1:4] == 102).any()
    assert (out[:, 1:4] >= 0).all()  # 4 drawable pages (101, 103, 104, 105) fill 3 slots
    short = kvpo_kernels.sample_pages(hist, 2, 7, sink_pages=1, recent_pages=2)
    drawn = short[:, 1:8]
    assert sorted(v for v in drawn[0].tolist() if v >= 0) == [101, 103, 104, 105]
    assert int((drawn == -1).sum(1)[0]) == 3


def test_sample_reproducible_with_generator():
    hist = _history(B=3, N=16)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return kvpo_kernels.sample_pages(hist, 4, 5, sink_pages=1, recent_pages=2, generator=gen)

    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_branches": 0}, ValueError, "num_branches"),
        ({"slots": -1}, ValueError, "slots"),
        ({"history": torch.zeros(2, 10)}, TypeError, "history must be int32"),
        ({"history": torch.zeros(2, 3, 4, dtype=torch.int32)}, ValueError, "history must be"),
        ({"sink_pages": 6, "recent_pages": 5}, ValueError, "exceed the N=10"),
        ({"generator": 0}, TypeError, "generator must be a CPU torch.Generator"),
    ],
)
def test_sample_errors(kwargs, exc, match):
    args = {"history": _history(N=10), "num_branches": 2, "slots": 3}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kvpo_kernels.sample_pages(**args)
