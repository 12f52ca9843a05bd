"""python -m kvpo.sample: deployment samples of a checkpoint, scored, written as a grid."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.method.rollout import generate, rollout
from kvpo.rewards import BUILTIN, CompositeReward
from kvpo.run.checkpoint import save_model
from kvpo.sample import chunk_prompts, main

LEFT = "a large red circle moving left slowly"


def test_chunk_prompts_switch_at_the_middle():
    assert chunk_prompts(LEFT, 5) == [LEFT] * 5
    up = LEFT.replace("left", "up")
    assert chunk_prompts(f"{LEFT} -> moving up", 5) == [LEFT, LEFT, up, up, up]
    with pytest.raises(ValueError, match="direction"):
        chunk_prompts(f"{LEFT} -> moving sideways", 5)


def test_sample_scores_and_writes(tmp_path, capsys):
    model = tiny_model()
    ckpt = tmp_path / "m.safetensors"
    save_model(model, ckpt)
    out = tmp_path / "s" / "grid"
    asked = ["--prompt", LEFT, "--prompt", f"{LEFT} -> moving up"]
    rows = main(["--checkpoint", str(ckpt), *asked, "--seed", "3", "--out", str(out)])
    assert [r["prompt"] for r in rows] == [LEFT, f"{LEFT} -> moving up"]
    assert (tmp_path / "s" / "grid.gif").stat().st_size > 0
    # the scores are the built-in rewards of the deployment samples of the same seed
    per_chunk = [chunk_prompts(r["prompt"], 5) for r in rows]
    videos = generate(model, per_chunk, torch.Generator().manual_seed(3))
    want = CompositeReward(dict.fromkeys(BUILTIN, 1.0)).components((videos + 1) / 2, per_chunk)
    for i, r in enumerate(rows):
        for k, v in want.items():
            assert abs(r[k] - float(v[i])) < 1e-4
    assert '"prompt"' in capsys.readouterr().out


def test_sample_prints_your_rewards_too(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "m.safetensors"
    save_model(model, ckpt)
    mine = tmp_path / "mine.py"
    mine.write_text(
        "def bright(videos, prompts):\n    return videos.mean(dim=(1, 2, 3, 4))\n"
        "def flat(videos, prompts):\n    return videos.mean()\n"
    )
    base = ["--checkpoint", str(ckpt), "--prompt", LEFT, "--out", str(tmp_path / "g")]
    (row,) = main([*base, "--reward_fns", f"bright={mine}:bright"])
    video = generate(model, [chunk_prompts(LEFT, 5)], torch.Generator().manual_seed(0))
    assert set(BUILTIN) < set(row) and abs(row["bright"] - float((video + 1).mean() / 2)) < 1e-4
    for bad, match in (
        ("bright", "expected name=module:fn"),
        (f"alignment={mine}:bright", "built-in"),
        (f"bright={mine}:dim", "has no attribute 'dim'"),
    ):
        with pytest.raises(SystemExit, match=f"error: --reward_fns: .*{match}"):
            main([*base, "--reward_fns", bad])
    two = [*base, "--prompt", LEFT, "--reward_fns", f"flat={mine}:flat"]
    with pytest.raises(
        SystemExit, match=r"error: reward 'flat' returned 1 value\(s\) for 2 videos"
    ):
        main(two)


def test_prompts_file_and_batches_make_the_same_videos(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "m.safetensors"
    save_model(model, ckpt)
    up = LEFT.replace("left", "up")
    (tmp_path / "p.txt").write_text(f"{up}\n\n{LEFT} -> moving down\n")
    base = ["--checkpoint", str(ckpt), "--prompt", LEFT, "--prompts_file", str(tmp_path / "p.txt")]
    whole = main([*base, "--out", str(tmp_path / "a")])
    assert [r["prompt"] for r in whole] == [LEFT, up, f"{LEFT} -> moving down"]
    assert main([*base, "--batch", "2", "--out", str(tmp_path / "b")]) == whole
    assert main([*base, "--reward_batch", "1", "--out", str(tmp_path / "c")]) == whole
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes(
        "a small red circle moving left slowly \xe9\n".encode("latin-1")
    )
    for name, match in (
        ("none.txt", "No such file"),
        ("blank.txt", "no prompts in it"),
        ("latin1.txt", "not UTF-8 text"),
    ):
        with pytest.raises(SystemExit, match=f"--prompts_file=.*{name}.*: {match}"):
            main(["--checkpoint", str(ckpt), "--prompts_file", str(tmp_path / name)])
    for opt in ("--batch", "--reward_batch"):
        with pytest.raises(SystemExit, match=f"{opt} -1: must be >= 0"):
            main([*base, opt, "-1"])


def test_sample_errors(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_model(tiny_model(), ckpt)
    with pytest.raises(SystemExit, match="no EMA"):
        main(["--checkpoint", str(ckpt), "--ema"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "none.safetensors")])
    with pytest.raises(SystemExit, match="--window and --p_keep set the exploration of --branches"):
        main(["--checkpoint", str(ckpt), "--p_keep", "0.5"])
    (tmp_path / "file").write_text("")  # --out in a folder that cannot be made: before sampling
    with pytest.raises(SystemExit, match=r"--out .*file/grid: cannot write in .*file'"):
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "file" / "grid")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_cuda_where_there_is_none_is_an_error_of_each_command(tmp_path, capsys):
    from kvpo.pretrain import main as pretrain_main

    ckpt = tmp_path / "m.safetensors"
    save_model(tiny_model(), ckpt)
    with pytest.raises(SystemExit, match="error: --device cuda: no CUDA device is available"):
        main(["--checkpoint", str(ckpt), "--device", "cuda"])
    with pytest.raises(SystemExit):
        pretrain_main(["--device", "cuda", "--steps", "1", "--out", str(tmp_path / "p")])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    from kvpo.trainer import main as train_main

    with pytest.raises(SystemExit, match="error: config device='cuda': no CUDA device"):
        train_main(["--device", "cuda", "--out_dir", str(tmp_path / "run")])


def test_sample_prompts_that_the_scene_rewards_cannot_read(tmp_path, capsys):
    """The generator samples any words; the rewards that read the asked scene from the prompt
    (alignment, path) are left out, with a note saying why, and the others printed."""
    model = tiny_model()
    ckpt = tmp_path / "m.safetensors"
    save_model(model, ckpt)
    (row,) = main(
        ["--checkpoint", str(ckpt), "--prompt", "a red thing", "--out", str(tmp_path / "g")]
    )
    assert "alignment, path left out: prompt 'a red thing' must name exactly one" in (
        capsys.readouterr().err
    )
    video = generate(model, [chunk_prompts("a red thing", 5)], torch.Generator().manual_seed(0))
    kept = {k: v for k, v in BUILTIN.items() if k not in ("alignment", "path")}
    want = CompositeReward(dict.fromkeys(kept, 1.0)).components((video + 1) / 2, [["a red thing"]])
    assert set(row) == {"prompt", *kept}
    assert row == pytest.approx(
        {"prompt": "a red thing", **{k: float(v) for k, v in want.items()}}, abs=1e-4
    )


def _tve_float64(model, ro) -> torch.Tensor:
    """The TVE of a one-group rollout's branches, [G] float64, uniform over the scored steps."""
    from kvpo.method.replay import replay_velocities, step_weights

    with torch.no_grad():
        u = replay_velocities(model, ro).double()
    dist = (u - ro.velocities.double()).pow(2).mean(dim=(3, 4))[0]  # [G, K]
    return (dist * step_weights(ro).double()).sum(1)


def test_branches_read_the_runs_likelihood_and_tau_auto(tmp_path, capsys, monkeypatch):
    """A run with per-step likelihood and tau_auto: a branch's gibbs_p is its Gibbs probability
    per scored step averaged over them, at tau_auto x the group's median step-energy spread."""
    import dataclasses
    import json

    import kvpo.sample
    from kvpo.method.exploration import rollout_spec
    from kvpo.method.replay import replay_velocities
    from kvpo.run.checkpoint import run_config
    from kvpo.run.config import build_config

    run = {"likelihood": "step", "tau_auto": 0.5, "score_steps": (0, 1), "sigma_floor": 0.3}
    monkeypatch.setattr(kvpo.sample, "run_config", lambda path, over: run_config(path, over | run))
    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    asked = ["--prompt", LEFT, "--branches", "4", "--window", "2,4", "--p_keep", "0.5"]
    rows = main(
        ["--checkpoint", str(tmp_path / "m.safetensors"), *asked, "--out", str(tmp_path / "g")]
    )
    cfg = build_config({"group_size": 4, "window": (2, 4), "p_keep": 0.5, **run})
    spec = dataclasses.replace(rollout_spec(cfg), anchor=True)
    ro = rollout(model, [chunk_prompts(LEFT, 5)], spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        u = replay_velocities(model, ro).double()
    dist = (u - ro.velocities.double()).pow(2).mean(dim=(3, 4))[0][:, ro.scored]  # [G, K']
    energy = dist / ro.t.double()[ro.scored].clamp_min(0.3) ** 2
    spread = energy.std(0)
    tau = 0.5 * float(spread[spread > 0].median())
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert out[0]["tau"] == pytest.approx(tau, rel=1e-3)
    p = torch.softmax(-energy / tau, dim=0).mean(1)
    assert [r["gibbs_p"] for r in rows[1:]] == pytest.approx(p, abs=2e-4)
    assert len({r["gibbs_p"] for r in rows[1:]}) == 4


def test_branches_show_a_group_as_the_run_explores_it(tmp_path, capsys):
    """--branches G: the deployment video and G routed branches per prompt, scored: the groups a
    training rollout with the same settings and seed makes, one group at a time."""
    import dataclasses
    import json

    from kvpo.method.exploration import rollout_spec
    from kvpo.run.config import build_config

    model = tiny_model()
    ckpt = tmp_path / "m.safetensors"
    save_model(model, ckpt)
    up = "a small blue square moving up quickly"
    asked = [
        "--prompt",
        LEFT,
        "--prompt",
        up,
        "--branches",
        "3",
        "--window",
        "2,4",
        "--p_keep",
        "0.3",
    ]
    rows = main(["--checkpoint", str(ckpt), *asked, "--seed", "1", "--out", str(tmp_path / "g")])
    assert [(r["prompt"], r["branch"]) for r in rows] == [
        (p, b) for p in (LEFT, up) for b in ("anchor", 0, 1, 2)
    ]
    spec = rollout_spec(build_config({"group_size": 3, "window": (2, 4), "p_keep": 0.3}))
    spec = dataclasses.replace(spec, anchor=True)
    gen, reward = torch.Generator().manual_seed(1), CompositeReward(dict.fromkeys(BUILTIN, 1.0))
    spreads = []
    for i, prompt in enumerate((LEFT, up)):
        per_chunk = [chunk_prompts(prompt, 5)]
        ro = rollout(model, per_chunk, spec, gen)  # training's micro_batch 1: one group at a time
        tokens = torch.cat([ro.anchor_tokens[:, None], ro.tokens], 1).flatten(0, 1)
        want = reward.components((model.to_video(tokens) + 1) / 2, per_chunk * 4)
        for j, r in enumerate(rows[4 * i : 4 * i + 4]):
            for k, v in want.items():
                assert abs(r[k] - float(v[j])) < 1e-4, (prompt, j, k)
        spreads.append(round(float(ro.branch_spread()[0]), 4))
        # what the update reads of the branches: TVE (float64) and Gibbs probability at tau 5e-3
        tve = _tve_float64(model, ro)
        for g, r in enumerate(rows[4 * i + 1 : 4 * i + 4]):
            assert r["tve"] == pytest.approx(float(tve[g]), rel=1e-3), (prompt, g)
        p = torch.softmax(-tve / 5e-3, dim=0)
        assert [r["gibbs_p"] for r in rows[4 * i + 1 : 4 * i + 4]] == pytest.approx(p, abs=2e-4)
        assert "tve" not in rows[4 * i]  # the anchor is the deployment video
    assert len({r["path"] for r in rows[:4]}) > 1  # the branches explored
    assert len({r["gibbs_p"] for r in rows[1:4]}) == 3
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [o["branch_spread"] for o in out if "branch_spread" in o] == spreads
    assert [o["tau"] for o in out if "branch_spread" in o] == [5e-3, 5e-3]
    assert (tmp_path / "g.gif").stat().st_size > 0
    with pytest.raises(SystemExit, match="group_size"):
        main(["--checkpoint", str(ckpt), "--prompt", LEFT, "--branches", "1", "--window", "2,4"])
    with pytest.raises(SystemExit, match="error: --branches: .*window"):
        main(["--checkpoint", str(ckpt), "--prompt", LEFT, "--branches", "3", "--window", "0,9"])
    with pytest.raises(SystemExit, match="error: --branches: invalid literal"):
        main(["--checkpoint", str(ckpt), "--prompt", LEFT, "--branches", "3", "--window", "a,b"])
