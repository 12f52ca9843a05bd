"""``python -m kvpo.adapters.wan --checkpoint P --out DIR [--ema]``: export a Wan run's
transformer, LoRA merged, as a diffusers ``WanTransformer3DModel`` directory."""

from __future__ import annotations

import argparse

from ...checkpoint import CheckpointError
from .weights import export


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m kvpo.adapters.wan",
        description="Export a --wan_dir training checkpoint as a diffusers transformer.",
    )
    ap.add_argument("--checkpoint", required=True, help="a training checkpoint of a Wan run")
    ap.add_argument("--out", required=True, help="directory for the merged transformer")
    ap.add_argument("--ema", action="store_true", help="its EMA weights")
    ap.add_argument("--wan_dir", default=None, help="the Wan directory, if it moved")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.ema, args.wan_dir)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} (WanTransformer3DModel.from_pretrained)")


if __name__ == "__main__":
    main()
