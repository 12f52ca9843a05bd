"""KVPO training: ``python -m kvpo.train [--config file.yaml] [--field value ...]``.

One iteration: rollout with KV routing (no grad) -> rewards and advantages -> for each inner epoch,
replay under full context with gradients, TVE, Gibbs log-probabilities, PPO-clipped loss (+ KL
toward the base policy) -> AdamW step. ``docs/method.md`` states the formulas.
"""

from __future__ import annotations

import dataclasses
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
from kvpo.generators.interface import require_generator
from kvpo.method.exploration import NO_GROUP, checked_spec, iteration_batch
from kvpo.method.iteration import explore
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
from kvpo.run.policy import reference_and_policy, trainable
from kvpo.run.profiling import IterationProfiler
from kvpo.run.report import MetricsLog, check_writable, plot_rewards, record_process, save_videos
from kvpo.run.setup import (
    check_fresh_start,
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
        generator: your own :class:`kvpo.generators.interface.StreamingVideoGenerator` (an ``nn.Module``) to
            align instead of the built-in one in ``cfg.base_checkpoint``; the reference policy is
            a frozen copy of it, and ``cfg.resume`` loads into copies of it.
        reward: the reward (a :class:`CompositeReward`, or any ``fn(videos, prompts) -> [B]``,
            called on ``cfg.reward_batch`` videos at a time); default: ``cfg.reward_weights``
            over the built-in rewards.
        prompts: (training prompts, held-out prompts); default: the built-in procedural ones.
    """
    t_start = time.monotonic()  # max_minutes counts the loading and the first evaluation too
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
    if reward is not None and not isinstance(reward, CompositeReward):
        reward = CompositeReward({"reward": 1.0}, {"reward": reward}, batch=cfg.reward_batch)
    if not builtin_prompts and (cfg.multi_prompt or cfg.eval_multi_prompt):
        raise ConfigError(
            "config multi_prompt and eval_multi_prompt switch the direction of the built-in "
            "prompts; with your own prompts set them to 0 and false"
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
    nC = model.num_frames // model.chunk_frames
    check_run_rewards(cfg, model, reward, train_prompts + eval_prompts)

    autocast = functools.partial(amp_autocast, cfg.amp, device)

    eval_sets = evaluation_sets(eval_prompts, nC, cfg.eval_multi_prompt)

    def evaluation(it: int) -> Evaluation:
        """Held-out rewards of every evaluation set (each rank makes its share of the samples), of
        the policy and after training began its EMA's (``eval_ema_...``); the videos of the
        policy's single-prompt set (on rank 0, if samples are kept). The lead appends each
        prompt's scores to eval_prompts.jsonl as iteration ``it``'s."""
        with memory_stage("evaluation", cfg):
            ev = evaluate_sets(model, eval_sets, reward, cfg, device, videos=cfg.samples)
            if ema is not None and it >= 0:
                of_ema = evaluate_sets(ema.model, eval_sets, reward, cfg, device, videos=False)
                ev.update(of_ema.renamed("eval_", "eval_ema_"))
        if lead:
            prompt_log.write(*({"iter": it, **row} for row in ev.per_prompt))
            for lg in loggers:
                lg.prompts(ev.per_prompt, it + 1)
        return ev

    log = MetricsLog(out)
    prompt_log = MetricsLog(out, "eval_prompts")
    group_log = MetricsLog(out, "groups")
    params = trainable(model)
    loggers = make_loggers(cfg.log_to, out, cfg.to_dict(), cfg.wandb_project, start) if lead else []
    if lead:
        for lg in (log, prompt_log, group_log):  # what a resumed run redoes, a former run's
            lg.truncate(history[-1]["iter"] + 1 if history else -1)
        # the run's every setting, in the form --config reads back
        (out / "config.yaml").write_text(yaml.safe_dump(asked.to_dict(), sort_keys=False))
        record_process(out / "environment.jsonl", start, device, world, bool(cfg.resume))
        print(start_line(cfg, model, params, device, world), flush=True)
        if cfg.resume:
            print(f"resumed from {cfg.resume} after {start} iterations", flush=True)

    def save(done: int, name: str = "checkpoint") -> None:
        """The state after ``done`` iterations to ``out/<name>.safetensors``; the latest one
        (``checkpoint``) is also kept as ``checkpoints/step_N`` with ``keep_checkpoints``, and
        the reward plot redrawn. Rank 0 only."""
        path = out / f"{name}.safetensors"
        save_training(
            path,
            model,
            opt,
            done,
            cfg.to_dict(),
            history,
            ema=None if ema is None else ema.model,
        )
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
        plot_rewards(history, out / "rewards.png")

    def kept_value(row: dict) -> float | None:
        """``row``'s ``keep_best`` metric, None if it has none (an iteration not evaluated).
        Before training the EMA is the policy (it starts as its copy): its metrics are the
        policy's."""
        if cfg.keep_best.startswith("eval_ema_") and row["iter"] == -1:
            return row.get("eval_" + cfg.keep_best[len("eval_ema_") :])
        return row.get(cfg.keep_best)

    def keep_if_best(done: int) -> None:
        """``best.safetensors``: the state after ``done`` iterations, if the evaluation just
        logged has the best ``keep_best`` metric yet (every rank checks, rank 0 saves)."""
        if not cfg.keep_best:
            return
        value = kept_value(history[-1])
        earlier = [v for h in history[:-1] if (v := kept_value(h)) is not None]
        if lead and value is not None and (not earlier or value > max(earlier)):
            save(done, "best")

    stopped = None  # why the run stopped early (kvpo.run.stopping)
    longest = 0.0  # for max_minutes: the longest iteration yet
    with StopSignals() as stop:
        if start == 0 and cfg.eval_before and not history:  # every rank evaluates its share
            ev = evaluation(-1)
            history.append({"iter": -1, **ev.scores})
            keep_if_best(0)
            if lead:
                mp = ev.scores.get("eval_mp_reward")
                line = f"before training: eval reward {ev.scores['eval_reward']:.4f}"
                print(line + (f" (multi-prompt {mp:.4f})" if mp is not None else ""), flush=True)
                if cfg.samples:
                    save_videos(ev.videos, out / "samples_before")
                log.write(history[-1])
                for lg in loggers:
                    lg.write(history[-1])
                    if cfg.samples and cfg.samples_at_eval:
                        lg.videos({"eval": out / "samples_before.gif"})

        skips = SkippedSteps(cfg.max_skipped_steps)
        profiler = IterationProfiler(cfg.profile_iteration, out, rank, device)
        bar = tqdm(
            range(start, cfg.iterations),
            desc="kvpo",
            disable=not (lead and cfg.progress),
            initial=start,
            total=cfg.iterations,
            file=sys.stderr,
        )
        for it in bar:
            profiler.step(it)
            t_iter = time.monotonic()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batch, spec_it, gen = iteration_batch(cfg, spec, it, train_prompts, nC)
            ex = explore(cfg, model, ref, reward, batch, spec_it, gen, device, autocast)
            t2 = time.perf_counter()
            stopped = stop.requested()
            if stopped:  # before the update: the iteration is dropped, and redone on resume
                if lead:
                    save(it)
                break

            model.train()
            lr = learning_rate(cfg, it)
            for group in opt.param_groups:
                group["lr"] = lr
            with memory_stage("update", cfg):
                st, t_replay, skipped = update_policy(
                    dataclasses.replace(cfg, tau=ex.tau),
                    model,
                    opt,
                    params,
                    ema,
                    ex.parts,
                    ex.step_weights,
                    ex.adv,
                    ex.valid,
                    ex.refs,
                    autocast,
                    skips,
                )
            row = iteration_row(it, ex, {"lr": lr, "skipped_steps": skipped, **st})
            groups = group_rows(it, ex)
            row["time_replay"] = t_replay  # policy replay forwards with gradients, TVE
            row["time_update"] = time.perf_counter() - t2 - t_replay  # backward, all-reduce, AdamW
            if device.type == "cuda":  # this rank's peak through the iteration's training stages
                row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            eval_samples = {}  # name -> GIF of this step's evaluation samples, for the loggers
            evaluated = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations
            if evaluated:
                ev = evaluation(it)
                row.update(ev.scores)
                if lead and it + 1 == cfg.iterations and cfg.samples:
                    save_videos(ev.videos, out / "samples_after")
                if lead and cfg.samples and cfg.samples_at_eval:
                    stem = out / "samples" / f"step_{it + 1:06d}"
                    eval_samples["eval"] = save_videos(ev.videos, stem, mp4=False)[0]
                    stem = out / "samples" / f"group_{it + 1:06d}"
                    eval_samples["group"] = save_group(model, ex, stem)
            history.append(row)
            if evaluated:
                keep_if_best(it + 1)
            if lead:
                log.write(row)
                group_log.write(*groups)
                for lg in loggers:
                    lg.write(row)
                    if eval_samples:
                        lg.videos(eval_samples)
                tqdm.write(progress_line(row, list(ex.comps), bool(cfg.tau_auto)), file=sys.stdout)
                if skipped:
                    tqdm.write(
                        f"it {it:4d} | {skipped} of {cfg.epochs} optimizer steps skipped: NaN or inf "
                        f"gradient norm ({skips.in_a_row} in a row, the run stops after "
                        f"{cfg.max_skipped_steps})",
                        file=sys.stdout,
                    )
                if row["valid_groups"] == 0:
                    tqdm.write(
                        f"it {it:4d} | no group trained: {NO_GROUP[cfg.advantage]}", file=sys.stdout
                    )
            saved = (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations
            if saved and lead:
                save(it + 1)
            longest = max(longest, time.monotonic() - t_iter)
            late = bool(cfg.max_minutes) and (
                time.monotonic() - t_start + longest > 60 * cfg.max_minutes
            )  # the next iteration (with an evaluation, say) would end past the limit
            stopped = stop.requested(late)
            if stopped:
                if lead and not saved:
                    save(it + 1)
                break
    profiler.close()
    if lead and stopped:
        done = history[-1]["iter"] + 1 if history else start
        print(
            f"stopped by {stopped} after {done} of {cfg.iterations} iterations, saved in "
            f"{out / 'checkpoint.safetensors'}; the same command with --resume auto continues "
            "the run",
            flush=True,
        )
    elif lead:
        print(end_line(history, out), flush=True)
        changes = prompt_changes(out / "eval_prompts.jsonl")
        if changes:
            print(changes, flush=True)
    for lg in loggers:
        if cfg.samples and not stopped:
            lg.videos({k: out / f"samples_{k}.gif" for k in ("before", "after")})
        lg.close()
    distributed.shutdown()
    return TrainResult(history, model, None if ema is None else ema.model, stopped)


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
