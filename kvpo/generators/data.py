"""Procedural prompted videos: one coloured shape moving across a dark background.

A video is described per chunk by a prompt such as ``"a large red circle moving left slowly"``; a
multi-prompt video changes the direction (and so the prompt) at a chunk boundary. Everything is
rendered on the fly from a seed, so the data ships as code and nothing is downloaded.

Videos are float32 in [-1, 1], ``[T, C, H, W]`` (C = 3).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 3.0, "large": 5.0}  # radius in pixels at 24x24
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates (y down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
SPEEDS: dict[str, float] = {"slowly": 0.6, "quickly": 1.2}  # pixels per frame at 24x24
BACKGROUND = (0.08, 0.08, 0.1)


@dataclass(frozen=True)
class Scene:
    """What one prompt asks for."""

    color: str
    shape: str
    size: str
    direction: str
    speed: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} moving {self.direction} {self.speed}"

    @classmethod
    def parse(cls, prompt: str) -> Scene:
        words = prompt.lower().split()

        def pick(options, what: str) -> str:
            found = [w for w in words if w in options]
            if len(found) != 1:
                raise ValueError(
                    f"prompt {prompt!r} must name exactly one {what} of {sorted(options)}"
                )
            return found[0]

        return cls(
            color=pick(COLORS, "colour"),
            shape=pick(SHAPES, "shape"),
            size=pick(SIZES, "size"),
            direction=pick(DIRECTIONS, "direction"),
            speed=pick(SPEEDS, "speed"),
        )


TURN = {"left": "up", "up": "right", "right": "down", "down": "left"}  # a quarter turn


def prompt_lines(path: str | Path, what: str) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped and spaces around stripped);
    a missing or empty file is a ValueError naming ``what`` (``"config prompts_file"``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{what}={str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # prompts in another encoding, or not a text file
        raise ValueError(
            f"{what}={str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{what}={str(path)!r}: no prompts in it")
    return lines


def switched_prompts(prompt: str, n_chunks: int, at: int, direction: str) -> list[str]:
    """One prompt per chunk: ``prompt`` before chunk ``at``, then the same scene moving
    ``direction`` (a multi-prompt video)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} must be one of {sorted(DIRECTIONS)}")
    sc = Scene.parse(prompt)
    later = Scene(sc.color, sc.shape, sc.size, direction, sc.speed).prompt
    return [prompt] * at + [later] * (n_chunks - at)


def all_scenes() -> list[Scene]:
    return [
        Scene(c, s, z, d, v)
        for c, s, z, d, v in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS, SPEEDS)
    ]


def scene_key(prompt: str) -> tuple[str, str, str, str]:
    """What stays when a multi-prompt video switches direction: (colour, shape, size, speed)."""
    sc = Scene.parse(prompt)
    return sc.color, sc.shape, sc.size, sc.speed


# Scenes whose prompts the shipped base never saw (``split_prompts()``'s held-out ones).
PRETRAINING_HELD_OUT = 16


def split_prompts(num_eval: int = 16, seed: int = 0) -> tuple[list[str], list[str]]:
    """A fixed split of all prompts into (train, held-out eval) by whole scenes: the
    ``ceil(num_eval / 4)`` first scenes of a seeded order are held out in every direction, so no
    direction switch (pretraining's or training's) turns a training prompt into a held-out one.
    The held-out list is ``num_eval`` of their prompts; the rest of the last scene is in neither.
    With ``num_eval <= PRETRAINING_HELD_OUT`` the held-out scenes are ones the shipped base was
    never pretrained on."""
    if not isinstance(num_eval, int) or num_eval < 1:
        raise ValueError(f"num_eval={num_eval!r} must be a positive integer")
    keys = sorted({scene_key(s.prompt) for s in all_scenes()})
    n_dirs = len(DIRECTIONS)
    n_held = -(-num_eval // n_dirs)
    if n_held >= len(keys):
        raise ValueError(f"num_eval={num_eval} leaves no scene to train on ({len(keys)} scenes)")
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [keys[i] for i in perm[:n_held]]
    train_keys = [keys[i] for i in perm[n_held:]]

    def prompts(key: tuple[str, str, str, str]) -> list[str]:
        color, shape, size, speed = key
        return [Scene(color, shape, size, d, speed).prompt for d in DIRECTIONS]

    # held-out prompts scene by scene in turn: the first n span as many scenes as they can
    held_prompts = [p for d in range(n_dirs) for p in (prompts(k)[d] for k in held)]
    return [p for k in train_keys for p in prompts(k)], held_prompts[:num_eval]


def vocabulary() -> list[str]:
    """Every word a prompt can use (the text encoder's vocabulary, after the special tokens)."""
    words = ["a", "moving", *COLORS, *SHAPES, *SIZES, *DIRECTIONS, *SPEEDS]
    return list(dict.fromkeys(words))


def shape_mask(
    shape: str, cx: torch.Tensor, cy: torch.Tensor, radius: float, size: int
) -> torch.Tensor:
    """Soft (anti-aliased) coverage in [0, 1] of ``shape`` centred at (cx, cy): [T, size, size]."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    if shape == "circle":
        dist = torch.sqrt(dx**2 + dy**2) - radius
    elif shape == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - radius * 0.85
    elif shape == "triangle":
        # Apex-up equilateral triangle: the max over its three outward edge normals, minus the
        # inradius, is a signed distance good enough for one pixel of anti-aliasing.
        r_in = radius * 0.6
        normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        planes = [nx * dx + ny * dy for nx, ny in normals]
        dist = torch.maximum(torch.maximum(planes[0], planes[1]), planes[2]) - r_in
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return (0.5 - dist).clamp(0.0, 1.0)


def render(
    scenes: list[Scene],
    chunk_of_frame: list[int],
    start: tuple[float, float],
    size: int,
) -> torch.Tensor:
    """Render a (possibly multi-prompt) video: ``scenes[j]`` drives chunk j.

    Returns ``[T, 3, size, size]`` float32 in [-1, 1]; the shape, colour and size come from the
    first scene, motion from the scene of each frame's chunk.
    """
    scale = size / 24.0
    first = scenes[0]
    T = len(chunk_of_frame)
    cx, cy = [start[0]], [start[1]]
    for f in range(1, T):
        sc = scenes[chunk_of_frame[f]]
        dx, dy = DIRECTIONS[sc.direction]
        step = SPEEDS[sc.speed] * scale
        cx.append(cx[-1] + dx * step)
        cy.append(cy[-1] + dy * step)
    mask = shape_mask(
        first.shape, torch.tensor(cx), torch.tensor(cy), SIZES[first.size] * scale, size
    )
    fg = torch.tensor(COLORS[first.color])[None, :, None, None]
    bg = torch.tensor(BACKGROUND)[None, :, None, None]
    video = bg + (fg - bg) * mask[:, None]
    return video * 2.0 - 1.0


def trajectory_extent(scenes: list[Scene], chunk_of_frame: list[int], size: int) -> tuple:
    """Bounding box (min_x, max_x, min_y, max_y) of the centre path starting at (0, 0)."""
    scale = size / 24.0
    x = y = 0.0
    xs, ys = [0.0], [0.0]
    for f in range(1, len(chunk_of_frame)):
        sc = scenes[chunk_of_frame[f]]
        dx, dy = DIRECTIONS[sc.direction]
        x += dx * SPEEDS[sc.speed] * scale
        y += dy * SPEEDS[sc.speed] * scale
        xs.append(x)
        ys.append(y)
    return min(xs), max(xs), min(ys), max(ys)


def sample_video(
    prompt: str | list[str],
    num_frames: int,
    chunk_frames: int,
    size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Render one video for ``prompt`` (or one prompt per chunk), its path centred in the frame
    with a small random offset. Returns ``[T, 3, size, size]`` in [-1, 1]."""
    n_chunks = num_frames // chunk_frames
    prompts = [prompt] * n_chunks if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n_chunks:
        raise ValueError(f"prompt list has {len(prompts)} entries, need one per chunk ({n_chunks})")
    scenes = [Scene.parse(p) for p in prompts]
    chunk_of_frame = [f // chunk_frames for f in range(num_frames)]
    x0, x1, y0, y1 = trajectory_extent(scenes, chunk_of_frame, size)
    # The path is centred in the frame, jittered by up to +-jitter pixels: the prompt nearly fixes
    # the video, so a small generator can learn it, and branches still have room to differ.
    jitter = 2.0 * size / 24.0
    u = (torch.rand(2, generator=generator) * 2 - 1).tolist()
    sx = size / 2 - (x0 + x1) / 2 + u[0] * jitter
    sy = size / 2 - (y0 + y1) / 2 + u[1] * jitter
    return render(scenes, chunk_of_frame, (sx, sy), size)


def random_prompts(
    prompts: list[str], n_chunks: int, p_switch: float, generator: torch.Generator
) -> list[str]:
    """One prompt per chunk: a base prompt, and with probability ``p_switch`` a new direction from a
    random chunk boundary on (a multi-prompt video)."""
    base = prompts[int(torch.randint(len(prompts), (1,), generator=generator))]
    out = [base] * n_chunks
    if n_chunks > 1 and float(torch.rand((), generator=generator)) < p_switch:
        at = int(torch.randint(1, n_chunks, (1,), generator=generator))
        new_dir = other_direction(Scene.parse(base).direction, generator)
        out = switched_prompts(base, n_chunks, at, new_dir)
    return out


def other_direction(direction: str, generator: torch.Generator) -> str:
    """A direction drawn uniformly among those other than ``direction``."""
    others = [d for d in DIRECTIONS if d != direction]
    return others[int(torch.randint(len(others), (1,), generator=generator))]


def fixed_switches(
    prompt: str, n_chunks: int, at: tuple[int, ...], generator: torch.Generator
) -> list[str]:
    """One prompt per chunk: ``prompt``, then the same scene in a new direction (drawn, never the
    one before) from each chunk of ``at`` on: a multi-prompt video of ``len(at) + 1`` segments
    switching at fixed chunks, as the public recipe's training videos do."""
    if any(not 1 <= a < n_chunks for a in at):
        raise ValueError(f"switch chunks {tuple(at)} must lie in 1..{n_chunks - 1}")
    out, direction = [prompt] * n_chunks, Scene.parse(prompt).direction
    for a in at:
        direction = other_direction(direction, generator)
        out[a:] = switched_prompts(prompt, n_chunks, a, direction)[a:]
    return out


def prompt_segments(prompt: str) -> list[str]:
    """The segments of a multi-prompt ``"A | B"`` in order (one for a plain prompt)."""
    return [s.strip() for s in prompt.split("|")]


def segments(prompts: list[str]) -> list[str]:
    """One prompt per chunk, with ``"A | B | C"`` spread over the chunks in order (a multi-prompt
    video, LongLive-style: A for the first third of the chunks, then B, then C); a prompt without
    ``|`` is left as it is."""
    n = len(prompts)
    out = []
    for j, p in enumerate(prompts):
        parts = prompt_segments(p)
        if len(parts) > n or not all(parts):
            raise ValueError(
                f"prompt {p!r}: {len(parts)} segments for {n} chunks (at most one per chunk, "
                "none empty)"
            )
        out.append(parts[j * len(parts) // n])
    return out
