"""Small models and prompts shared by the trainer tests."""

import random
import socket
from pathlib import Path

import torch

from kvpo.generators import data
from kvpo.generators.model import ModelConfig, TinyARVideo


def free_port() -> str:
    """A TCP port no process listens on now (the OS picks it), so tests that start torchrun
    never collide with each other or with another job on a loaded machine."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def tiny_model(seed: int = 0, **overrides) -> TinyARVideo:
    """A small generator whose zero-initialised output layers are randomised, so that its
    velocities depend on the context (a freshly initialised adaLN-zero model ignores it)."""
    torch.manual_seed(seed)
    cfg = dict(
        frame_size=8,
        patch=4,
        num_frames=10,
        chunk_frames=2,
        dim=32,
        depth=2,
        heads=2,
        kv_heads=1,
        steps=3,
        shift=2.0,
    )
    cfg.update(overrides)
    model = TinyARVideo(ModelConfig(**cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.1)
    return model.eval()


def run_overrides(base: str, out, **kw) -> dict:
    """Config fields of a seconds-long training run of the checkpoint ``base`` into ``out``."""
    over = dict(
        base_checkpoint=base,
        out_dir=str(out),
        iterations=2,
        prompts_per_iter=2,
        group_size=3,
        eval_prompts=2,
        eval_every=1,
        save_every=1,
        progress=False,
        threads=1,
        tau=0.05,
        window=(2, 4),
    )
    over.update(kw)
    return over


def straight_and_resumed(base: str, out, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The policies of a 3-iteration run of ``kw`` made straight through, and of the same run
    resumed in this process from its checkpoint after 2 iterations (run dirs under ``out``)."""
    from kvpo.run.config import build_config
    from kvpo.trainer import train

    kw = dict(kw, iterations=3)
    straight = train(build_config(run_overrides(base, out / "a", **kw)))
    train(build_config(run_overrides(base, out / "b", keep_checkpoints=True, **kw)))
    second = out / "b" / "checkpoints" / "step_000002.safetensors"
    resumed = train(build_config(run_overrides(base, out / "c", resume=str(second), **kw)))
    return straight.model, resumed.model


def checkpoint_meta(path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint (iteration, history, optimizer scalars, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def cli_args(over: dict) -> list[str]:
    """``--field=value`` command-line arguments of config fields (tuples comma-joined)."""
    return [
        f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in over.items()
    ]


PROMPTS = ["a large red circle moving left slowly", "a small blue square moving up quickly"]


def small_rollout(model: TinyARVideo, p_keep: float, **kw):
    """Two prompts x 3 branches, window chunks [2, 4), every chunk from the window on scored."""
    from kvpo.method.rollout import RolloutSpec, rollout

    nC = model.num_frames // model.chunk_frames
    spec = RolloutSpec(group_size=3, window=(2, 4), p_keep=p_keep, score_after_window=True, **kw)
    return rollout(model, [[p] * nC for p in PROMPTS], spec, torch.Generator().manual_seed(0))


def word_tokenizer(words: list[str]):
    """A transformers fast tokenizer over whole words ([PAD] = 0, [UNK] = 1), built here."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def tiny_clip(path):
    """A randomly initialised CLIP of a few k parameters saved to ``path`` with its tokenizer."""
    import transformers

    fast = word_tokenizer(data.vocabulary())
    cfg = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(fast),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


class OwnGenerator(torch.nn.Module):
    """A user's generator: only the StreamingVideoGenerator protocol, none of the built-in one's
    extras (config, set_local_window, LoRA, checkpointing switch)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        for name in ("num_frames", "chunk_frames", "frame_tokens", "token_dim", "sink_frames"):
            setattr(self, name, getattr(inner, name))
        self.local_window = inner.local_window

    def encode_prompts(self, prompts):
        return self.inner.encode_prompts(prompts)

    def forward(self, x, t, cond, frame_index, table, cache=None, slots=None):
        return self.inner(x, t, cond, frame_index, table, cache, slots)

    def new_cache(self, capacity, device="cpu"):
        return self.inner.new_cache(capacity, device)

    def to_tokens(self, video):
        return self.inner.to_tokens(video)

    def to_video(self, tokens):
        return self.inner.to_video(tokens)

    def timesteps(self):
        return self.inner.timesteps()


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, theirs, and so on (a job's torchrun and its ranks), as
    /proc lists them now: none of one that has ended."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in (c, *descendants(c))]


# Trainer options drawn together at random, as users combine them (test_option_combinations.py on
# the built-in generator, test_wan.py on the Wan adapter).
OPTIONS = {
    "group_size": [2, 3, 4],
    "rollout_branches": [0, 1, 2],
    "window": [(1, 3), (2, 4), (1, 5), (3, 5)],
    "window_shift": [0, 1],
    "p_keep": [0.3, 0.7],
    "multi_prompt": [0.0, 0.5, 1.0],
    "recache": [None, True],
    "score_after_window": [False, True],
    "score_steps": [None, (0,), (0, 1), (2,)],
    "kl_prefix": [False, True],
    "step_weighting": ["uniform", "sigma"],
    "likelihood": ["branch", "step"],
    "group_normalize": [True, False],
    "reward_scopes": [{"video": 1.0}, {"local": 1.0, "global": 0.5}, {"global": 1.0}],
    "advantage": ["group", "anchor"],
    "epochs": [1, 2],
    "replay_branches": [0, 1, 2],
    "micro_batch": [0, 1],
    "prompts_per_iter": [2, 3],
    "lr_warmup": [0, 2],
    "lr_schedule": ["constant", "cosine"],
    "kl": ["velocity", "softmax", "none"],
    "lora_rank": [0, 2],
    "amp": ["none", "bf16"],
    "grad_checkpointing": [False, True],
    "ema": [0.0, 0.9],
    "eval_batch": [0, 3],
    "eval_multi_prompt": [False, True],
    "reward_batch": [0, 5],
    "samples_at_eval": [False, True],
    "tau_auto": [0.0, 1.0],
}


def draw(seed: int) -> dict:
    """About half the options, each at a random value; then what makes the draw a run that
    explores: sample routing on a local window whose history overflows it, the SDE baseline
    with its own KL and no tau_auto."""
    rng = random.Random(seed)
    over = {k: rng.choice(v) for k, v in OPTIONS.items() if rng.random() < 0.5}
    window = over.setdefault("window", (2, 4))  # run_overrides' (the default needs 6 chunks)
    over["window_shift"] = min(over.get("window_shift", 0), 5 - window[1])
    if rng.random() < 0.3:
        over.update(routing="sample", local_window=2, recent_frames=1, window=(3, 5))
        over["window_shift"] = 0
    if rng.random() < 0.2:
        over["explore"] = "sde"
        if over.get("kl") == "softmax":
            over["kl"] = "velocity"
        over.pop("tau_auto", None)  # the SDE baseline has no Gibbs temperature
    return over
