"""KVPO training, the loop ``python -m kvpo.train [--config file.yaml] [--field value ...]`` runs.

One iteration: rollout with KV routing (no grad) -> rewards and advantages -> for each inner epoch,
replay under full context with gradients, TVE, Gibbs log-probabilities, PPO-clipped loss (+ KL
toward the base policy) -> AdamW step. ``docs/method.md`` states the formulas.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from kvpo.evaluate import Evaluation, evaluate_sets, evaluation_sets
from kvpo.generators.ema import ParamEMA
from kvpo.generators.interface import require_generator
from kvpo.method.exploration import NO_GROUP, checked_spec, iteration_batch
from kvpo.method.iteration import Exploration, explore
from kvpo.method.rollout import RolloutSpec
from kvpo.method.update import NonFiniteGradientError, SkippedSteps, learning_rate, update_policy
from kvpo.rewards import (
    CompositeReward,
    NonFiniteVideoError,
    RewardFn,
    RewardOutputError,
    RewardSpecError,
)
from kvpo.run import distributed
from kvpo.run.checkpoint import CheckpointError, prune_checkpoints, save_training
from kvpo.run.config import ConfigError, TrainConfig, amp_autocast, config_errors, parse_args
from kvpo.run.log import end_line, group_rows, iteration_row, progress_line, save_group, start_line
from kvpo.run.loggers import make_loggers, missing_packages
from kvpo.run.memory import TrainingOutOfMemoryError, memory_stage
from kvpo.run.policy import old_policy, reference_and_policy, sync_old_policy, trainable
from kvpo.run.profiling import IterationProfiler
from kvpo.run.report import MetricsLog, check_writable, plot_rewards, record_process, save_videos
from kvpo.run.setup import (
    check_fresh_start,
    check_held_out,
    check_run_rewards,
    check_wan_paths,
    config_prompts,
    make_reward,
    prompt_sets,
    resolve_resume,
    training_device,
)
from kvpo.run.stopping import StopSignals
from kvpo.summary import prompt_changes


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    history: list[dict]  # one row per iteration (also in out_dir/metrics.jsonl)
    model: nn.Module  # the trained policy
    ema: nn.Module | None = None  # its EMA (config ema > 0)
    # Why the run stopped before cfg.iterations, after a checkpoint (kvpo.run.stopping): the name of
    # a signal ("SIGTERM", "SIGUSR1") or "max_minutes".
    stopped_by: str | None = None


def train(
    cfg: TrainConfig,
    generator: nn.Module | None = None,
    reward: CompositeReward | RewardFn | None = None,
    prompts: tuple[list[str], list[str]] | None = None,
) -> TrainResult:
    """Run KVPO; returns the per-iteration log and the trained model.

    Args:
        cfg: the recipe.
        generator: your own :class:`kvpo.generators.interface.StreamingVideoGenerator` (an
            ``nn.Module``) to align instead of the built-in one in ``cfg.base_checkpoint``; the
            reference policy is a frozen copy of it, and ``cfg.resume`` loads into copies of it.
        reward: the reward (a :class:`CompositeReward`, or any ``fn(videos, prompts) -> [B]``,
            called on ``cfg.reward_batch`` videos at a time); default: ``cfg.reward_weights``
            over the built-in rewards.
        prompts: (training prompts, held-out prompts); default: the built-in procedural ones.
    """
    t_start = time.monotonic()  # max_minutes counts the loading and the first evaluation too
    run = start_run(cfg, generator, reward, prompts)
    stopped, longest = None, 0.0  # why the run stopped early; the longest iteration yet
    with StopSignals() as stop:
        run.evaluate_before_training()
        for it in run.iterations():
            t_iter = time.monotonic()
            ex = run.explore(it)
            stopped = stop.requested()
            if stopped:  # before the update: the iteration is dropped, and redone on resume
                run.save(it)
                break
            row = run.update(it, ex)
            run.evaluate_and_log(it, ex, row)
            saved = run.save_if_due(it)
            longest = max(longest, time.monotonic() - t_iter)
            # the next iteration (with an evaluation, say) would end past the limit
            late = bool(cfg.max_minutes) and (
                time.monotonic() - t_start + longest > 60 * cfg.max_minutes
            )
            stopped = stop.requested(late)
            if stopped:
                if not saved:
                    run.save(it + 1)
                break
    run.finish(stopped)
    return TrainResult(run.history, run.model, None if run.ema is None else run.ema.model, stopped)


def start_run(
    cfg: TrainConfig,
    generator: nn.Module | None,
    reward: CompositeReward | RewardFn | None,
    prompts: tuple[list[str], list[str]] | None,
) -> Run:
    """Everything a run checks and loads before its first iteration, in the order that finds a
    bad setting before minutes of loading: the config, the prompts, the device and ranks, the
    output folder, the policy and reference, the exploration, the reward."""
    cfg.validate()
    if missing := missing_packages(cfg.log_to):
        raise ConfigError(
            f"config log_to={cfg.log_to!r} needs {', '.join(missing)}: pip install "
            + " ".join(missing)
        )
    if generator is not None:
        if cfg.wan_dir:
            raise ValueError("config wan_dir and train(generator=...) both name a generator")
        require_generator(generator)
    check_wan_paths(cfg)
    asked = cfg  # what config.yaml records: `resume: auto` stays auto for the next start
    cfg = resolve_resume(cfg)
    builtin_prompts = prompts is None and not (cfg.prompts_file or cfg.eval_prompts_file)
    if prompts is None:
        with config_errors():  # a prompts file missing, empty, or too short
            prompts = config_prompts(cfg)
    train_prompts, eval_prompts = prompt_sets(prompts)
    check_held_out(train_prompts, eval_prompts[: cfg.eval_prompts])
    if reward is not None and not isinstance(reward, CompositeReward):
        reward = CompositeReward({"reward": 1.0}, {"reward": reward}, batch=cfg.reward_batch)
    if not builtin_prompts and (cfg.multi_prompt or cfg.eval_multi_prompt or cfg.switch_chunks):
        raise ConfigError(
            "config multi_prompt, eval_multi_prompt and switch_chunks switch the direction of the "
            "built-in prompts; with your own prompts set them to 0, false and [] (write "
            '"A | B | C" prompts instead)'
        )
    device = training_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.wan_dir:
        from kvpo.generators.wan import load_from_config

        generator = load_from_config(cfg.to_dict(), device)
    rank, world = distributed.init(device)
    if cfg.prompts_per_iter % world:
        raise ConfigError(
            f"config prompts_per_iter={cfg.prompts_per_iter} must divide by the {world} ranks"
        )
    out = Path(cfg.out_dir)
    lead = rank == 0
    check_fresh_start(cfg, lead)
    if lead:
        with config_errors():
            check_writable(out, f"config out_dir={cfg.out_dir!r}")
    ref, model, opt, ema, start, history = reference_and_policy(cfg, device, generator)
    del generator  # the policy and the reference are copies: a loaded Wan2.1 need not stay a third
    if start > cfg.iterations:  # equal is a finished run requeued: it ends at once, as done
        raise ConfigError(
            f"--resume {cfg.resume!r} has {start} iterations done, more than config "
            f"iterations={cfg.iterations}: raise iterations to train on"
        )
    spec = checked_spec(cfg, model)
    if reward is None:
        reward = make_reward(cfg, device)
    eval_prompts = eval_prompts[: cfg.eval_prompts]
    check_run_rewards(cfg, model, reward, train_prompts + eval_prompts)
    chunks = model.num_frames // model.chunk_frames
    run = Run(
        cfg=cfg,
        device=device,
        rank=rank,
        world=world,
        out=out,
        model=model,
        ref=ref,
        opt=opt,
        ema=ema,
        reward=reward,
        spec=spec,
        train_prompts=train_prompts,
        eval_sets=evaluation_sets(eval_prompts, chunks, cfg.eval_multi_prompt),
        start=start,
        history=history,
    )
    run.open_logs(asked)
    return run


@dataclass
class Run:
    """A training run's state between iterations, and its steps (:func:`train` calls them)."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    out: Path
    model: nn.Module  # the policy
    ref: nn.Module  # the frozen reference policy
    opt: torch.optim.Optimizer
    ema: ParamEMA | None
    reward: CompositeReward
    spec: RolloutSpec  # the exploration (each iteration shifts its window)
    train_prompts: list[str]
    eval_sets: dict[str, list]  # held-out prompts by metric prefix (evaluation_sets)
    start: int  # iterations done before this process
    history: list[dict]  # a row per iteration (and -1: before training)

    def __post_init__(self) -> None:
        self.lead = self.rank == 0
        self.autocast = functools.partial(amp_autocast, self.cfg.amp, self.device)
        self.params = trainable(self.model)
        self.old = old_policy(self.cfg, self.model)  # makes the rollouts (old_policy_sync)
        self.skips = SkippedSteps(self.cfg.max_skipped_steps)
        self.profiler = IterationProfiler(
            self.cfg.profile_iteration, self.out, self.rank, self.device
        )
        self.log = MetricsLog(self.out)
        self.prompt_log = MetricsLog(self.out, "eval_prompts")
        self.group_log = MetricsLog(self.out, "groups")
        self.loggers = []

    def open_logs(self, asked: TrainConfig) -> None:
        """The lead's logs: a resumed run's former rows past its checkpoint dropped, the run's
        every setting (``config.yaml``, in the form ``--config`` reads back), its process."""
        cfg = self.cfg
        if not self.lead:
            return
        self.loggers = make_loggers(
            cfg.log_to, self.out, cfg.to_dict(), cfg.wandb_project, self.start
        )
        for lg in (self.log, self.prompt_log, self.group_log):  # what a resumed run redoes
            lg.truncate(self.history[-1]["iter"] + 1 if self.history else -1)
        (self.out / "config.yaml").write_text(yaml.safe_dump(asked.to_dict(), sort_keys=False))
        record_process(
            self.out / "environment.jsonl", self.start, self.device, self.world, bool(cfg.resume)
        )
        print(start_line(cfg, self.model, self.params, self.device, self.world), flush=True)
        if cfg.resume:
            print(f"resumed from {cfg.resume} after {self.start} iterations", flush=True)

    def iterations(self) -> tqdm:
        """The iterations left, with the lead's progress bar."""
        cfg = self.cfg
        return tqdm(
            range(self.start, cfg.iterations),
            desc="kvpo",
            initial=self.start,
            total=cfg.iterations,
            disable=not (self.lead and cfg.progress),
            file=sys.stderr,
        )

    def explore(self, it: int) -> Exploration:
        """Iteration ``it``'s rollouts, rewards, advantages, temperature and reference terms."""
        self.profiler.step(it)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        nC = self.model.num_frames // self.model.chunk_frames
        batch, spec, gen = iteration_batch(self.cfg, self.spec, it, self.train_prompts, nC)
        ex = explore(
            self.cfg,
            self.model,
            self.ref,
            self.reward,
            batch,
            spec,
            gen,
            self.device,
            self.autocast,
            self.old,
        )
        return ex

    def update(self, it: int, ex: Exploration) -> dict:
        """The PPO epochs on ``ex`` at the iteration's learning rate; its metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        lr = learning_rate(cfg, it)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with memory_stage("update", cfg):
            st, t_replay, skipped = update_policy(
                cfg, self.model, self.opt, self.params, self.ema, ex, self.autocast, self.skips
            )
        if self.old is not None and (it + 1) % cfg.old_policy_sync == 0:
            sync_old_policy(self.old, self.model)
        row = iteration_row(it, ex, {"lr": lr, "skipped_steps": skipped, **st})
        row["time_replay"] = t_replay  # policy replay forwards with gradients, TVE
        # backward, all-reduce, AdamW
        row["time_update"] = time.perf_counter() - t0 - t_replay
        if self.device.type == "cuda":  # this rank's peak through the iteration's training
            row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    def evaluation(self, it: int) -> Evaluation:
        """Held-out rewards of every evaluation set (each rank makes its share of the samples), of
        the policy and after training began its EMA's (``eval_ema_...``); the videos of the
        policy's single-prompt set (if samples are kept). The lead appends each prompt's scores
        to eval_prompts.jsonl as iteration ``it``'s."""
        cfg = self.cfg
        with memory_stage("evaluation", cfg):
            ev = evaluate_sets(
                self.model, self.eval_sets, self.reward, cfg, self.device, videos=cfg.samples
            )
            if self.ema is not None and it >= 0:
                of_ema = evaluate_sets(
                    self.ema.model, self.eval_sets, self.reward, cfg, self.device, videos=False
                )
                ev.update(of_ema.renamed("eval_", "eval_ema_"))
        if self.lead:
            self.prompt_log.write(*({"iter": it, **row} for row in ev.per_prompt))
            for lg in self.loggers:
                lg.prompts(ev.per_prompt, it + 1)
        return ev

    def evaluate_before_training(self) -> None:
        """The baseline row (iteration -1) of a run that starts from scratch."""
        cfg = self.cfg
        if self.start or not cfg.eval_before or self.history:
            return
        ev = self.evaluation(-1)
        self.history.append({"iter": -1, **ev.scores})
        self.keep_if_best(0)
        if not self.lead:
            return
        mp = ev.scores.get("eval_mp_reward")
        line = f"before training: eval reward {ev.scores['eval_reward']:.4f}"
        print(line + (f" (multi-prompt {mp:.4f})" if mp is not None else ""), flush=True)
        if cfg.samples:
            save_videos(ev.videos, self.out / "samples_before")
        self.log.write(self.history[-1])
        for lg in self.loggers:
            lg.write(self.history[-1])
            if cfg.samples and cfg.samples_at_eval:
                lg.videos({"eval": self.out / "samples_before.gif"})

    def evaluate_and_log(self, it: int, ex: Exploration, row: dict) -> None:
        """Iteration ``it``'s held-out evaluation when due, then its rows in every log."""
        cfg = self.cfg
        groups = group_rows(it, ex)  # gathered from every rank
        eval_samples = {}  # name -> GIF of this step's evaluation samples, for the loggers
        evaluated = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations
        if evaluated:
            ev = self.evaluation(it)
            row.update(ev.scores)
            if self.lead and it + 1 == cfg.iterations and cfg.samples:
                save_videos(ev.videos, self.out / "samples_after")
            if self.lead and cfg.samples and cfg.samples_at_eval:
                stem = self.out / "samples" / f"step_{it + 1:06d}"
                eval_samples["eval"] = save_videos(ev.videos, stem, mp4=False)[0]
                stem = self.out / "samples" / f"group_{it + 1:06d}"
                eval_samples["group"] = save_group(self.model, ex, stem)
        self.history.append(row)
        if evaluated:
            self.keep_if_best(it + 1)
        if self.lead:
            self.write_rows(it, ex, row, groups, eval_samples)

    def write_rows(
        self, it: int, ex: Exploration, row: dict, groups: list[dict], eval_samples: dict
    ) -> None:
        """The lead's logs of iteration ``it``: metrics, groups, loggers and the progress line."""
        cfg = self.cfg
        self.log.write(row)
        self.group_log.write(*groups)
        for lg in self.loggers:
            lg.write(row)
            if eval_samples:
                lg.videos(eval_samples)
        tqdm.write(progress_line(row, list(ex.comps), bool(cfg.tau_auto)), file=sys.stdout)
        if row["skipped_steps"]:
            tqdm.write(
                f"it {it:4d} | {row['skipped_steps']} of {cfg.epochs} optimizer steps skipped: "
                f"NaN or inf gradient norm ({self.skips.in_a_row} in a row, the run stops after "
                f"{cfg.max_skipped_steps})",
                file=sys.stdout,
            )
        if row["valid_groups"] == 0:
            tqdm.write(f"it {it:4d} | no group trained: {NO_GROUP[cfg.advantage]}", file=sys.stdout)

    def save(self, done: int, name: str = "checkpoint") -> None:
        """The state after ``done`` iterations to ``out/<name>.safetensors`` (rank 0 only); the
        latest one (``checkpoint``) is also kept as ``checkpoints/step_N`` with
        ``keep_checkpoints``, and the reward plot redrawn."""
        if not self.lead:
            return
        cfg, out = self.cfg, self.out
        path = out / f"{name}.safetensors"
        ema = None if self.ema is None else self.ema.model
        save_training(path, self.model, self.opt, done, cfg.to_dict(), self.history, ema=ema)
        if name != "checkpoint":
            return
        if cfg.keep_checkpoints:  # to go back to, e.g. before a reward was gamed
            (out / "checkpoints").mkdir(exist_ok=True)
            kept = out / "checkpoints" / f"step_{done:06d}.safetensors"
            kept.unlink(missing_ok=True)
            try:  # a second name, no copy of GBs: the next save writes a new file, not this one
                os.link(path, kept)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, kept)
            if cfg.keep_last:
                prune_checkpoints(out / "checkpoints", done, cfg.keep_last)
        plot_rewards(self.history, out / "rewards.png")

    def save_if_due(self, it: int) -> bool:
        """Save after iteration ``it`` every ``save_every`` iterations and at the last; whether
        it was due."""
        due = (it + 1) % self.cfg.save_every == 0 or it + 1 == self.cfg.iterations
        if due:
            self.save(it + 1)
        return due

    def kept_value(self, row: dict) -> float | None:
        """``row``'s ``keep_best`` metric, None if it has none (an iteration not evaluated).
        Before training the EMA is the policy (it starts as its copy): its metrics are the
        policy's."""
        best = self.cfg.keep_best
        if best.startswith("eval_ema_") and row["iter"] == -1:
            return row.get("eval_" + best[len("eval_ema_") :])
        return row.get(best)

    def keep_if_best(self, done: int) -> None:
        """``best.safetensors``: the state after ``done`` iterations, if the evaluation just
        logged has the best ``keep_best`` metric yet (every rank checks, rank 0 saves)."""
        if not self.cfg.keep_best:
            return
        value = self.kept_value(self.history[-1])
        earlier = [v for h in self.history[:-1] if (v := self.kept_value(h)) is not None]
        if value is not None and (not earlier or value > max(earlier)):
            self.save(done, "best")

    def finish(self, stopped: str | None) -> None:
        """The run's last line (stopped early, or its held-out change), the loggers closed."""
        cfg, out = self.cfg, self.out
        self.profiler.close()
        if self.lead and stopped:
            done = self.history[-1]["iter"] + 1 if self.history else self.start
            print(
                f"stopped by {stopped} after {done} of {cfg.iterations} iterations, saved in "
                f"{out / 'checkpoint.safetensors'}; the same command with --resume auto "
                "continues the run",
                flush=True,
            )
        elif self.lead:
            print(end_line(self.history, out), flush=True)
            changes = prompt_changes(out / "eval_prompts.jsonl")
            if changes:
                print(changes, flush=True)
        for lg in self.loggers:
            if cfg.samples and not stopped:
                lg.videos({k: out / f"samples_{k}.gif" for k in ("before", "after")})
            lg.close()
        distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        result = train(cfg)
    except (
        ConfigError,
        CheckpointError,
        RewardSpecError,
        NonFiniteGradientError,
        NonFiniteVideoError,
        RewardOutputError,
        TrainingOutOfMemoryError,
    ) as e:
        raise SystemExit(f"error: {e}") from None
    if result.stopped_by and result.stopped_by.startswith("SIG"):  # saved, not finished: the
        raise SystemExit(128 + signal.Signals[result.stopped_by])  # shell's status for it


if __name__ == "__main__":
    main()
