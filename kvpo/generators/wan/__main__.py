"""``python -m kvpo.generators.wan --checkpoint P --out DIR [--ema] [--lora_only | --original]``:
export a Wan run's transformer, LoRA merged, as a diffusers ``WanTransformer3DModel`` directory
(or with ``--original`` in Wan's original layout, ``OUT.pt`` for Self-Forcing / LongLive,
``OUT.safetensors`` bare), or its LoRA adapters alone as diffusers'
``pytorch_lora_weights.safetensors`` (``--lora_only``) or LongLive's ``lora.pt``
(``--longlive_lora``)."""

from __future__ import annotations

import argparse

from kvpo.generators.wan.weights import export, export_longlive_lora, export_lora, export_original
from kvpo.run.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m kvpo.generators.wan",
        description="Export a --wan_dir training checkpoint as a diffusers transformer.",
    )
    ap.add_argument("--checkpoint", required=True, help="a training checkpoint of a Wan run")
    ap.add_argument(
        "--out", required=True, help="directory for the merged transformer (--original: a file)"
    )
    ap.add_argument("--ema", action="store_true", help="its EMA weights")
    ap.add_argument("--wan_dir", default=None, help="the Wan directory, if it moved")
    how = ap.add_mutually_exclusive_group()
    how.add_argument(
        "--lora_only",
        action="store_true",
        help="write the LoRA adapters alone (diffusers' load_lora_weights), not the transformer",
    )
    how.add_argument(
        "--longlive_lora",
        action="store_true",
        help="write the LoRA adapters alone to the file OUT in LongLive's layout (its lora_ckpt)",
    )
    how.add_argument(
        "--original",
        action="store_true",
        help="write the merged transformer in Wan's original layout to OUT.pt (Self-Forcing, "
        "LongLive: generator / generator_ema) or OUT.safetensors (bare)",
    )
    args = ap.parse_args(argv)
    try:
        if args.lora_only:
            out = export_lora(args.checkpoint, args.out, args.ema)
            loader = "load_lora_weights"
        elif args.longlive_lora:
            out = export_longlive_lora(args.checkpoint, args.out, args.ema)
            loader = "LongLive's lora_ckpt"
        elif args.original:
            out = export_original(args.checkpoint, args.out, args.ema, args.wan_dir)
            loader = "Wan's original layout"
        else:
            out = export(args.checkpoint, args.out, args.ema, args.wan_dir)
            loader = "WanTransformer3DModel.from_pretrained"
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({loader})")


if __name__ == "__main__":
    main()
