"""Convert between the reference's (facebookresearch/msn) checkpoints and our weights file.

  import:  import_msn.py REFERENCE.pth.tar [--arch deit_small] --out FILE.safetensors
  export:  import_msn.py OURS.safetensors --export-reference --out REF.pth.tar

The reference file is read with weights_only=True (no arbitrary unpickling). The arch is
inferred from the weights when --arch is omitted, and checked against them when given.
"""
from __future__ import annotations

import argparse
import os
import sys

from msn_ds.io.atomic import SaveError
from msn_ds.io.reference import export_reference, load_reference, read_ours
from msn_ds.io.weights import has_trained_head, save_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="reference .pth.tar (import) or our .safetensors (export)")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--arch", default=None,
                   help="e.g. deit_small or vit_small_16; inferred from the weights if omitted")
    p.add_argument("--img-size", type=int, default=None,
                   help="size the position embedding was trained at (default: from its shape, "
                        "224 for the released models)")
    p.add_argument("--export-reference", action="store_true",
                   help="write the reference's layout from our weights file")
    args = p.parse_args(argv)
    try:
        if args.export_reference:
            if args.arch or args.img_size:
                p.error("--arch/--img-size come from the weights file's metadata in export mode")
            target, protos, anchor, meta = read_ours(args.src)
            export_reference(args.out, target, protos, anchor, epoch=int(meta.get("epoch") or 0))
        else:
            target, protos, anchor, meta = load_reference(args.src, args.arch, args.img_size)
            meta["source"] = os.path.basename(args.src)
            save_weights(args.out, target, protos, meta, anchor)
            if not has_trained_head(meta):
                print(f"warning: {args.src} has no projection head; the head in {args.out} is "
                      "randomly initialised (the backbone is what you want)", file=sys.stderr)
    except (OSError, ValueError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = ["target"] + (["anchor"] if anchor is not None else []) + \
        ([f"{protos.shape[0]} prototypes"] if protos is not None else [])
    print(f"wrote {args.out}: {meta['arch']} ({', '.join(parts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
