"""Deployment-time context: prompt segments, KV re-cache, the clean rows of teacher forcing."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from trainer_support import tiny_model

from kvpo.generators.context import clean_context, prompt_switches, recache_chunks, visible_frames

CONFIGS = Path(__file__).parents[2] / "configs"

A, B_ = "a large red circle moving left slowly", "a large red circle moving up slowly"


def test_switches_and_recache_chunks():
    assert prompt_switches([A, A, B_, B_, A]) == [2, 4] and prompt_switches([A] * 3) == []
    full = tiny_model()  # all history visible
    assert recache_chunks(full, 3) == [0, 1, 2]
    local = tiny_model(local_window=3)  # sink 0 + the 3 frames before the chunk
    assert recache_chunks(local, 4) == [0, 2, 3]  # frames 0, 5, 6, 7


def longlive_rolling_cache(local_attn_size, sink_size, chunk, chunks):
    """The frames each chunk of LongLive's causal inference attends to, from its rolling KV cache
    with sinks (in frames): the cache holds ``local_attn_size`` frames; a chunk's frames are
    appended, evicting the oldest frames after the sinks when it overflows; attention reads the
    sink slots and the last ``local_attn_size - sink_size`` slots, the chunk's own among them."""
    cache, seen = [], []
    for j in range(chunks):
        cache += range(j * chunk, (j + 1) * chunk)
        if len(cache) > local_attn_size:
            cache = cache[:sink_size] + cache[len(cache) - (local_attn_size - sink_size) :]
        keys = cache[:sink_size] + cache[sink_size:][-(local_attn_size - sink_size) :]
        seen.append(sorted(keys))
    return seen


@pytest.mark.parametrize("config", ["wan_longlive.yaml"])
def test_the_longlive_recipe_attends_to_what_longlive_does(config):
    """LongLive's local_attn_size 12 with 3 sinks counts the sinks and the chunk being made: the
    recipe's local_window is the history between them, and every chunk of a clip long enough to
    evict sees the frames LongLive's rolling cache holds."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    c, nC = cfg["wan_chunk_frames"], cfg["wan_frames"] // cfg["wan_chunk_frames"]
    model = SimpleNamespace(
        chunk_frames=c, sink_frames=cfg["wan_sink_frames"], local_window=cfg["local_window"]
    )
    want = longlive_rolling_cache(12, 3, c, nC)
    for j in range(nC):
        got = visible_frames(model, j) + list(range(j * c, (j + 1) * c))
        assert got == want[j], j
    assert want[-1] == [0, 1, 2, *range(cfg["wan_frames"] - 9, cfg["wan_frames"])]  # evicted


def test_clean_rows_without_and_with_recache():
    model = tiny_model(local_window=3)
    G, nC, c = 2, 5, model.chunk_frames
    tokens = torch.randn(1, G, nC * c, model.frame_tokens, model.token_dim)
    tokens[:, 1, : 2 * c] = tokens[:, 0, : 2 * c]  # shared prefix of 2 chunks
    prompts = [[A, A, A, B_, B_]]
    plain = clean_context(model, tokens, prompts, shared=2, last=4)
    # prefix chunks once per group, then chunks 2, 3 of each branch
    assert plain.chunk.tolist() == [0, 1, 2, 2, 3, 3] and plain.segments == 1
    model.set_recache("chunkwise")
    cc = clean_context(model, tokens, prompts, shared=2, last=4)
    # the switch at chunk 3 re-encodes chunks 0 (the sink), 1 and 2 (frames 3-5) per branch
    assert cc.chunk.tolist() == [0, 1, 2, 2, 0, 0, 1, 1, 2, 2, 3, 3] and cc.segments == 2
    emb = model.encode_prompts([A, B_])
    for r in range(4, 12):  # under the new prompt: the re-caches and chunk 3
        torch.testing.assert_close(cc.cond[r], emb[1])
    for r in range(4):
        torch.testing.assert_close(cc.cond[r], emb[0])
    torch.testing.assert_close(cc.tokens[5], tokens[0, 1, 0:c].flatten(0, 1))  # branch 1's sink
    # branch 1 making chunk 2 reads segment 0; making chunk 4, segment 1 (re-cached pages)
    rows = cc.map_rows(torch.tensor([1, 1]), torch.tensor([2, 4]))
    assert rows.tolist() == [2, 3]
    seg0, seg1 = cc.page_map[2], cc.page_map[3]
    assert torch.equal(seg0[0:c], torch.arange(c))  # segment 0: the prefix row 0
    assert torch.equal(seg1[0:c], 5 * c + torch.arange(c))  # re-encoded by branch 1's row 5
    assert torch.equal(seg1[3 * c : 4 * c], 11 * c + torch.arange(c))  # chunk 3 of branch 1


def longlive_interactive(L, S, c, chunks, switches, global_sink):
    """LongLive's interactive inference at the granularity of frames, from its semantics: the
    cache holds at most L entries (frame, prompt segment) in slots; a chunk's frames are appended
    and the oldest entries after the first S slots evicted; a chunk attends to every slot. At a
    switch at frame a the last min(L, a) frames are re-encoded in one pass under the new segment:
    with global_sink the first S slots stay and the pass's entries after its first S follow them;
    without, the pass's entries are the cache. The pass attends to the cache it leaves.

    Returns each chunk's attended entries and, per switch chunk, (frames re-encoded, the pass's
    attended entries)."""
    slots, seen, passes, seg = [], [], {}, 0
    for j in range(chunks):
        a = j * c
        if j in switches:
            seg += 1
            entries = [(f, seg) for f in range(a - min(L, a), a)]
            slots = slots[:S] + entries[S:] if global_sink else entries
            passes[j] = ([f for f, _ in entries], sorted(slots))
        slots = slots + [(f, seg) for f in range(a, a + c)]
        if len(slots) > L:
            slots = slots[:S] + slots[len(slots) - (L - S) :]
        seen.append(sorted(slots))
    return seen, passes


@pytest.mark.parametrize("seed", range(12))
def test_longlive_recache_is_longlives_cache(seed):
    """For random sinks, windows, chunk sizes and switches, in both global_sink modes: the frames
    LongLive's pass re-encodes, what the pass attends to, and what every later chunk attends to
    (which frames, from which prompt segment's pass) are those of LongLive's cache, read from the
    clean rows that replay and pretraining rebuild the context with."""
    import random

    rng = random.Random(seed)
    c, S = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    lw, nC = rng.choice([1, 2, 4, 5]), rng.choice([6, 8])
    global_sink = rng.random() < 0.5
    model = tiny_model(
        num_frames=nC * c,
        chunk_frames=c,
        sink_frames=min(S, c * 2),
        local_window=lw,
        recache="longlive",
        global_sink=global_sink,
    )
    S = model.sink_frames
    switches = sorted(rng.sample(range(1, nC), 2))
    names = [A, B_, A.replace("left", "down")]
    prompts = [[names[sum(j >= a for a in switches)] for j in range(nC)]]
    seen, passes = longlive_interactive(S + lw + c, S, c, nC, switches, global_sink)
    tokens = torch.zeros(1, 1, nC * c, model.frame_tokens, model.token_dim)
    cc = clean_context(model, tokens, prompts, shared=0, last=nC - 1)
    emb = model.encode_prompts(names)

    def entries(pages):
        """(frame, segment) of clean pages: the frame its row holds, the prompt it was made under."""
        out = []
        for p in pages.tolist():
            if p >= 0:
                r, f = divmod(p, c)
                seg = next(k for k in range(3) if torch.equal(cc.cond[r], emb[k]))
                out.append((int(cc.chunk[r]) * c + f, seg))
        return sorted(out)

    for j in range(nC):
        hist = entries(cc.history(model, torch.tensor([0]), torch.tensor([j]))[0])
        assert (
            hist + [(f, sum(j >= a for a in switches)) for f in range(j * c, (j + 1) * c)]
            == seen[j]
        ), j
    for a, (frames, attended) in passes.items():
        rows = [
            r
            for r in range(len(cc.chunk))
            if torch.equal(cc.cond[r], emb[switches.index(a) + 1]) and int(cc.chunk[r]) < a
        ]
        made = sorted({int(cc.chunk[r]) * c + f for r in rows for f in range(c)})
        assert set(frames) <= set(made) and len(made) < len(frames) + c, (a, made, frames)
        for r in rows:
            assert entries(cc.table[r]) == attended, (a, r)
