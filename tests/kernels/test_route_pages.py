"""route_pages: reproducible per-branch routing that keeps sinks and non-droppable pages."""

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
    ],
)
def test_errors(kwargs, exc, match):
    table, droppable = _setup()
    args = {"page_table": table, "num_branches": 2, "p_keep": 0.5, "droppable": droppable}
    sink = kwargs.pop("sink_pages", 0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kvpo_kernels.route_pages(**args, sink_pages=sink)
