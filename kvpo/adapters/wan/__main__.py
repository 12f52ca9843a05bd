"""``python -m kvpo.adapters.wan --checkpoint P --out DIR [--ema] [--lora_only]``: export a Wan
run's transformer, LoRA merged, as a diffusers ``WanTransformer3DModel`` directory, or its LoRA
adapters alone as diffusers' ``pytorch_lora_weights.safetensors``."""

from __future__ import annotations

import argparse

from ...checkpoint import CheckpointError
from .weights import export, export_lora


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m kvpo.adapters.wan",
        description="Export a --wan_dir training checkpoint as a diffusers transformer.",
    )
    ap.add_argument("--checkpoint", required=True, help="a training checkpoint of a Wan run")
    ap.add_argument("--out", required=True, help="directory for the merged transformer")
    ap.add_argument("--ema", action="store_true", help="its EMA weights")
    ap.add_argument("--wan_dir", default=None, help="the Wan directory, if it moved")
    ap.add_argument(
        "--lora_only",
        action="store_true",
        help="write the LoRA adapters alone (diffusers' load_lora_weights), not the transformer",
    )
    args = ap.parse_args(argv)
    try:
        if args.lora_only:
            out = export_lora(args.checkpoint, args.out, args.ema)
        else:
            out = export(args.checkpoint, args.out, args.ema, args.wan_dir)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    loader = "load_lora_weights" if args.lora_only else "WanTransformer3DModel.from_pretrained"
    print(f"wrote {out} ({loader})")


if __name__ == "__main__":
    main()
