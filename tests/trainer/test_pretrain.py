"""Pretraining: teacher forcing sees what streaming sampling caches (KV re-cache included)."""

from pathlib import Path

import pytest
import torch
from trainer_support import tiny_model

from kvpo.generators.context import chunk_conditioning, context_table, recache_chunks
from kvpo.pretrain import flow_matching_loss, main, teacher_forced_velocity
from kvpo.run.checkpoint import load_model

LEFT = "a large red circle moving left slowly"
UP = "a large red circle moving up slowly"


def _streaming_velocity(model, clean, prompts, j, xt, t):
    """Chunk j's velocity at (xt, t) made the streaming way: clean passes write the cache chunk by
    chunk, a prompt switch re-encodes what the next chunk sees (``chunkwise``), then the noisy
    forward."""
    if model.recache == "longlive":
        return _longlive_velocity(model, clean, prompts, j, xt, t)
    c = model.chunk_frames
    cond = chunk_conditioning(model, [prompts])[0]
    cache = model.new_cache(64)
    page_map = torch.full((1, clean.shape[0]), -1, dtype=torch.long)

    def write(i, cond_i):
        pages = cache.allocate(c)
        table = context_table(model, page_map, torch.tensor([0]), torch.tensor([i]), pages[None])
        frames = (i * c + torch.arange(c))[None]
        x = clean[i * c : (i + 1) * c].flatten(0, 1)[None]
        model(x, torch.zeros(1), cond_i[None], frames, table, cache, pages[None])
        page_map[0, i * c : (i + 1) * c] = pages

    for i in range(j + 1):
        if model.recache == "chunkwise" and i > 0 and prompts[i] != prompts[i - 1]:
            for r in recache_chunks(model, i):
                write(r, cond[i])
        if i < j:
            write(i, cond[i])
    own = cache.allocate(c)
    table = context_table(model, page_map, torch.tensor([0]), torch.tensor([j]), own[None])
    frames = (j * c + torch.arange(c))[None]
    return model(xt[None], t[None], cond[j][None], frames, table, cache, own[None])[0]


def _longlive_velocity(model, clean, prompts, j, xt, t):
    """Chunk j's velocity at (xt, t) under LongLive's interactive inference, from its semantics:
    a rolling cache of L = sinks + local window + chunk frames whose slots list pages; a chunk's
    pages are appended, the oldest after the sinks evicted, and its attention reads every slot.
    At a prompt switch at frame a the last min(L, a) frames are re-encoded in ONE pass under the
    new prompt at t = 0, attending to the cache the pass leaves: with global_sink, the old sink
    slots and the pass's frames after its first S; without, the pass's frames alone, which
    become the cache (its first S frames the sinks)."""
    c, S = model.chunk_frames, model.sink_frames
    L = S + model.local_window + c
    cond = chunk_conditioning(model, [prompts])[0]
    cache = model.new_cache(256)
    slots = []

    def forward(x, frames, cond_i, t_i, keys_of):
        """Rows of c frames of x [n*c, T, d] at ``frames``; attention to keys_of(new pages)."""
        n = len(frames) // c
        pages = cache.allocate(n * c)
        keys = keys_of(pages.tolist())
        table = torch.tensor([keys] * n, dtype=torch.int32)
        fi = torch.tensor(frames).view(n, c)
        out = model(
            x.reshape(n, -1, x.shape[-1]),
            t_i.expand(n),
            cond_i.expand(n, -1),
            fi,
            table,
            cache,
            pages.view(n, c),
        )
        return pages.tolist(), out

    def rolled(new):
        s = slots + new
        return s[:S] + s[len(s) - (L - S) :] if len(s) > L else s

    for i in range(j + 1):
        a = i * c
        if i > 0 and prompts[i] != prompts[i - 1]:
            frames = list(range(a - min(L, a), a))
            if model.global_sink:
                keep = slots[:S]
                new, _ = forward(
                    clean[frames],
                    frames,
                    cond[i],
                    torch.zeros(()),
                    lambda p, keep=keep: keep + p[S:],
                )
                slots = keep + new[S:]
            else:
                new, _ = forward(clean[frames], frames, cond[i], torch.zeros(()), lambda p: p)
                slots = new
        own = list(range(a, a + c))
        if i < j:
            new, _ = forward(clean[own], own, cond[i], torch.zeros(()), rolled)
            slots = rolled(new)
    own = list(range(j * c, (j + 1) * c))
    _, out = forward(xt.view(c, -1, xt.shape[-1]), own, cond[j], t, rolled)
    return out[0]


@pytest.mark.parametrize(
    ("recache", "global_sink"),
    [("none", True), ("chunkwise", True), ("longlive", True), ("longlive", False)],
)
def test_teacher_forcing_equals_streaming(recache, global_sink):
    model = tiny_model(local_window=3, global_sink=global_sink)
    model.set_recache(recache)
    gen = torch.Generator().manual_seed(0)
    nC, c = 5, model.chunk_frames
    clean = torch.randn(2, nC * c, model.frame_tokens, model.token_dim, generator=gen)
    prompts = [[LEFT, LEFT, UP, UP, UP], [LEFT, UP, UP, UP, LEFT]]
    xt = torch.randn(2 * nC, c * model.frame_tokens, model.token_dim, generator=gen)
    t = torch.rand(2 * nC, generator=gen)
    with torch.no_grad():
        v = teacher_forced_velocity(model, clean, prompts, xt, t)
        for n in range(2):
            for j in range(nC):
                r = n * nC + j
                want = _streaming_velocity(model, clean[n], prompts[n], j, xt[r], t[r])
                torch.testing.assert_close(v[r], want, rtol=1e-4, atol=1e-5)


def test_recache_changes_the_loss_only_of_switching_videos():
    model = tiny_model(local_window=3)
    clean = torch.randn(2, 10, model.frame_tokens, model.token_dim)
    for prompts, differs in (
        ([[LEFT] * 5, [UP] * 5], False),
        ([[LEFT, LEFT, UP, UP, UP]] * 2, True),
    ):
        losses = []
        for on in (False, True):
            model.set_recache(on)
            with torch.no_grad():
                loss = flow_matching_loss(model, clean, prompts, torch.Generator().manual_seed(1))
            losses.append(float(loss))
        assert (abs(losses[0] - losses[1]) > 1e-6) == differs


def test_cli_pretrains_a_local_window_recache_generator(tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["--steps", "2", "--batch", "2", "--dim", "32", "--depth", "1", "--out", str(out)]
    main([*args, "--local_window", "4", "--recache"])
    m = load_model(out)
    assert m.local_window == 4 and m.recache == "longlive" and m.cfg.depth == 1
    with pytest.raises(SystemExit):
        main(["--local_window", "0", "--out", str(out)])


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--dim", "7"], "dim=7 must divide by heads=4"),
        (["--depth", "0"], "depth must be positive"),
        (["--lr", "nan"], "--lr nan must be a finite number"),
        (["--threads", "-1"], "--threads -1"),
        (["--init", "missing.safetensors"], "'missing.safetensors' does not exist"),
    ],
)
def test_cli_refuses_what_it_cannot_pretrain(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as e:
        main([*args, "--steps", "1", "--out", str(tmp_path / "m.safetensors")])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_continues_a_checkpoint_in_its_architecture_under_a_context_asked(tmp_path, capsys):
    """--init keeps the checkpoint's architecture (a --dim that differs is refused, not ignored)
    and its local window and re-cache, unless asked for others (a model adapted to a window)."""
    base, first, second = (tmp_path / f"{n}.safetensors" for n in ("base", "first", "second"))
    small = ["--steps", "1", "--batch", "2", "--dim", "32", "--depth", "1"]
    main([*small, "--local_window", "3", "--out", str(base)])
    main(["--steps", "1", "--batch", "2", "--init", str(base), "--out", str(first)])
    m = load_model(first)
    assert (m.cfg.dim, m.cfg.depth, m.local_window, m.recache) == (32, 1, 3, "none")
    main(
        [
            "--steps",
            "1",
            "--batch",
            "2",
            "--init",
            str(first),
            "--depth",
            "1",
            "--local_window",
            "5",
            "--recache",
            "--out",
            str(second),
        ]
    )
    m = load_model(second)
    assert (m.cfg.dim, m.cfg.depth, m.local_window, m.recache) == (32, 1, 5, "longlive")
    with pytest.raises(SystemExit):
        main(["--steps", "1", "--init", str(base), "--dim", "64", "--out", str(second)])
    err = capsys.readouterr().err
    assert "--dim 64: --init" in err and "is a model of dim 32" in err


def test_cli_writes_under_runs_not_over_the_shipped_base(tmp_path, monkeypatch):
    from kvpo.run.config import BASE_CHECKPOINT

    shipped = Path(BASE_CHECKPOINT).read_bytes()
    monkeypatch.chdir(tmp_path)
    main(["--steps", "1", "--batch", "1", "--dim", "32", "--depth", "1"])
    assert load_model(tmp_path / "runs" / "pretrain" / "model.safetensors").cfg.dim == 32
    assert Path(BASE_CHECKPOINT).read_bytes() == shipped
