"""Input validation shared by every backend: clear errors instead of wrong answers or crashes.

Shape, dtype and device checks are static (they run in the public wrappers and trace under
``torch.compile``); checks of tensor *values* (page indices, page lengths) run inside the ops.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got {_desc(t)}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {_desc(t)}")


def require_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_routed_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
) -> None:
    for name, t in (
        ("q", q),
        ("k_pages", k_pages),
        ("v_pages", v_pages),
        ("page_table", page_table),
    ):
        require_tensor(name, t)
    require_rank("q", q, 4, "[B, H, Lq, D]")
    require_rank("k_pages", k_pages, 4, "[P, Hkv, page_size, D]")
    require_rank("v_pages", v_pages, 4, "[P, Hkv, page_size, D]")
    require_rank("page_table", page_table, 2, "[B, max_pages]")
    require_float("q", q)
    require_same("k_pages", k_pages, "q", q)
    require_same("v_pages", v_pages, "q", q)
    if page_table.dtype != torch.int32:
        raise TypeError(f"page_table must be int32, got {_desc(page_table)}")
    if page_table.device != q.device:
        raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")
    B, H, _, D = q.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must have one shape, got {tuple(k_pages.shape)} and "
            f"{tuple(v_pages.shape)}"
        )
    P, Hkv, page_size, Dk = k_pages.shape
    if Dk != D:
        raise ValueError(f"head dim of k_pages ({Dk}) differs from q's ({D}): q {_desc(q)}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got q {_desc(q)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"query heads H={H} must be a multiple of KV heads Hkv={Hkv} (grouped-query attention)"
        )
    if page_size < 1 or P < 1:
        raise ValueError(f"k_pages needs at least one page of one token, got {_desc(k_pages)}")
    if page_table.shape[0] != B:
        raise ValueError(
            f"page_table must have one row per batch row B={B}, got {_desc(page_table)}"
        )
    if page_lens is not None:
        require_tensor("page_lens", page_lens)
        if page_lens.dtype != torch.int32:
            raise TypeError(f"page_lens must be int32, got {_desc(page_lens)}")
        if page_lens.shape != (P,):
            raise ValueError(f"page_lens must be [P] with P={P}, got {_desc(page_lens)}")
        if page_lens.device != q.device:
            raise ValueError(f"page_lens is on {page_lens.device} but q is on {q.device}")


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale as a float: ``head_dim ** -0.5`` for None, else a finite real number."""
    if scale is None:
        return float(head_dim**-0.5)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_page_values(
    page_table: torch.Tensor, page_lens: torch.Tensor | None, num_pages: int, page_size: int
) -> None:
    """Value checks: the extremes of the table and the lengths, read in one transfer (on CUDA one
    host sync per call, not one per extreme)."""
    parts = [t for t in (page_table, page_lens) if t is not None and t.numel()]
    if not parts:
        return
    extremes = torch.stack([x for t in parts for x in torch.aminmax(t)]).tolist()
    if page_table.numel():
        lo, hi = extremes[:2]
        if lo < -1 or hi >= num_pages:
            raise ValueError(
                f"page_table entries must be -1 (routed out) or a page index in [0, {num_pages}), "
                f"got values in [{lo}, {hi}]"
            )
    if page_lens is not None and page_lens.numel():
        lo, hi = extremes[-2:]
        if lo < 0 or hi > page_size:
            raise ValueError(
                f"page_lens entries must be in [0, page_size={page_size}], got values in [{lo}, {hi}]"
            )


def check_velocity_energy(
    v_pred: torch.Tensor, v_ref: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> None:
    require_tensor("v_pred", v_pred)
    require_tensor("v_ref", v_ref)
    require_float("v_pred", v_pred)
    require_same("v_ref", v_ref, "v_pred", v_pred)
    if v_pred.dim() < 2:
        raise ValueError(f"v_pred must be [G, S, ...] (at least 2-D), got {_desc(v_pred)}")
    if v_ref.shape != v_pred.shape:
        raise ValueError(
            f"v_ref must have the shape of v_pred {tuple(v_pred.shape)}, got {_desc(v_ref)}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if weight is not None:
        require_tensor("weight", weight)
        G, S = v_pred.shape[:2]
        if weight.shape not in ((S,), (G, S)):
            raise ValueError(f"weight must be [S]={[S]} or [G, S]={[G, S]}, got {_desc(weight)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {_desc(weight)}")
        if weight.device != v_pred.device:
            raise ValueError(f"weight is on {weight.device} but v_pred is on {v_pred.device}")


def check_merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        require_tensor(name, t)
        require_float(name, t)
    require_same("out_b", out_b, "out_a", out_a)
    require_same("lse_b", lse_b, "lse_a", lse_a)
    if lse_a.device != out_a.device:
        raise ValueError(f"lse_a is on {lse_a.device} but out_a is on {out_a.device}")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"merge_attention: shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    if out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_attention: lse must be out's shape without D: out {tuple(out_a.shape)}, "
            f"lse {tuple(lse_a.shape)}"
        )


def require_generator(generator: object) -> None:
    """The routing helpers draw on the host: a CPU ``torch.Generator`` or None."""
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        where = f" on {generator.device}" if isinstance(generator, torch.Generator) else ""
        raise TypeError(
            f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}"
            f"{where}"
        )
