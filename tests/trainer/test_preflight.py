"""kvpo.preflight: the generator properties KVPO's training rests on, and generators without
them."""

import re

import pytest
import torch
from trainer_support import OwnGenerator, cli_args, run_overrides, tiny_model

from kvpo.method.rollout import RolloutSpec
from kvpo.preflight import NOISE_FLOOR, check_generator, main
from kvpo.rewards import CompositeReward

PROMPTS = ["a large red circle moving left slowly"] * 5  # one per chunk of the tiny model
SPEC = RolloutSpec(group_size=6, window=(2, 4), p_keep=0.4)
REWARD = CompositeReward({"alignment": 1.0, "path": 1.0})


def test_the_built_in_generator_passes_and_its_parameters_are_left_as_they_were():
    model = OwnGenerator(tiny_model())
    model.train()
    model.inner.head.weight.grad = torch.ones_like(model.inner.head.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = check_generator(model, PROMPTS, SPEC, REWARD)
    assert got.failures == {}
    assert got.replay_error < 1e-10 and got.same_spread == 0 and got.routed_spread > 1e-2
    assert got.reached == got.trainable == sum(1 for _ in model.parameters())
    assert set(got.rewards) == {"alignment", "path"}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(model.inner.head.weight.grad, torch.ones_like(model.inner.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "inner.head.weight")
    assert model.training  # the mode comes back too


class ShiftedFrames(OwnGenerator):
    """Teacher forcing (no cache) sees frames one position later than streaming does: what a
    position or rotary mix-up between the two ways of calling forward looks like."""

    def forward(self, x, t, cond, frame_index, table, cache=None, slots=None):
        return super().forward(x, t, cond, frame_index + (cache is None), table, cache, slots)


class Noisy(OwnGenerator):
    """A forward with randomness of its own."""

    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        return out + 0.05 * torch.randn_like(out)


class NoHistory(OwnGenerator):
    """Reads no page of the table: routing cannot change what it makes."""

    def forward(self, x, t, cond, frame_index, table, cache=None, slots=None):
        own = table.clone()
        own[:, : -self.chunk_frames] = -1  # the row's own chunk's pages come last
        return super().forward(x, t, cond, frame_index, own, cache, slots)


@pytest.mark.parametrize(
    "broken, failing",
    [
        (ShiftedFrames, {"replay": "replay does not reproduce streaming: replayed under"}),
        (  # and its own noise hides what routing does
            Noisy,
            {
                "replay": "replay does not reproduce streaming",
                "same": "one noise under one context made different videos",
                "routing": "routing does not change the video",
            },
        ),
        (NoHistory, {"routing": "routing does not change the video: branch spread 0.00e+00"}),
    ],
)
def test_a_generator_without_a_property_is_caught(broken, failing):
    got = check_generator(broken(tiny_model()), PROMPTS, SPEC)
    assert got.failures.keys() == failing.keys(), got
    for name, start in failing.items():
        assert got.failures[name].startswith(start)
    assert sum(line.endswith("FAILS") for line in got.lines()) == len(failing)


def test_a_small_shift_is_caught_on_the_shipped_generator_under_bf16():
    """The shipped generator depends little on the frame position: the shift costs 2.9e-3 of the
    velocities' energy; against the routed branches' TVE (1.2e-2) it is a quarter of the signal,
    and fails, in fp32 and under bf16 autocast."""
    from functools import partial

    from kvpo.generators.data import split_prompts
    from kvpo.run.checkpoint import load_model
    from kvpo.run.config import BASE_CHECKPOINT

    prompts = [split_prompts()[1][0]] * 6
    spec = RolloutSpec(window=(2, 6), p_keep=0.3)
    for bf16 in (False, True):
        autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)
        good = OwnGenerator(load_model(BASE_CHECKPOINT))
        good = check_generator(good, prompts, spec, autocast=autocast)
        bad = ShiftedFrames(load_model(BASE_CHECKPOINT))
        bad = check_generator(bad, prompts, spec, autocast=autocast)
        assert good.failures == {} and good.routed_tve > 1e-4
        # fp32: the same bits. bf16: on a CPU with bf16 matrix units (AMX, AVX512-BF16) oneDNN's
        # GEMMs sum in an order that depends on the row count, so streaming and replay round
        # apart, by far less than the noise floor
        exact = 1e-10 if not bf16 else 0.1 * NOISE_FLOOR * good.routed_tve
        assert good.replay_error < exact, (bf16, good.replay_error)
        assert bad.failures.keys() == {"replay"}
        assert 10 * NOISE_FLOOR * bad.routed_tve < bad.replay_error < 0.5 * bad.routed_tve


def test_frozen_parameters_and_a_broken_reward_are_caught():
    model = OwnGenerator(tiny_model()).requires_grad_(False)
    nan = CompositeReward(
        {"nan": 1.0}, {"nan": lambda v, p: torch.full((v.shape[0],), float("nan"))}
    )
    got = check_generator(model, PROMPTS, SPEC, nan)
    assert got.failures.keys() == {"gradient", "reward"}
    assert got.failures["gradient"] == (
        "the replay's gradient reaches none of the 0 trainable parameter tensors (none requires "
        "grad)"
    )
    assert got.failures["reward"].startswith("reward: reward 'nan' returned 2 non-finite value")
    marked = [line.endswith("FAILS") for line in got.lines()]
    assert marked == [False, False, False, True, True, False]  # as the command prints them


def test_cli_builds_the_runs_policy_and_reports(base, tmp_path, capsys):
    over = run_overrides(base, tmp_path, window=(2, 4), p_keep=0.4)
    got = main(cli_args(over))
    out = capsys.readouterr().out
    assert got.failures == {} and "replay reproduces streaming: relative error" in out
    # the KV cache a training rollout will hold, as the rollout counts it
    pages = [int(re.search(r"rollout KV cache: (\d+) pages", out).group(1))]
    main(cli_args({**over, "rollout_branches": 1, "micro_batch": 1}))
    line = re.search(r"rollout KV cache: (\d+) pages.*", capsys.readouterr().out).group(0)
    assert "for 1 group(s)" in line and "micro_batch 1, rollout_branches 1" in line
    assert 0 < int(line.split()[3]) < pages[0] / 2
    main(cli_args({**over, "eval_batch": 2}))
    line = re.search(r"evaluation KV cache: (\d+) pages.*", capsys.readouterr().out).group(0)
    model = tiny_model()  # the run's shape: 2 videos of F frames, and a chunk of scratch each
    assert f"{2 * (model.num_frames + model.chunk_frames)} pages" in line
    assert "for 2 video(s) at a time (eval_batch 2)" in line
    assert out.count(" ok\n") == 5 and "of the routed branches' TVE" in out
    lora = main(cli_args({**over, "lora_rank": 2}))  # the run's policy: only its adapters train
    assert lora.failures == {} and 0 < lora.reached < lora.trainable  # lora_a waits for lora_b
    from kvpo.run.config import build_config
    from kvpo.trainer import train

    train(build_config({**over, "iterations": 1, "samples": False}))  # resume auto: its state
    assert main(cli_args({**over, "resume": "auto"})).failures == {}
    assert f"resumed from {tmp_path / 'checkpoint.safetensors'}" in capsys.readouterr().out
    bf16 = main(cli_args({**over, "amp": "bf16"}))
    assert bf16.failures == {} and f"(< {NOISE_FLOOR:.0e})" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: window=\\(0, 2\\)"):
        main(cli_args({**over, "window": (0, 2)}))
    with pytest.raises(SystemExit):
        main(["--no_such_option"])
    assert "python -m kvpo.preflight: error: unrecognized arguments" in capsys.readouterr().err
    # every prompt the run would read, checked as train checks them: a training one here
    (tmp_path / "free.txt").write_text("a cat running\na small red square moving left slowly\n")
    with pytest.raises(SystemExit, match="error: reward 'alignment' .*'a cat running'"):
        main(cli_args({**over, "prompts_file": str(tmp_path / "free.txt"), "eval_prompts": 1}))


def test_cli_sets_the_runs_tau_against_the_energy_spread(base, tmp_path, capsys):
    """The run's tau beside the energy spread it divides: within 5x of it, far above (ratios
    stay at 1), far below (they swing to the clip), or what tau_auto makes of it; no line for
    the SDE baseline, which has no temperature."""
    over = run_overrides(base, tmp_path, window=(2, 4), p_keep=0.4)

    def line(**kw) -> str | None:
        main(cli_args({**over, **kw}))
        found = re.search(r"\n  (tau.*)", capsys.readouterr().out)
        return found and found.group(1)

    high = line(tau=1e3)
    spread = float(re.search(r"energy spread (\S+) \(one group of 3 branches\)", high).group(1))
    assert 0 < spread < 1
    assert "far from it: the PPO ratios would stay at 1; --tau_auto 1 sets tau" in high
    assert line(tau=spread).endswith(
        f"1x the energy spread {spread:.2e} (one group of 3 branches), within 5x of it"
    )
    assert "would swing to the clip on small changes" in line(tau=spread / 20)
    auto = line(tau_auto=2.0)
    head = f"tau: tau_auto 2 x the energy spread {spread:.2e} (one group of 3 branches), "
    assert auto.startswith(head) and auto.endswith(" here")
    # the spread printed is rounded to 3 digits: twice it, to that rounding
    assert float(auto[len(head) : -len(" here")]) == pytest.approx(2 * spread, rel=5e-3)
    assert line(explore="sde", kl="velocity") is None
    x0 = line(likelihood="x0", sigma_floor=1.0)  # the public recipe's: at tau 1
    assert x0.startswith("tau 1 (likelihood x0): ") and "--tau_auto" not in x0
