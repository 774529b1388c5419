"""One weights file from a training checkpoint:

    python scripts/consolidate.py runs/vits16 --out vits16.safetensors          # latest
    python scripts/consolidate.py runs/vits16/global_step5000 --out w.pth       # a given one

Key prefixes: target_encoder.* (a plain timm ViT state dict), target_head.*, anchor_encoder.*,
anchor_head.*, prototypes; metadata: arch, img_size, hidden_dim, output_dim, use_bn, step,
epoch, config.

Every checkpoint file is read with torch's weights-only unpickler (DeepSpeed's own reads
included): a file naming any other type is refused (exit 2), since unpickling a crafted
checkpoint could run code. A full disk: a message with the space needed and free, exit 1.
"""
import argparse
import os
import sys

from msn_ds.io.atomic import SaveError
from msn_ds.io.checkpoint import consolidate
from msn_ds.io.safe_load import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (uses its latest checkpoint) or global_stepN folder")
    p.add_argument("--out", required=True, help="output file (.safetensors, or .pth)")
    args = p.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        why = ("is a folder (give a file name)" if os.path.isdir(args.out) else
               f"cannot be written: {folder} " + ("does not exist" if not os.path.isdir(folder)
                                                 else "is not writable"))
        print(f"error: --out {args.out} {why}", file=sys.stderr)
        return 2
    try:
        meta = consolidate(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SaveError as e:  # the checkpoint is fine; the output could not be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {meta['arch']} step {meta['step']} (ZeRO-{meta['zero_stage']} "
          f"checkpoint {meta['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
