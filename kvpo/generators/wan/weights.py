"""Wan2.1's weights in and out of kvpo: a local diffusers directory, checkpoints in Wan's original
layout (Self-Forcing, LongLive, CausVid), a Wan run's training checkpoint, and the export of a
trained transformer back to diffusers' layout (LoRA merged, or the LoRA alone) or to the original
layout (LoRA merged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpo.generators import lora
from kvpo.generators.wan.generator import WAN_DTYPES, WanStreamingGenerator

WAN_FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")  # what load_wan reads


def load_original_weights(
    transformer: nn.Module, path: str | Path, key: str = "generator_ema"
) -> None:
    """Load weights in Wan's original layout into a diffusers ``WanTransformer3DModel``.

    ``path``: ``.safetensors`` or a torch checkpoint (read with ``weights_only=True``) of the
    Wan2.1 release or of a model distilled from it: Self-Forcing's and LongLive's
    ``{"generator": ..., "generator_ema": ...}`` (``key`` picks one) with their ``model.``
    prefix, CausVid's, or a bare state dict. Prefixes shared by every key (``model.``,
    ``diffusion_model.``, ``module.`` from DDP, ``_orig_mod.`` from torch.compile) are stripped;
    diffusers' converter renames the rest; every parameter must be matched (strict)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Wan checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not all(torch.is_tensor(v) for v in sd.values()):
        if not isinstance(sd.get(key), dict):
            raise ValueError(
                f"Wan checkpoint {str(path)!r} holds {sorted(sd)[:8]}, no state dict under "
                f"key {key!r}"
            )
        sd = sd[key]
    prefixes = ("module.", "_orig_mod.", "model.", "diffusion_model.")
    while sd and (p := next((p for p in prefixes if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(p) :]: v for k, v in sd.items()}
    converted = convert_wan_transformer_to_diffusers(dict(sd))
    missing, unexpected = transformer.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Wan checkpoint {str(path)!r} does not fit the transformer: missing "
            f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )


def load_wan(
    root: str | Path,
    num_frames: int = 21,
    chunk_frames: int = 3,
    sink_frames: int = 0,
    local_window: int | None = None,
    size: tuple[int, int] = (480, 832),
    device: str | torch.device = "cpu",
    text_dtype: torch.dtype | None = torch.bfloat16,
    max_text_len: int = 512,
    transformer_checkpoint: str | Path | None = None,
    checkpoint_key: str = "generator_ema",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> WanStreamingGenerator:
    """A :class:`WanStreamingGenerator` from a local diffusers Wan2.1 text-to-video directory
    (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, as
    ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` ships them; nothing is downloaded).

    The text encoder (UMT5) runs in ``text_dtype`` and returns ``max_text_len`` token embeddings
    with the padding zeroed, as Wan's pipeline does; ``decode`` undoes the VAE's latent
    normalization and decodes ``[N, T, C, h, w]`` latents to ``[N, 1 + 4 (T - 1), 3, H, W]``
    video in [-1, 1]. ``size`` is the video's (H, W). ``transformer_checkpoint`` replaces the
    directory's transformer weights by a checkpoint in Wan's original layout (Self-Forcing's
    ``self_forcing_dmd.pt``, LongLive's base; :func:`load_original_weights`, ``checkpoint_key``
    picks its EMA or raw generator). ``dtype`` is the transformer's (``torch.bfloat16`` halves a
    frozen base under LoRA; the modules diffusers keeps in float32 stay so). The remaining
    keyword arguments go to
    :class:`WanStreamingGenerator` (``steps``, ``shift``, ``recache``).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(root)
    check_wan_dir(root, "load_wan: root")
    device = torch.device(device)
    local = dict(local_files_only=True)
    tf = WanTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=dtype, **local
    )
    if transformer_checkpoint is not None:
        load_original_weights(tf, transformer_checkpoint, checkpoint_key)
    tf = tf.to(device)
    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", **local).to(device)
    t5 = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=text_dtype, **local)
    t5 = t5.to(device).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer", **local)
    vae.eval().requires_grad_(False)
    s, st = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    H, W = size
    if H % s or W % s:
        raise ValueError(f"size {tuple(size)} must be a multiple of the VAE's {s}x compression")
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def text_encoder(prompts: list[str]) -> torch.Tensor:
        ids = tok(
            prompts,
            padding="max_length",
            max_length=max_text_len,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        h = t5(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        return (h * ids.attention_mask[..., None]).to(tf.proj_out.weight.dtype)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        # One video at a time: the VAE's activations are GBs per 480p video, a group's G videos
        # at once would multiply them, and one video already fills the GPU.
        videos = []
        for z in latents.split(1):
            x = z.transpose(1, 2).to(vae.dtype) * std + mean
            videos.append(vae.decode(x).sample.transpose(1, 2).clamp(-1, 1).to(latents.dtype))
        return torch.cat(videos)

    @torch.no_grad()
    def encode(video: torch.Tensor) -> torch.Tensor:
        x = vae.encode(video.transpose(1, 2).to(vae.dtype)).latent_dist.mode()
        return ((x - mean) / std).transpose(1, 2).to(video.dtype)

    return WanStreamingGenerator(
        tf,
        text_encoder,
        (z, H // s, W // s),
        num_frames,
        chunk_frames,
        sink_frames,
        local_window,
        decode=decode,
        encode=encode,
        temporal_stride=st,
        **kwargs,
    )


def check_wan_dir(root: str | Path, what: str) -> None:
    """A ValueError naming ``what`` (``"config wan_dir"``) unless ``root`` has a diffusers Wan2.1
    directory's folders; it reads nothing else, so a run checks it before loading anything."""
    missing = [d for d in WAN_FOLDERS if not (Path(root) / d).is_dir()]
    if missing:
        raise ValueError(
            f"{what}={str(root)!r} lacks the diffusers folders {missing} (a local Wan2.1 "
            f"text-to-video directory: {', '.join(d + '/' for d in WAN_FOLDERS)})"
        )


def load_from_config(
    cfg: dict,
    device: str | torch.device = "cpu",
    root: str | Path | None = None,
    original_weights: bool = True,
) -> WanStreamingGenerator:
    """The generator a trainer config's ``wan_*`` fields (and its deployment context:
    ``local_window``, ``recache``, ``global_sink``, ``sampler``, each where set) describe, from
    ``root`` or the config's ``wan_dir``; ``original_weights``: also load ``wan_checkpoint``."""
    checkpoint = cfg.get("wan_checkpoint") if original_weights else None
    context = {k: cfg[k] for k in ("recache", "global_sink", "sampler") if cfg.get(k) is not None}
    return load_wan(
        root or cfg["wan_dir"],
        cfg["wan_frames"],
        cfg["wan_chunk_frames"],
        cfg["wan_sink_frames"],
        cfg.get("local_window"),
        size=tuple(cfg["wan_size"]),
        device=device,
        transformer_checkpoint=checkpoint or None,
        checkpoint_key=cfg.get("wan_checkpoint_key", "generator_ema"),
        dtype=WAN_DTYPES[cfg.get("wan_dtype", "fp32")],
        **context,
    )


def from_checkpoint(
    path: str | Path,
    ema: bool = False,
    wan_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> WanStreamingGenerator:
    """The generator a ``--wan_dir`` training checkpoint holds (its EMA with ``ema=True``):
    built from the run's Wan directory (``wan_dir`` overrides the path it recorded) and shape,
    with the run's LoRA adapters, and the checkpoint's weights loaded."""
    from kvpo.run.checkpoint import CheckpointError, load_model, trainer_config

    cfg = trainer_config(path)
    root = wan_dir or cfg.get("wan_dir")
    if not root:
        raise CheckpointError(f"checkpoint {str(path)!r} was not trained with --wan_dir")
    # the checkpoint holds every weight: the original-layout ones need not be read first
    gen = load_from_config(cfg, device, root, original_weights=False)
    if cfg.get("lora_rank"):
        gen.add_lora(cfg["lora_rank"], cfg.get("lora_alpha") or None)
    return load_model(path, ema=ema, module=gen).to(device).eval()


def export(
    path: str | Path, out: str | Path, ema: bool = False, wan_dir: str | Path | None = None
) -> Path:
    """Write the transformer of a ``--wan_dir`` training checkpoint, LoRA merged, as a diffusers
    ``WanTransformer3DModel`` directory (``from_pretrained(out)``; it replaces the
    ``transformer/`` folder of a Wan2.1 pipeline)."""
    gen = from_checkpoint(path, ema, wan_dir)
    lora.merge_lora(gen)
    gen.transformer.save_pretrained(str(out))
    return Path(out)


# diffusers' names -> those of Wan2.1's original WanModel, applied in order
_ORIGINAL_NAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),
    (".scale_shift_table", ".modulation"),
    ("proj_out", "head.head"),
)


def to_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``WanTransformer3DModel`` state dict in the names of Wan2.1's original
    ``WanModel`` (those of the Wan release and of Self-Forcing, CausVid and LongLive checkpoints):
    self_attn / cross_attn with q, k, v, o; ffn.0 / ffn.2; the cross-attention norm is norm3;
    modulation tables; head.head; *_embedding.N. The inverse of diffusers'
    ``convert_wan_transformer_to_diffusers`` (what :func:`load_original_weights` applies)."""
    out = {}
    for k, v in sd.items():
        for a, b in _ORIGINAL_NAMES:
            k = k.replace(a, b)
        out["head.modulation" if k == "scale_shift_table" else k] = v
    return out


def export_original(
    path: str | Path, out: str | Path, ema: bool = False, wan_dir: str | Path | None = None
) -> Path:
    """Write the transformer of a ``--wan_dir`` training checkpoint, LoRA merged, in Wan2.1's
    original layout, for the inference code of Self-Forcing, CausVid or LongLive: ``out.pt`` holds
    ``{"generator": sd, "generator_ema": sd}`` with their ``model.`` prefix (either key loads,
    ``--use_ema`` or not); ``out.safetensors`` the bare state dict, as the Wan release ships it.
    The weights keep the transformer's dtype."""
    out = Path(out)
    if out.suffix not in (".pt", ".safetensors"):
        raise ValueError(f"out {str(out)!r}: a .pt (Self-Forcing / LongLive) or .safetensors file")
    gen = from_checkpoint(path, ema, wan_dir)
    lora.merge_lora(gen)
    sd = {
        k: v.detach().contiguous()
        for k, v in to_original_layout(gen.transformer.state_dict()).items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out))
    else:
        prefixed = {f"model.{k}": v for k, v in sd.items()}
        torch.save({"generator": prefixed, "generator_ema": prefixed}, str(out))
    return out


# the file name diffusers' load_lora_weights(directory) reads
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _checkpoint_lora(path: str | Path, ema: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA adapters of a ``--wan_dir`` training checkpoint (its EMA's with ``ema``):
    transformer layer name -> (A [rank, in], B [out, rank] with the scale ``alpha / rank`` folded
    in). Reads the checkpoint alone: no Wan directory needed."""
    from safetensors import safe_open

    from kvpo.run.checkpoint import CheckpointError, checkpoint_file, trainer_config

    cfg = trainer_config(path)
    if not cfg.get("wan_dir"):
        raise CheckpointError(f"checkpoint {str(path)!r} was not trained with --wan_dir")
    rank = cfg.get("lora_rank") or 0
    if not rank:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no LoRA adapters (trained without --lora_rank): "
            "export the whole transformer instead"
        )
    scale = (cfg.get("lora_alpha") or rank) / rank
    prefix = "ema.transformer." if ema else "model.transformer."
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(checkpoint_file(path)), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix) and key.endswith((".lora_a", ".lora_b")):
                layer, which = key[len(prefix) :].rsplit(".", 1)
                parts.setdefault(layer, {})[which] = f.get_tensor(key)
    if not parts:
        what = "EMA " if ema else ""
        raise CheckpointError(f"checkpoint {str(path)!r} holds no {what}LoRA adapters")
    return {k: (p["lora_a"], p["lora_b"] * scale) for k, p in parts.items()}


def export_lora(path: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the LoRA adapters of a ``--wan_dir`` training checkpoint (its EMA's with ``ema``) in
    diffusers' PEFT layout: ``out/pytorch_lora_weights.safetensors`` with
    ``transformer.<layer>.lora_A.weight`` [rank, in] and ``lora_B.weight`` [out, rank], the
    scale ``alpha / rank`` folded into ``lora_B`` (so any loader's default alpha = rank is
    right). diffusers adds them to the base transformer the run trained on with
    ``WanPipeline.load_lora_weights(out)``, or
    ``WanTransformer3DModel.load_lora_adapter(out, weight_name="pytorch_lora_weights.safetensors")``
    (diffusers 0.42 refuses a directory without ``weight_name`` there)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, (a, b) in _checkpoint_lora(path, ema).items():
        tensors[f"transformer.{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{layer}.lora_B.weight"] = b.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / LORA_WEIGHT_NAME))
    return out / LORA_WEIGHT_NAME


# LongLive's lora.pt: {"generator_lora": peft state dict of its CausalWanModel}
LONGLIVE_LORA_KEY = "generator_lora"
PEFT_PREFIX = "base_model.model."


def _original_layer(layer: str) -> str:
    """A transformer layer's name (``blocks.0.attn1.to_q``) in Wan's original layout
    (``blocks.0.self_attn.q``)."""
    return next(iter(to_original_layout({layer + ".weight": None})))[: -len(".weight")]


def read_longlive_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """LongLive's LoRA file (its ``lora.pt``, or a bare peft state dict) as original-layout
    layer names ``blocks.N.self_attn.q.lora_A.weight`` -> tensor (peft's prefix stripped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LongLive LoRA {str(path)!r} is not a file")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get(LONGLIVE_LORA_KEY), dict):
        sd = sd[LONGLIVE_LORA_KEY]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(
            f"LongLive LoRA {str(path)!r} holds no peft state dict (a dict of tensors, or one "
            f"under {LONGLIVE_LORA_KEY!r})"
        )
    return {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in sd.items()}


def load_longlive_lora(
    gen: WanStreamingGenerator, path: str | Path, alpha: float | None = None
) -> int:
    """Load LongLive's LoRA (``lora.pt``, :func:`read_longlive_lora`) into the adapters of ``gen``
    (:meth:`WanStreamingGenerator.add_lora` of the file's rank first). ``alpha`` is the file's
    (LongLive's ``adapter.alpha``; None: its rank, as LongLive's release); ``lora_B`` is rescaled
    to the adapters' own ``alpha / rank``, so ``gen`` computes what LongLive does. Every adapter
    must be in the file and every key of the file used. Returns how many layers."""
    sd = read_longlive_lora(path)
    layers = {
        _original_layer(name): m
        for name, m in gen.transformer.named_modules()
        if isinstance(m, lora.LoRALinear)
    }
    if not layers:
        raise ValueError(
            f"load_longlive_lora: {type(gen).__name__} has no LoRA adapters (add_lora)"
        )
    used = set()
    for name, m in layers.items():
        a, b = sd.get(f"{name}.lora_A.weight"), sd.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"LongLive LoRA {str(path)!r} has no {name}.lora_A / lora_B")
        if a.shape != m.lora_a.shape or b.shape != m.lora_b.shape:
            raise ValueError(
                f"LongLive LoRA {str(path)!r}: {name} is A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"the adapter is A {tuple(m.lora_a.shape)}, B {tuple(m.lora_b.shape)} (lora_rank "
                f"must be the file's rank, {a.shape[0]})"
            )
        file_scale = (a.shape[0] if alpha is None else alpha) / a.shape[0]
        with torch.no_grad():
            m.lora_a.copy_(a)
            m.lora_b.copy_(b.to(m.lora_b.dtype) * (file_scale / m.scale))
        used |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"LongLive LoRA {str(path)!r} has keys no adapter takes: {extra[:4]}")
    return len(layers)


def export_longlive_lora(path: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the LoRA adapters of a ``--wan_dir`` training checkpoint (its EMA's with ``ema``) in
    LongLive's layout, ``out`` = ``{"generator_lora": {"base_model.model.blocks.N.self_attn.q.
    lora_A.weight": ...}}``, the scale folded into ``lora_B``: LongLive's inference loads it
    (``lora_ckpt``) with ``adapter: {rank: R, alpha: R}`` on the base the run trained on."""
    sd = {}
    for layer, (a, b) in _checkpoint_lora(path, ema).items():
        name = PEFT_PREFIX + _original_layer(layer)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({LONGLIVE_LORA_KEY: sd}, str(out))
    return out
