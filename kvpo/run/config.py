"""Trainer configuration: one dataclass, YAML files and ``--field value`` command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from kvpo.generators.context import RECACHE_POLICIES, recache_policy
from kvpo.generators.sampler import SAMPLERS
from kvpo.rewards import BUILTIN, split_reward_spec
from kvpo.run.loggers import parse_log_to

REWARD_SCOPES = (
    "video",
    "global",
    "local",
    "stream",
    "segments",
)  # see kvpo.method.scoring.scope_chunks
BASE_CHECKPOINT = str(Path(__file__).parents[1] / "assets" / "base.safetensors")


class ConfigError(ValueError):
    """Settings (or prompts) a run cannot work with, found as it starts: ``python -m kvpo.train``
    prints the message alone, ``error: ...``, as it does for a bad option."""


@contextmanager
def config_errors() -> Iterator[None]:
    """The ValueErrors raised inside (a check of the settings) as :class:`ConfigError`."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def amp_autocast(amp: str, device: torch.device) -> torch.autocast:
    """The forwards' precision that config ``amp`` asks for on ``device``: bfloat16 autocast with
    fp32 master weights (``"bf16"``), or an autocast that changes nothing (``"none"``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _default_rewards() -> dict[str, float]:
    return {"alignment": 1.0, "path": 1.0, "motion": 0.0, "visual": 0.0}


def _whole_video() -> dict[str, float]:
    return {"video": 1.0}


@dataclass
class TrainConfig:
    """Every setting of a KVPO run; each field is a ``--field`` flag and a YAML key, its
    ``metadata["help"]`` the flag's ``--help``."""

    # Model and output.
    base_checkpoint: str = field(
        default=BASE_CHECKPOINT, metadata={"help": "the initial and reference policy"}
    )
    out_dir: str = field(
        default="runs/kvpo", metadata={"help": "metrics, plots, samples and checkpoints"}
    )
    resume: str = field(
        default="",
        metadata={"help": "a training checkpoint to continue from (auto: out_dir's, if any)"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "rollouts, prompts and the evaluation noises"})
    # Wan2.1 instead of the built-in generator (kvpo.generators.wan; needs clip_reward_path or
    # reward_fns): a local diffusers directory with transformer/, vae/, text_encoder/, tokenizer/.
    wan_dir: str = field(
        default="",
        metadata={"help": "a local diffusers Wan2.1 text-to-video directory (trains it)"},
    )
    wan_checkpoint: str = field(
        default="",
        metadata={"help": "Wan-layout transformer weights instead (self_forcing_dmd.pt, ...)"},
    )
    wan_checkpoint_key: str = field(
        default="generator_ema", metadata={"help": "its state dict (Self-Forcing: generator_ema)"}
    )
    wan_frames: int = field(
        default=21, metadata={"help": "latent frames per video (Self-Forcing: 21)"}
    )
    wan_chunk_frames: int = field(default=3, metadata={"help": "latent frames per chunk"})
    wan_sink_frames: int = field(
        default=0, metadata={"help": "attention sink frames (LongLive: 3)"}
    )
    wan_size: tuple[int, int] = field(default=(480, 832), metadata={"help": "video height, width"})
    wan_dtype: str = field(
        default="fp32",
        metadata={"help": "fp32 | bf16: the transformer's weights (bf16 needs lora_rank)"},
    )
    prompts_file: str = field(
        default="",
        metadata={"help": 'a prompt per line ("A | B": A, then B); the last eval_prompts held out'},
    )
    eval_prompts_file: str = field(
        default="",
        metadata={"help": "held-out prompts of their own (then prompts_file all trains)"},
    )
    # Loop.
    iterations: int = field(default=20, metadata={"help": "rollout + update rounds"})
    prompts_per_iter: int = field(
        default=4, metadata={"help": "groups per iteration, over all ranks"}
    )
    multi_prompt: float = field(
        default=0.0,
        metadata={"help": "probability that a training prompt switches direction mid-video"},
    )
    # Built-in prompts switch direction at these chunks, every training video (the public recipe's
    # fixed switches; the generator's KV re-cache runs at each)
    switch_chunks: tuple[int, ...] = field(
        default=(), metadata={"help": "chunks where every training video's direction switches"}
    )
    # Exploration (rollout).
    # routing: KVPO (KV routing, TVE, Gibbs branch probabilities) | sde: the Flow-GRPO baseline
    # (per-branch SDE noise on the scored steps, PPO on Gaussian step log-probabilities)
    explore: str = field(
        default="routing", metadata={"help": "routing: KVPO | sde: the Flow-GRPO baseline"}
    )
    sde_noise: float = field(
        default=0.7, metadata={"help": "the SDE's a in sigma_t = a sqrt(t / (1 - t)) (explore=sde)"}
    )
    group_size: int = field(default=6, metadata={"help": "G branches per prompt"})
    # The KV cache then holds the shared prefix and one pass's pages; routing and noise are
    # drawn for all branches first, so any value makes the same branches.
    rollout_branches: int = field(
        default=0,
        metadata={"help": "from the fork on, branches per group rolled out at a time (0: all)"},
    )
    window: tuple[int, int] = field(default=(2, 6), metadata={"help": "perturbed chunks [w0, w1)"})
    window_shift: int = field(
        default=0,
        metadata={"help": "each iteration the window starts 0..window_shift chunks later"},
    )
    # drop: each droppable history frame kept with probability p_keep | sample: the local window's
    # slots besides sinks and the recent_frames nearest refilled from the whole older history |
    # shifted (the public recipe): the slots drawn once at the fork from the pool, branch k a slice
    # of one permutation shifted by k * max(1, pool // G), kept for the whole window
    routing: str = field(
        default="drop",
        metadata={"help": "drop | sample | shifted: how a branch's history is routed"},
    )
    # routing=shifted: the pool's oldest frame is max(sinks, last perturbed chunk's first frame -
    # route_pool) (LongLive: the 30 non-sink frames its KV cache holds; 0: all history)
    route_pool: int = field(
        default=0, metadata={"help": "routing=shifted: frames the pool reaches back (0: all)"}
    )
    # The t = 0 pass that writes a perturbed chunk's cache pages under the branch's routed context
    # (the public recipe), not the full one: later chunks see the perturbation's K/V
    routed_cache_pass: bool = field(
        default=False, metadata={"help": "the window's cache writes under the routed context"}
    )
    # (first, later): chunks per streaming chunk (LongLive: 7 then 6 blocks); the stream reward
    # scope and score_stream read it (None: the whole video is one)
    streaming_chunk: tuple[int, ...] | None = field(
        default=None, metadata={"help": "first,later: chunks per streaming chunk (None: video)"}
    )
    p_keep: float = field(
        default=0.3, metadata={"help": "routing=drop: probability a droppable history frame stays"}
    )
    recent_frames: int = field(
        default=2, metadata={"help": "routing=sample: nearest history frames every branch keeps"}
    )
    local_window: int | None = field(
        default=None,
        metadata={"help": "frames besides sinks a chunk attends to (None: checkpoint's)"},
    )
    # At a prompt switch: longlive (LongLive's one-pass re-cache of its window; true) | chunkwise
    # (this project's chunk-by-chunk re-encode) | none (false)
    recache: str | None = field(
        default=None, metadata={"help": "KV re-cache policy (None: the generator's own)"}
    )
    # longlive re-cache: the sink frames keep their first prompt's K/V (LongLive's inference
    # default) | false: the re-encoded frames' first ones become the sinks
    global_sink: bool | None = field(
        default=None, metadata={"help": "(None: the generator's own; LongLive: true)"}
    )
    # euler: x' = x + (t' - t) v (the built-in generator) | renoise: predict x0 = x - t v, re-noise
    # it to t' with noise shared by a group's branches (Self-Forcing, CausVid, LongLive deploy it)
    sampler: str | None = field(
        default=None, metadata={"help": "euler | renoise (None: the generator's own)"}
    )
    score_after_window: bool = field(
        default=False, metadata={"help": "also score the chunks after the perturbed window"}
    )
    score_stream: bool = field(
        default=False,
        metadata={"help": "score from the fork to the end of its streaming chunk (public)"},
    )
    score_steps: tuple[int, ...] | None = field(
        default=None, metadata={"help": "None: every denoising step"}
    )
    kl_prefix: bool = field(
        default=False, metadata={"help": "the velocity KL also covers the shared pre-window chunks"}
    )
    # Likelihood (replay).
    tau: float = field(
        default=5e-3,
        metadata={
            "help": "~ the spread of E within a group: sets how far PPO clipping lets it move"
        },
    )
    # > 0: each iteration's tau is tau_auto times the median spread (std over a group's branches)
    # of the energies the Gibbs form divides by tau, under the policy before its update: a
    # temperature that follows the TVE's scale (another generator, resolution, likelihood)
    tau_auto: float = field(
        default=0.0,
        metadata={"help": "> 0: tau = tau_auto x the groups' median energy spread, each iteration"},
    )
    step_weighting: str = field(default="uniform", metadata={"help": "uniform | sigma"})
    # branch: one Gibbs probability per branch from its TVE | step: one per scored step, over the
    # step's velocity distance / max(t, sigma_floor)^2 (PPO ratio per step) | x0 (the public
    # recipe): E = sum_k mean (x0_k(rollout) - x0_k(replay))^2 / (2 max(t_k, sigma_floor)^2)
    likelihood: str = field(
        default="branch",
        metadata={"help": "branch: Gibbs over the TVE | step: per scored step | x0: public"},
    )
    sigma_floor: float = field(
        default=0.1, metadata={"help": "likelihood=step|x0: floor on the step's noise level t"}
    )
    # > 0: only the first N denoising steps of each chunk pass gradient (the rest count, detached)
    log_prob_grad_steps: int = field(
        default=0, metadata={"help": "gradient through each chunk's first N steps (0: all)"}
    )
    group_normalize: bool = field(
        default=True, metadata={"help": "log p = log_softmax(-E / tau) over the group | -E / tau"}
    )
    # Rewards and advantages.
    # Weight 0 logs a reward without training on it (motion and visual: what the update costs).
    reward_weights: dict[str, float] = field(
        default_factory=_default_rewards, metadata={"help": "name -> weight"}
    )
    # Clips scored and their weights: video (every frame), global (the post-fork video, from the
    # window's start), local (the perturbed window); the public recipe: local=1,global=0.5.
    reward_scopes: dict[str, float] = field(
        default_factory=_whole_video, metadata={"help": "video|global|local"}
    )
    segment_clip: int = field(
        default=0,
        metadata={"help": "segments scope: decoded frames centred in each segment (0: all)"},
    )
    clip_reward_path: str = field(
        default="", metadata={"help": 'a local transformers CLIP directory: adds a "clip" reward'}
    )
    clip_reward_weight: float = field(
        default=1.0, metadata={"help": "weight of the clip reward when clip_reward_path is set"}
    )
    # Your own rewards by import path, e.g. hps=my_rewards:HPSReward or aes=/code/aes.py:score
    # (kvpo.rewards.load_reward); each weighted by reward_weights[name], 1 if not named there.
    reward_fns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "name -> module:fn or file.py:fn"}
    )
    reward_batch: int = field(
        default=0,
        metadata={"help": "videos per call of each reward (a large reward model's memory; 0: all)"},
    )
    advantage: str = field(
        default="group",
        metadata={"help": "group: (r - mean) / std | anchor | public: against the anchor"},
    )
    # skip: a group where no branch beats the anchor trains nothing | halve (the public recipe's
    # anchor slot of logit 0 in the softmax): its PPO loss and KL count half
    protect: str = field(
        default="skip", metadata={"help": "advantage=anchor|public: skip | halve the gated groups"}
    )
    adv_clip: float = field(
        default=2.5, metadata={"help": "advantages clipped to [-adv_clip, adv_clip]"}
    )
    adv_eps: float = field(
        default=1e-6, metadata={"help": "added to the std of the advantages' denominator"}
    )
    # Update.
    epochs: int = field(default=2, metadata={"help": "PPO passes over each rollout"})
    # > 0: a copy of the policy makes the rollouts and the old log-probabilities, synced to the
    # policy every N iterations (the public recipe: 2); 0: the policy itself
    old_policy_sync: int = field(
        default=0, metadata={"help": "old policy synced every N iterations (0: none)"}
    )
    log_ratio_clamp: float = field(
        default=0.0, metadata={"help": "PPO log-ratio clamped to +-this (0: none; public: 20)"}
    )
    replay_branches: int = field(
        default=0,
        metadata={"help": "backward through this many branches per group at a time (0: all)"},
    )
    # Groups rolled out, replayed and back-propagated at a time on a rank, gradients accumulated
    # over them: the KV cache and activations of micro_batch groups, the whole batch's objective.
    micro_batch: int = field(
        default=0,
        metadata={"help": "groups per pass on each rank (0: all of the rank's groups at once)"},
    )
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    lr_warmup: int = field(
        default=0, metadata={"help": "iterations of linear warmup from lr / lr_warmup up to lr"}
    )
    lr_schedule: str = field(
        default="constant",
        metadata={"help": "constant | cosine | public: warmup from 0, stepped per old policy sync"},
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    # A step whose gradient holds a NaN or inf (bf16 overflow, a diverging replay) is skipped:
    # weights, AdamW moments and EMA unchanged.
    max_skipped_steps: int = field(
        default=3, metadata={"help": "NaN/inf-gradient steps skipped in a row before the run stops"}
    )
    clip_low: float = field(
        default=0.1, metadata={"help": "PPO ratio clipped below at 1 - clip_low"}
    )
    clip_high: float = field(default=0.2, metadata={"help": "... and above at 1 + clip_high"})
    kl: str = field(
        default="velocity",
        metadata={"help": "velocity: beta * mean |u - u_ref|^2 | softmax: KL(p || p_ref) | none"},
    )
    kl_coef: float = field(default=10.0, metadata={"help": "weight of the KL term"})
    lora_rank: int = field(
        default=0,
        metadata={"help": "> 0: train LoRA adapters of this rank on the blocks, the rest frozen"},
    )
    lora_alpha: float = field(
        default=0.0, metadata={"help": "adapter scale alpha / rank (0: alpha = rank)"}
    )
    # LongLive's lora.pt (its long-video LoRA): the reference policy deploys it, the policy's
    # adapters (lora_rank = the file's rank) start from it and continue training it
    lora_init: str = field(
        default="",
        metadata={"help": 'a LongLive-layout LoRA file the policy starts from ("": none)'},
    )
    amp: str = field(
        default="none",
        metadata={"help": "none | bf16: rollout, replay and evaluation under bfloat16 autocast"},
    )
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the policy's blocks in backward (less memory)"}
    )
    ema: float = field(
        default=0.0,
        metadata={"help": "EMA decay of the policy's weights (0: none; the public recipe: 0.999)"},
    )
    # Reporting.
    eval_prompts: int = field(default=16, metadata={"help": "held-out prompts, never trained on"})
    eval_seeds: int = field(
        default=4,
        metadata={"help": "fixed noises per held-out prompt (one sample is a noisy estimate)"},
    )
    eval_batch: int = field(
        default=0,
        metadata={"help": "evaluation videos made at a time on each rank (0: all at once)"},
    )
    eval_multi_prompt: bool = field(
        default=False, metadata={"help": "also the held-out prompts turning 90 degrees mid-video"}
    )
    eval_every: int = field(
        default=10, metadata={"help": "held-out evaluation every this many iterations"}
    )
    eval_before: bool = field(
        default=True,
        metadata={"help": "also before the first iteration (the baseline; step 0 of loggers)"},
    )
    save_every: int = field(default=10, metadata={"help": "checkpoint every this many iterations"})
    # minutes from train()'s start (loading and the first evaluation included)
    max_minutes: float = field(
        default=0.0,
        metadata={"help": "stop, saved, before an iteration would end past this (0: never)"},
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "also keep each one as checkpoints/step_N.safetensors"}
    )
    keep_last: int = field(
        default=0,
        metadata={"help": "with keep_checkpoints: only the newest N step_N files (0: every one)"},
    )
    # best.safetensors: the training state at the best value yet of this held-out metric
    keep_best: str = field(
        default="",
        metadata={"help": 'an eval metric: eval_reward, eval_ema_reward, ... ("": none)'},
    )
    samples: bool = field(
        default=True, metadata={"help": "before/after GIF and MP4 of the evaluation prompts"}
    )
    samples_at_eval: bool = field(
        default=False,
        metadata={"help": "each eval's samples/step_N.gif, group_N.{gif,json}: branches"},
    )
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})
    profile_iteration: int = field(
        default=-1, metadata={"help": "torch.profiler trace of this iteration to out_dir/profile"}
    )
    log_to: str = field(
        default="",
        metadata={"help": 'also log to tensorboard, wandb, or both: "tensorboard,wandb"'},
    )
    wandb_project: str = field(
        default="kvpo",
        metadata={"help": "the W&B project of log_to=wandb (WANDB_MODE=offline: on disk)"},
    )

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value cannot run."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"config {name}={getattr(self, name)!r}: {why}")

        for name in (
            "wan_frames",
            "wan_chunk_frames",
            "iterations",
            "prompts_per_iter",
            "group_size",
            "epochs",
            "eval_prompts",
            "eval_seeds",
            "eval_every",
            "save_every",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.group_size < 2:
            raise bad("group_size", "must be >= 2 (advantages are relative within a group)")
        for name in ("lr", "tau", "grad_clip", "adv_clip", "sde_noise", "sigma_floor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "must be a finite number > 0")
        for name in (
            "weight_decay",
            "kl_coef",
            "adv_eps",
            "clip_low",
            "clip_high",
            "threads",
            "lora_rank",
            "lora_alpha",
            "wan_sink_frames",
            "max_minutes",
            "tau_auto",
            "log_ratio_clamp",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "must be a finite number >= 0")
        for name, unit in (
            ("window_shift", ""),
            ("max_skipped_steps", ""),
            ("micro_batch", " (0: all at once)"),
            ("eval_batch", " (0: all at once)"),
            ("reward_batch", " (0: all at once)"),
            ("replay_branches", " (0: all at once)"),
            ("rollout_branches", " (0: all at once)"),
            ("lr_warmup", " (iterations)"),
            ("log_prob_grad_steps", " (0: all steps)"),
            ("old_policy_sync", " (0: none)"),
            ("route_pool", " (0: all history)"),
            ("segment_clip", " (0: the whole segment)"),
            ("keep_last", " (0: every checkpoint)"),
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be an integer >= 0" + unit)
        if not isinstance(self.keep_best, str) or (
            self.keep_best and not self.keep_best.startswith("eval_")
        ):
            raise bad("keep_best", "must name a held-out metric (eval_reward, ...) or be empty")
        if not isinstance(self.profile_iteration, int) or self.profile_iteration < -1:
            raise bad("profile_iteration", "must be an iteration (>= 0), or -1 for none")
        if self.keep_last and not self.keep_checkpoints:  # it would keep nothing
            raise bad("keep_last", "needs keep_checkpoints=true (the step_N files it limits)")
        if self.samples_at_eval and not self.samples:  # it would write nothing
            raise bad("samples_at_eval", "needs samples=true (the evaluations' videos)")
        if self.profile_iteration >= self.iterations:  # it would never be traced
            raise bad("profile_iteration", f"must be below iterations={self.iterations} (-1: none)")
        if self.wan_dtype not in ("fp32", "bf16"):
            raise bad("wan_dtype", "must be 'fp32' or 'bf16'")
        if self.lora_init and not self.lora_rank:
            raise bad("lora_init", "loads into LoRA adapters: set lora_rank to the file's rank")
        if self.wan_dtype == "bf16" and not self.lora_rank:
            raise bad("wan_dtype", "bf16 weights train only through LoRA adapters: set lora_rank")
        if self.routing not in ("drop", "sample", "shifted"):
            raise bad("routing", "must be 'drop', 'sample' or 'shifted'")
        if self.protect not in ("skip", "halve"):
            raise bad("protect", "must be 'skip' or 'halve'")
        if self.protect == "halve" and self.advantage == "group":
            raise bad("protect", "'halve' gates anchor-relative advantages: set advantage")
        if self.log_prob_grad_steps and (self.likelihood == "branch" or self.explore == "sde"):
            raise bad("log_prob_grad_steps", "needs likelihood 'step' or 'x0' (per-step terms)")
        if self.likelihood == "x0" and self.tau_auto:
            raise bad("tau_auto", "likelihood 'x0' is the public recipe's, at tau = 1: set 0")
        if self.score_stream and self.score_after_window:
            raise bad("score_stream", "and score_after_window both say where scoring ends")
        if self.streaming_chunk is not None and (
            len(self.streaming_chunk) != 2 or min(self.streaming_chunk) < 1
        ):
            raise bad("streaming_chunk", "must be two positive chunk counts: first, later")
        if any(not isinstance(j, int) or j < 1 for j in self.switch_chunks) or list(
            self.switch_chunks
        ) != sorted(set(self.switch_chunks)):
            raise bad("switch_chunks", "must be increasing chunk indices >= 1")
        if not isinstance(self.recent_frames, int) or self.recent_frames < 1:
            raise bad("recent_frames", "must be a positive integer")
        if self.local_window is not None and (
            not isinstance(self.local_window, int) or self.local_window < 1
        ):
            raise bad("local_window", "must be a positive integer or None (the checkpoint's)")
        if not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise bad("ema", "must be a decay in [0, 1) (0: no EMA)")
        if self.recache is not None:
            try:
                self.recache = recache_policy(self.recache)
            except ValueError:
                raise bad(
                    "recache",
                    f"must be one of {', '.join(RECACHE_POLICIES)}, true, false or None "
                    "(the generator's)",
                ) from None
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise bad("sampler", f"must be one of {', '.join(SAMPLERS)} or None (the generator's)")
        if not 0.0 <= self.p_keep <= 1.0:
            raise bad("p_keep", "must be in [0, 1]")
        if not 0.0 <= self.multi_prompt <= 1.0:
            raise bad("multi_prompt", "must be in [0, 1]")
        if self.clip_low >= 1:
            raise bad("clip_low", "must be < 1")
        if self.lr_schedule not in ("constant", "cosine", "public"):
            raise bad("lr_schedule", "must be 'constant', 'cosine' or 'public'")
        if self.advantage not in ("group", "anchor", "public"):
            raise bad("advantage", "must be 'group', 'anchor' or 'public'")
        if self.kl not in ("velocity", "softmax", "none"):
            raise bad("kl", "must be 'velocity', 'softmax' or 'none'")
        if self.explore not in ("routing", "sde"):
            raise bad("explore", "must be 'routing' (KVPO) or 'sde' (the Flow-GRPO baseline)")
        if self.explore == "sde" and self.kl == "softmax":
            raise bad(
                "kl",
                "'softmax' is the KL of KVPO's branch softmax: with explore='sde' use "
                "'velocity' or 'none'",
            )
        if self.explore == "sde" and self.tau_auto:
            raise bad(
                "tau_auto",
                "sets KVPO's Gibbs temperature: explore='sde' has none (its "
                "likelihood is Gaussian), set it to 0",
            )
        if self.likelihood not in ("branch", "step", "x0"):
            raise bad("likelihood", "must be 'branch', 'step' or 'x0'")
        if self.step_weighting not in ("uniform", "sigma"):
            raise bad("step_weighting", "must be 'uniform' or 'sigma'")
        if self.amp not in ("none", "bf16"):
            raise bad("amp", "must be 'none' or 'bf16' (fp16 would need loss scaling)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "must be 'auto', 'cpu' or 'cuda'")
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise bad("window", "must be two chunk indices [w0, w1) with w0 < w1")
        if len(self.wan_size) != 2 or min(self.wan_size) < 1:
            raise bad("wan_size", "must be the video's height and width, two positive integers")
        scopes = self.reward_scopes
        if (
            not isinstance(scopes, dict)
            or not scopes
            or not set(scopes) <= set(REWARD_SCOPES)
            or not all(math.isfinite(w) and w >= 0 for w in scopes.values())
            or not any(scopes.values())
        ):
            raise bad(
                "reward_scopes",
                f"must map some of {REWARD_SCOPES} to finite weights >= 0, not all 0",
            )
        try:
            parse_log_to(self.log_to)
        except ValueError as e:
            raise bad("log_to", str(e)) from None
        if not isinstance(self.reward_weights, dict) or not self.reward_weights:
            raise bad("reward_weights", "must be a non-empty mapping of reward name to weight")
        if not isinstance(self.reward_fns, dict):
            raise bad("reward_fns", "must be a mapping of reward name to 'module:fn'")
        for name, spec in self.reward_fns.items():
            if name in BUILTIN or name == "clip":
                raise bad("reward_fns", f"{name!r} is a built-in reward's name: choose another")
            try:
                split_reward_spec(spec)
            except ValueError as e:
                raise bad("reward_fns", str(e)) from None

    def to_dict(self) -> dict:
        """The fields as plain JSON/YAML values (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["window"] = list(self.window)
        d["score_steps"] = None if self.score_steps is None else list(self.score_steps)
        d["switch_chunks"] = list(self.switch_chunks)
        if self.streaming_chunk is not None:
            d["streaming_chunk"] = list(self.streaming_chunk)
        return d


def _type_text(hint) -> str:
    """A field's type as its annotation reads: ``int``, ``tuple[int, int]``, ``int | None``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _coerce(name: str, value, hint) -> object:
    """Convert a YAML/CLI value to the field's type, with an error naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and (origin in (typing.Union, types.UnionType)) and type(None) in args:
        return None
    given = value
    try:
        scalar = [a for a in args if a in (bool, int, float, str)]
        if origin in (typing.Union, types.UnionType) and scalar:
            hint = scalar[0]  # ``X | None``: None was handled above
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        if origin is tuple or (
            origin in (typing.Union, types.UnionType)
            and tuple in [typing.get_origin(a) for a in args]
        ):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            return tuple(int(v) for v in value)
        if origin is dict:
            if isinstance(value, str):
                value = dict(kv.split("=", 1) for kv in value.split(",") if kv.strip())
            kind = args[1] if len(args) == 2 else float  # dict[str, float] or dict[str, str]
            return {str(k): kind(v) for k, v in dict(value).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {name}: cannot read {given!r} as {_type_text(hint)}") from e
    return value


def build_config(overrides: dict) -> TrainConfig:
    """A validated config from a mapping (YAML contents and CLI overrides)."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        close = {k: difflib.get_close_matches(k, hints, n=1) for k in unknown}
        if all(close.values()):  # typos: name the fields meant, not all 80
            meant = ", ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items())
            raise ValueError(f"unknown config field(s) {unknown} ({meant})")
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(hints)}")
    cfg = TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in overrides.items()})
    cfg.validate()
    return cfg


def parse_args(
    argv: list[str] | None = None,
    prog: str = "python -m kvpo.train",
    description: str = "KVPO training of a streaming AR video generator.",
) -> TrainConfig:
    """``--config file.yaml`` then ``--field value`` overrides (``--window 2,4``,
    ``--reward_weights alignment=1,visual=0.5``); ``prog`` and ``description`` are the command's
    that reads them (its usage and errors name it)."""
    hints = typing.get_type_hints(TrainConfig)
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", type=Path, help="YAML file of config fields")
    defaults = TrainConfig().to_dict()
    for f in dataclasses.fields(TrainConfig):
        kind = _type_text(hints[f.name])
        ap.add_argument(
            f"--{f.name}",
            dest=f.name,
            default=None,
            metavar=kind.upper().replace(" ", ""),
            # argparse formats help with %
            help=f"{f.metadata['help'].replace('%', '%%')} (default: {defaults[f.name]})",
        )
    args = vars(ap.parse_args(argv))
    values: dict = {}
    path = args.pop("config")
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"--config {str(path)!r}: cannot read YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {str(path)!r} must hold a mapping of config fields")
        values.update(loaded)
    for k, v in args.items():
        if v is not None:
            if hints[k] is not str and v.lower() in ("none", "null"):
                v = None
            values[k] = v
    return build_config(values)
