"""The policy a run trains and the frozen reference it stays near: the base generator (the
built-in one or the caller's) copied, given LoRA adapters if asked, or loaded from a checkpoint to
resume; its AdamW and EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from kvpo.generators.ema import ParamEMA
from kvpo.run.checkpoint import CheckpointError, load_model, load_training
from kvpo.run.config import ConfigError, TrainConfig, config_errors


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the update trains (those that require grad: all, or the LoRA adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`trainable` parameters with the config's rate and weight decay."""
    return torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_context(cfg: TrainConfig, model: nn.Module) -> None:
    """The deployment context the config asks for (local window, KV re-cache, sampler), if it
    asks; the built-in generator also records it in its saved config."""
    for name in ("local_window", "recache", "global_sink", "sampler"):
        value = getattr(cfg, name)
        if value is not None:
            setter = getattr(model, f"set_{name}", None)
            if setter is not None:
                setter(value)
            else:
                setattr(model, name, value)


def reference_and_policy(
    cfg: TrainConfig, device: torch.device, generator: nn.Module | None = None
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, ParamEMA | None, int, list[dict]]:
    """The frozen reference policy on ``device`` (a copy of ``generator``, or the built-in one of
    ``cfg.base_checkpoint``, under the config's context), then what :func:`load_policy` gives:
    the policy, its AdamW, its EMA, the iterations done and their log."""
    ref = copy.deepcopy(generator) if generator is not None else load_model(cfg.base_checkpoint)
    if cfg.lora_init:  # the policy the run starts from: the base and its LoRA
        add_lora_init(cfg, ref)
    ref = ref.to(device).requires_grad_(False).eval()
    set_context(cfg, ref)
    return ref, *load_policy(cfg, ref, device, generator)


def add_lora_init(cfg: TrainConfig, model: nn.Module) -> None:
    """Adapters of the config's rank on ``model`` holding the LongLive-layout LoRA of
    ``cfg.lora_init`` (:func:`kvpo.generators.wan.load_longlive_lora`)."""
    from kvpo.generators.wan.weights import load_longlive_lora

    if not hasattr(model, "add_lora") or not hasattr(model, "transformer"):
        raise ConfigError(
            f"config lora_init: {type(model).__name__} is not a Wan generator (LongLive's LoRA "
            "layout names Wan's layers)"
        )
    add_seeded_lora(cfg, model)
    with config_errors():
        load_longlive_lora(model, cfg.lora_init)


def add_seeded_lora(cfg: TrainConfig, model: nn.Module) -> None:
    """``model.add_lora`` of the config's rank and alpha, its random adapters drawn from the run's
    seed rather than the process's global RNG, whose state depends on what ran before: the same
    adapters in every run of the config, on every rank, in a fresh process or not."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model.add_lora(cfg.lora_rank, cfg.lora_alpha or None)


def load_policy(
    cfg: TrainConfig, ref: nn.Module, device: torch.device, own: nn.Module | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, ParamEMA | None, int, list[dict]]:
    """The policy to train on ``device`` (a copy of ``ref``, with LoRA adapters if asked, or the
    state of ``cfg.resume``), its AdamW, its EMA (if ``cfg.ema``), the iterations already done
    and their log. ``own``: the caller's generator, when it is not the built-in one: the policy
    and checkpoints load into copies of it, which train the parameters it leaves trainable."""
    if own is not None and cfg.lora_rank and not hasattr(own, "add_lora"):
        raise ConfigError(
            f"config lora_rank: {type(own).__name__} has no add_lora(rank, alpha) method; give "
            "it one, or its adapters (kvpo.generators.lora.add_lora) before passing it"
        )
    if cfg.grad_checkpointing and not hasattr(ref, "grad_checkpointing"):
        raise ConfigError(
            f"config grad_checkpointing: {type(ref).__name__} has no grad_checkpointing switch"
        )

    def blank() -> nn.Module | None:
        """A copy of the caller's generator, with the adapters the config asks for. Under LoRA
        its base stays frozen: it shares the reference's tensors (one copy of a large model's
        weights, not two)."""
        if own is None:
            return None
        memo = None
        if cfg.lora_rank:  # the reference's weights by name (a LoRALinear holds its as .base)
            shared = {n.replace(".base.", "."): p for n, p in ref.named_parameters()}
            memo = {id(o): shared[n.replace(".base.", ".")] for n, o in own.named_parameters()}
        m = copy.deepcopy(own, memo)
        if cfg.lora_init:
            add_lora_init(cfg, m)
        elif cfg.lora_rank:
            add_seeded_lora(cfg, m)
        return m

    start, history, ema_init = 0, [], None
    if cfg.resume:
        model, opt, start, saved, history = load_training(
            cfg.resume, lambda m: make_optimizer(cfg, m.to(device)), blank()
        )
        defaults = TrainConfig().to_dict()  # fields newer than the checkpoint: their defaults
        for key in (
            "group_size",
            "window",
            "base_checkpoint",
            "seed",
            "explore",
            "lora_rank",
            "lora_alpha",
        ):
            if saved.get(key, defaults[key]) != cfg.to_dict()[key]:
                raise CheckpointError(
                    f"--resume {cfg.resume!r} was trained with {key}="
                    f"{saved.get(key)!r}, this config has {cfg.to_dict()[key]!r}"
                )
        if cfg.ema:
            try:
                ema_init = load_model(cfg.resume, ema=True, module=blank())
            except CheckpointError:  # trained without an EMA so far: it starts from the policy
                ema_init = None
    else:
        if own is not None:
            model = blank()
        else:
            model = copy.deepcopy(ref).requires_grad_(True)
            if cfg.lora_rank:
                add_seeded_lora(cfg, model)
        opt = make_optimizer(cfg, model)
    for m in (model, ema_init):
        if m is not None:
            set_context(cfg, m)
    if hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = cfg.grad_checkpointing
    model.to(device).train()
    ema = ParamEMA(model, cfg.ema, ema_init) if cfg.ema else None
    if device.type == "cuda":
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = v.to(device)
    return model, opt, ema, start, history


def old_policy(cfg: TrainConfig, model: nn.Module) -> nn.Module | None:
    """The lagged old policy of ``cfg.old_policy_sync`` (None without): a frozen copy of
    ``model`` that shares its frozen tensors (a LoRA policy's base), synced by
    :func:`sync_old_policy`. A resumed run starts it from the resumed policy."""
    if not cfg.old_policy_sync:
        return None
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo).requires_grad_(False).eval()


def sync_old_policy(old: nn.Module, model: nn.Module) -> None:
    """``old`` takes ``model``'s weights."""
    with torch.no_grad():
        old.load_state_dict(model.state_dict())
