"""Export our weights file's target encoder to a Hugging Face ``transformers`` folder.

  export_hf.py WEIGHTS.safetensors --out DIR [--overwrite] [--eval RESULT.json ...]
               [--license apache-2.0] [--dataset NAME]

DIR gets ``model.safetensors`` (the backbone as ``ViTMSNModel``), ``config.json``,
``preprocessor_config.json`` (our evaluation transform) and a model card ``README.md``;
``transformers.ViTMSNModel.from_pretrained(DIR)`` and ``AutoImageProcessor`` load it. The
folder is written whole, in a temporary folder renamed into place: a kill leaves the previous
folder or the new one. A DIR that already holds files is refused unless ``--overwrite`` is
given and it is an earlier export. The conversion is ``msn_ds.io.hf``; bad input exits 2.
"""
from __future__ import annotations

import argparse
import sys

from msn_ds.io.atomic import SaveError
from msn_ds.io.hf import export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="our weights file (.safetensors)")
    p.add_argument("--out", required=True, help="folder to write (created; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out as a whole if it holds an earlier export (a config.json "
                        "of model_type vit_msn, no subfolders); any other folder is refused")
    p.add_argument("--eval", nargs="*", default=[], metavar="JSON",
                   help="eval.logistic / eval.knn / eval.linear --json results of these weights, "
                        "for the model card")
    p.add_argument("--license", default="apache-2.0",
                   help="licence of the weights for the model card (weights derived from "
                        "facebook's MSN release are cc-by-nc-4.0)")
    p.add_argument("--dataset", default="",
                   help="pretraining data for the model card (default: the run's data folder)")
    args = p.parse_args(argv)
    try:
        info = export(args.weights, args.out, args.eval, args.license, args.dataset,
                      overwrite=args.overwrite)
    except (OSError, ValueError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: ViTMSNModel {info['arch']} at {info['img_size']} px, "
          f"{info['params'] / 1e6:.1f} M parameters ({info['tensors']} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
