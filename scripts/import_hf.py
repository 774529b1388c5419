"""Import a Hugging Face ``ViTMSNModel`` folder (e.g. a downloaded ``facebook/vit-msn-*``
checkpoint) as our weights file.

  import_hf.py DIR --out WEIGHTS.safetensors [--seed 0]

Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``, or a sharded ``*.index.json`` whose shards lie inside DIR) directly:
transformers is not needed and nothing is downloaded. The backbone becomes
``target_encoder.*`` bit for bit; the projection head, which ``ViTMSNModel`` lacks, is a
seeded placeholder and the metadata says ``head=absent``. The conversion is
``msn_ds.io.hf``; a config or index value that is malformed exits 2 naming file and key.
"""
from __future__ import annotations

import argparse
import sys

from msn_ds.io.atomic import SaveError
from msn_ds.io.hf import import_folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a ViTMSNModel folder (config.json + weights)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the placeholder projection head")
    args = p.parse_args(argv)
    try:
        meta = import_folder(args.folder, args.out, args.seed)
    except (OSError, ValueError, SaveError) as e:  # full disk etc.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['arch']} at {meta['img_size']} px (target encoder; the "
          "projection head is a freshly initialised placeholder, metadata head=absent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
