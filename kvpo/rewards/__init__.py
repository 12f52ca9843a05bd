"""Rewards: built-in, weight-free scorers of the procedural videos, and the user reward interface.

A reward is any callable ``fn(videos, prompts) -> [B]`` with ``videos: [B, T, C, H, W]`` float in
[0, 1] and one prompt per video (a string, or a list with one prompt per chunk for multi-prompt
videos). :class:`CompositeReward` combines named rewards with weights and reports each component.

Built-in components (each in [0, 1], higher is better):

* ``alignment`` - the object has the asked colour, shape and size and moves the asked way at the
  asked speed (centroid path against the prompt's displacement);
* ``path`` - that last part alone: the asked direction and speed;
* ``motion`` - smooth, coherent trajectory (small acceleration) and no flicker (stable object area
  and brightness);
* ``visual`` - sharp object edges and a clean, flat background, with an object in every frame.

Generic components, for any video (what a real generator such as Wan2.1 is scored with beside
CLIP; pixel-space stand-ins for VBench's flow- and interpolation-based measures):

* ``dynamic`` - how much the video moves: the mean absolute frame-to-frame change ``d``, as
  ``d / (d + 0.02)`` (0 for a still video, 1/2 at a 2 % mean change);
* ``smoothness`` - ``1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2|``: 1 when every frame is the
  midpoint of its neighbours (uniform motion or none), lower for flicker and jitter.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from kvpo.generators import data

Prompt = str | Sequence[str]

# The fewest frames a built-in reward scores: those that measure motion between frames need a
# clip of several. A user reward says so with a ``min_frames`` attribute (on the function or the
# class); the trainer refuses, as a run starts, a reward scope whose clips are shorter.
MIN_FRAMES = {"alignment": 2, "path": 2, "motion": 3, "dynamic": 2, "smoothness": 3}


@runtime_checkable
class RewardFn(Protocol):
    """What a reward is: any callable of videos and prompts to one score per video."""

    def __call__(self, videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        """videos: [B, T, C, H, W] in [0, 1]; prompts: B entries -> rewards [B] float32."""
        ...


def _check_videos(videos: torch.Tensor, prompts: Sequence[Prompt], min_frames: int = 1) -> None:
    if not torch.is_tensor(videos) or videos.dim() != 5 or not videos.is_floating_point():
        raise ValueError(
            "videos must be a float tensor [B, T, C, H, W], got "
            f"{type(videos).__name__} {tuple(getattr(videos, 'shape', ()))} "
            f"{getattr(videos, 'dtype', '')}"
        )
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")
    if videos.shape[1] < min_frames:
        raise ValueError(
            f"videos {tuple(videos.shape)}: this reward needs at least {min_frames} frames "
            "(it measures motion between frames)"
        )


def _shown(prompt: Prompt) -> str:
    """A video's prompt for a message: its distinct chunk prompts, ``"A | B"``."""
    return prompt if isinstance(prompt, str) else " | ".join(dict.fromkeys(prompt))


class NonFiniteVideoError(ValueError):
    """Videos given to a reward hold NaN or inf values: the generator made them so."""


def _chunk_prompts(prompt: Prompt, T: int) -> list[str]:
    """One prompt per frame."""
    if isinstance(prompt, str):
        return [prompt] * T
    ps = list(prompt)
    per = max(1, math.ceil(T / len(ps)))
    return [ps[min(f // per, len(ps) - 1)] for f in range(T)]


def foreground(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft foreground map [B, T, H, W] in [0, 1] and background colour [B, C].

    The background is the median border colour over all frames; the map is the distance to it over
    the video's largest distance (floored at 0.5), so it stays linear in pixel coverage and
    centroids do not jitter with anti-aliasing."""
    B, T, C, H, W = videos.shape
    border = torch.cat(
        [videos[..., 0, :], videos[..., -1, :], videos[..., :, 0], videos[..., :, -1]], dim=-1
    )  # [B, T, C, 2H+2W]
    bg = border.permute(0, 2, 1, 3).reshape(B, C, -1).median(dim=-1).values
    dist = (videos - bg[:, None, :, None, None]).norm(dim=2)
    # Floored at 0.5 (every prompt colour is >= 0.75 from the background): a faint smudge stays
    # faint instead of being stretched into an object.
    peak = dist.flatten(1).amax(dim=1).clamp_min(0.5)
    return (dist / peak[:, None, None, None]).clamp(0, 1), bg


def _centroids(fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass [B, T, 2] (x, y in pixels, +0.5 centred) and mass [B, T] of a soft map."""
    B, T, H, W = fg.shape
    ys = torch.arange(H, dtype=fg.dtype) + 0.5
    xs = torch.arange(W, dtype=fg.dtype) + 0.5
    mass = fg.sum(dim=(-1, -2)).clamp_min(1e-6)
    cx = (fg.sum(-2) * xs).sum(-1) / mass
    cy = (fg.sum(-1) * ys).sum(-1) / mass
    return torch.stack([cx, cy], dim=-1), mass


ALIGNMENT_PARTS = ("color", "shape", "size", "path")


def alignment_scores(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """[B, 4] scores in [0, 1] of the parts in :data:`ALIGNMENT_PARTS`: the asked colour, shape and
    size, and the asked path (direction and speed of the centroid, chunk by chunk)."""
    _check_videos(videos, prompts, min_frames=MIN_FRAMES["alignment"])
    B, T, C, H, W = videos.shape
    scale = W / 24.0
    fg, _ = foreground(videos)
    cen, mass = _centroids(fg)
    out = torch.zeros(B, len(ALIGNMENT_PARTS))
    for b in range(B):
        per_frame = _chunk_prompts(prompts[b], T)
        first = data.Scene.parse(per_frame[0])
        # Colour: the foreground's mean colour (strongly covered pixels) against the asked one.
        wgt = fg[b] ** 4
        col = (videos[b] * wgt[:, None]).sum(dim=(0, 2, 3)) / wgt.sum().clamp_min(1e-6)
        target = torch.tensor(data.COLORS[first.color])
        color = torch.exp(-((col - target) ** 2).sum() / 0.08)
        # Shape and size: the asked template at the object's centre, against the other shapes.
        radius = data.SIZES[first.size] * scale
        ious = []
        for shape in data.SHAPES:
            tmpl = data.shape_mask(shape, cen[b, :, 0], cen[b, :, 1], radius, W)
            inter = torch.minimum(tmpl, fg[b]).sum(dim=(-1, -2))
            union = torch.maximum(tmpl, fg[b]).sum(dim=(-1, -2)).clamp_min(1e-6)
            ious.append(inter / union)
        ious = torch.stack(ious)  # [shapes, T]
        asked = data.SHAPES.index(first.shape)
        shape = (
            torch.softmax(ious * 20.0, dim=0)[asked].mean() * ious[asked].mean().clamp(0, 1) ** 0.5
        )
        expected_area = data.shape_mask(
            first.shape, torch.tensor([W / 2]), torch.tensor([H / 2]), radius, W
        ).sum()
        size = torch.exp(-(torch.log(mass[b].mean() / expected_area) ** 2) / 0.1)
        # Motion: the centroid's displacement against the asked displacement, per frame step.
        want = torch.zeros(T - 1, 2)
        for f in range(1, T):
            sc = data.Scene.parse(per_frame[f])
            want[f - 1] = (
                torch.tensor(data.DIRECTIONS[sc.direction]) * data.SPEEDS[sc.speed] * scale
            )
        got = cen[b, 1:] - cen[b, :-1]
        err = (got.cumsum(0) - want.cumsum(0)).norm(dim=-1).mean()
        path = torch.exp(-(err**2) / (2.0 * scale) ** 2)
        out[b] = torch.stack([color, shape, size, path])
    return out


def alignment_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """Colour, shape, size and path asked by the prompt (mean of the four scores)."""
    return alignment_scores(videos, prompts).mean(1)


def path_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """The asked motion alone: the centroid's path against the prompt's direction and speed."""
    return alignment_scores(videos, prompts)[:, ALIGNMENT_PARTS.index("path")]


def motion_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """Smooth trajectory (low centroid acceleration) and no flicker (stable area and brightness)."""
    _check_videos(videos, prompts, min_frames=MIN_FRAMES["motion"])
    scale = videos.shape[-1] / 24.0
    fg, _ = foreground(videos)
    cen, mass = _centroids(fg)
    accel = (cen[:, 2:] - 2 * cen[:, 1:-1] + cen[:, :-2]).norm(dim=-1).mean(-1) / scale
    smooth = torch.exp(-(accel**2) / 0.1)
    area_cv = mass.std(dim=1) / mass.mean(dim=1)
    bright = videos.mean(dim=(2, 3, 4))
    flicker = (bright[:, 1:] - bright[:, :-1]).abs().mean(-1)
    stable = torch.exp(-(area_cv**2) / 0.01) * torch.exp(-(flicker**2) / 1e-4)
    return (smooth + stable) / 2


def visual_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """Sharp edges (a nearly binary foreground map) and a clean background (flat colour)."""
    _check_videos(videos, prompts)
    fg, bg = foreground(videos)
    # Partly covered pixels per pixel of perimeter (2 sqrt(pi area)): about 1 for a crisp edge
    # (anti-aliasing), more as edges blur.
    fuzzy = ((fg > 0.15) & (fg < 0.85)).float().sum(dim=(2, 3))
    perimeter = 2 * torch.sqrt(math.pi * fg.sum(dim=(2, 3))).clamp_min(1.0)
    blur = (fuzzy / perimeter).mean(1)
    sharp = torch.exp(-((blur - 0.6).clamp_min(0) ** 2) / 0.5)
    back = fg < 0.15
    resid = ((videos - bg[:, None, :, None, None]).abs().mean(2) * back).sum(dim=(1, 2, 3))
    clean = torch.exp(-((resid / back.sum(dim=(1, 2, 3)).clamp_min(1)) ** 2) / 2e-4)
    # An empty frame is trivially sharp and clean: the score needs an object in every frame
    # (at least half the area of the smallest shape, counted in clearly covered pixels, so a haze
    # spread over the background does not pass for one).
    min_area = 0.5 * math.pi * (data.SIZES["small"] * videos.shape[-1] / 24.0) ** 2
    present = ((fg > 0.5).float().sum(dim=(2, 3)) / min_area).clamp(max=1.0).mean(1)
    return present * (sharp + clean) / 2


def dynamic_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """Amount of change between frames, ``d / (d + 0.02)`` of the mean absolute difference."""
    _check_videos(videos, prompts, min_frames=MIN_FRAMES["dynamic"])
    d = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    return d / (d + 0.02)


def smoothness_reward(videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
    """1 - mean distance of each inner frame from the midpoint of its neighbours."""
    _check_videos(videos, prompts, min_frames=MIN_FRAMES["smoothness"])
    mid = (videos[:, :-2] + videos[:, 2:]) / 2
    return 1 - (videos[:, 1:-1] - mid).abs().mean(dim=(1, 2, 3, 4))


# Rewards that read any video, not only the procedural shapes.
GENERIC: dict[str, RewardFn] = {"dynamic": dynamic_reward, "smoothness": smoothness_reward}
# Built-in rewards that read the asked scene (colour, shape, size, direction, speed) in a prompt.
SCENE_READERS = ("alignment", "path")

BUILTIN: dict[str, RewardFn] = {
    "alignment": alignment_reward,
    "path": path_reward,
    "motion": motion_reward,
    "visual": visual_reward,
    **GENERIC,
}


def unreadable_scene(prompts: Iterable[str]) -> str:
    """Why the rewards of :data:`SCENE_READERS` cannot read one of ``prompts`` (the first such
    prompt's parse error), or "" if they read them all."""
    for p in dict.fromkeys(prompts):  # each distinct prompt once
        try:
            data.Scene.parse(p)
        except ValueError as e:
            return str(e)
    return ""


class CompositeReward:
    """Weighted sum of named rewards; :meth:`components` gives each one.

    Args:
        weights: name -> weight; names of built-in rewards or of ``extra`` ones.
        extra: name -> user reward (any :class:`RewardFn`).
        batch: videos per call of each reward (0: all of them in one call); a large reward
            model's memory grows with it, its scores do not change.
    """

    def __init__(
        self,
        weights: dict[str, float],
        extra: dict[str, RewardFn] | None = None,
        batch: int = 0,
    ) -> None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            raise ValueError(f"batch={batch!r}: videos per reward call, an integer >= 0")
        self.batch = batch
        for name, fn in (extra or {}).items():
            if not callable(fn):
                raise TypeError(
                    f"reward {name!r} must be a callable fn(videos, prompts) -> [B], got "
                    f"{type(fn).__name__}"
                )
        fns = {**BUILTIN, **(extra or {})}
        unknown = sorted(set(weights) - set(fns))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; available: {sorted(fns)}")
        if not weights or any(not math.isfinite(w) for w in weights.values()):
            raise ValueError(
                f"reward weights must be a non-empty dict of finite floats, got {weights}"
            )
        if not any(weights.values()):
            raise ValueError(f"reward weights are all 0 (nothing to train on): {weights}")
        self.weights = dict(weights)
        self.fns: dict[str, Callable] = {k: fns[k] for k in weights}

    def components(
        self,
        videos: torch.Tensor,
        prompts: Sequence[Prompt],
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """name -> [B] float32 rewards of every component (or of ``names`` only).

        Rewards are scores, never differentiated: each runs under ``torch.no_grad()`` (a reward
        model whose weights require grad keeps no activations), and its output is detached and
        moved to the CPU."""
        _check_videos(videos, prompts)
        B = videos.shape[0]
        # What every reward would turn into a NaN score. A video's sum is non-finite if one of
        # its values is (or if the sum overflows: confirmed value by value): one cheap reduction,
        # not a boolean copy of every video.
        sums = videos.sum(dim=(1, 2, 3, 4))
        suspect = (~torch.isfinite(sums)).nonzero().flatten().tolist()
        bad = [i for i in suspect if not torch.isfinite(videos[i]).all()]
        if bad:
            raise NonFiniteVideoError(
                f"videos {tuple(videos.shape)}: {len(bad)} of {B} hold NaN or inf values, the "
                f"first video {bad[0]} (prompt {_shown(prompts[bad[0]])!r}): the generator made "
                "them, not a reward (its weights diverged, e.g. under too large an lr, or an "
                "activation overflowed)"
            )
        step = self.batch or max(B, 1)
        out = {}
        for name in self.fns if names is None else names:
            fn, parts = self.fns[name], []
            for i in range(0, B, step):
                with torch.no_grad():
                    r = torch.as_tensor(fn(videos[i : i + step], prompts[i : i + step]))
                r = r.detach().float().cpu().reshape(-1)
                n = min(step, B - i)
                if r.shape[0] != n:
                    raise RewardOutputError(
                        f"reward {name!r} returned {r.shape[0]} value(s) for {n} videos: a reward "
                        f"returns one score per video, [B] (videos [B, T, C, H, W])"
                    )
                parts.append(r)
            r = torch.cat(parts) if parts else torch.zeros(0)
            bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
            if bad:  # one NaN would make its group's advantages, then every weight, NaN
                raise RewardOutputError(
                    f"reward {name!r} returned {len(bad)} non-finite value(s) of {len(r)}, the "
                    f"first {r[bad[0]].item()} for video {bad[0]} (prompt "
                    f"{_shown(prompts[bad[0]])!r}); "
                    "a reward must be finite for every video"
                )
            out[name] = r
        return out

    def min_frames(self, name: str) -> int:
        """The fewest frames reward ``name`` scores (:data:`MIN_FRAMES` for a built-in, a user
        reward's ``min_frames`` attribute, else 1)."""
        fn = self.fns[name]
        if fn is BUILTIN.get(name):
            return MIN_FRAMES.get(name, 1)
        return int(getattr(fn, "min_frames", 1))

    def check_prompts(self, prompts: Iterable[str]) -> None:
        """Raise a ValueError naming the reward and the prompt if a built-in reward that reads the
        asked scene from the prompt (:data:`SCENE_READERS`) cannot read one of ``prompts`` (each a
        chunk's prompt): before any video is made, not at the first score."""
        readers = [k for k in SCENE_READERS if self.fns.get(k) is BUILTIN[k]]
        if readers and (why := unreadable_scene(prompts)):
            raise ValueError(
                f"reward {readers[0]!r} reads the asked scene from each prompt, and {why}; with "
                f"prompts of your own train on your own rewards (reward_fns) or the generic "
                f"ones ({', '.join(GENERIC)}), or ask for a scene: "
                f"{data.all_scenes()[0].prompt!r}"
            )

    def total(self, comps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the components of :meth:`components` ([B] each)."""
        return sum(self.weights[k] * comps[k] for k in self.weights)

    def __call__(self, videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        return self.total(self.components(videos, prompts))


class RewardOutputError(ValueError):
    """A reward returned other than one finite score per video (the message names it)."""


class RewardSpecError(ValueError):
    """A user reward that :func:`load_reward` cannot load (the message names its spec)."""


def split_reward_spec(spec: str) -> tuple[str, str]:
    """``"where:name"`` -> (where, name), or a :class:`RewardSpecError` naming ``spec``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardSpecError(
            f"reward {spec!r}: expected 'package.module:name' or 'path/to/file.py:name'"
        )
    where, name = spec.split(":")
    return where, name


def load_reward(spec: str) -> RewardFn:
    """The user reward named by ``spec``: ``"package.module:name"`` or ``"path/to/file.py:name"``.

    ``name`` (dotted for a nested attribute) is a :class:`RewardFn`, or a class whose instances
    are (constructed with no arguments; a reward model that needs a path or a device reads it
    in its ``__init__``). The module is imported as Python imports it: from ``sys.path`` (the
    working directory included when run with ``python -m``), or from the file.

    Raises:
        RewardSpecError: (a ValueError) naming ``spec`` when it is malformed, cannot be
            imported, has no such attribute, or does not name a callable.
    """
    where, name = split_reward_spec(spec)
    path = Path(where).expanduser() if where.endswith(".py") else None
    if path is not None and not path.is_file():
        raise RewardSpecError(f"reward {spec!r}: no file {str(path)!r}")
    try:
        if path is not None:
            module_name = f"kvpo_user_reward_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            # registered before it runs, as an import would be: dataclasses and pickling in the
            # module look themselves up in sys.modules
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # an error of the user's module itself, named with its spec
        raise RewardSpecError(
            f"reward {spec!r}: cannot import {where!r}: {type(e).__name__}: {e}"
        ) from e
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward {spec!r}: {where!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as e:
            raise RewardSpecError(
                f"reward {spec!r}: constructing {name}() failed: {type(e).__name__}: {e}"
            ) from e
    if not callable(obj):
        raise RewardSpecError(
            f"reward {spec!r}: {type(obj).__name__} is not callable as fn(videos, prompts) -> [B]"
        )
    return obj


class ClipReward:
    """Text-video similarity from a ``transformers`` CLIP model in a local directory.

    The mean, over ``frames`` evenly spaced frames, of the cosine similarity between each frame's
    image embedding and the text embedding of its prompt (of its chunk's, in a multi-prompt
    video). Images are resized and normalised here (no image-processor files needed);
    the tokenizer is loaded with ``AutoTokenizer`` from the same directory. Nothing is downloaded.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(
        self, path: str | Path, frames: int = 4, device: str | torch.device = "cpu"
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"ClipReward: {str(path)!r} is not a directory with a CLIP config.json"
            )
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.frames = frames
        self.device = torch.device(device)
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        _check_videos(videos, prompts)
        B, T = videos.shape[:2]
        idx = torch.linspace(0, T - 1, min(self.frames, T)).round().long()
        imgs = videos[:, idx].flatten(0, 1).to(self.device)
        imgs = torch.nn.functional.interpolate(
            imgs, size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        mean = torch.tensor(self.MEAN, device=self.device)[None, :, None, None]
        std = torch.tensor(self.STD, device=self.device)[None, :, None, None]
        img_emb = self.model.get_image_features(pixel_values=(imgs - mean) / std)
        # each sampled frame against the prompt of its chunk (multi-prompt videos switch)
        asked = [[per[int(i)] for i in idx] for per in (_chunk_prompts(p, T) for p in prompts)]
        texts = sorted({t for frames in asked for t in frames})
        tok = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        txt_emb = self.model.get_text_features(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        )
        img_emb = _as_tensor(img_emb)
        txt_emb = torch.nn.functional.normalize(_as_tensor(txt_emb), dim=-1)
        img_emb = torch.nn.functional.normalize(img_emb, dim=-1).view(B, len(idx), -1)
        where = torch.tensor([[texts.index(t) for t in frames] for frames in asked])
        return (img_emb * txt_emb[where.to(self.device)]).sum(-1).mean(-1).float().cpu()


def _as_tensor(x) -> torch.Tensor:
    """transformers may return a ModelOutput with pooled features instead of a tensor."""
    if torch.is_tensor(x):
        return x
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(x, name, None) is not None:
            return getattr(x, name)
    raise TypeError(f"cannot read embeddings from {type(x).__name__}")
