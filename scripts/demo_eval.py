"""The end of `make demo`: few-shot accuracy of the trained target encoder next to the same
architecture randomly initialised and to raw pixels (the honest floor)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from eval.logistic import run_fewshot
from msn_ds.io.weights import build_encoder, load_encoder
from msn_ds.monitor.table import Column, format_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", required=True, help="target-encoder weights (safetensors)")
    p.add_argument("--root", required=True, help="dataset root with train/ and val/")
    p.add_argument("--subsets", required=True, help="folder of subset files")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--resize", type=int, default=32)
    p.add_argument("--lambd", type=float, default=0.0025)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)

    files = sorted(glob.glob(os.path.join(args.subsets, "*imgs_class_split*.txt")))
    if not files:
        print(f"error: no subset files in {args.subsets}", file=sys.stderr)
        return 2
    trained, meta = load_encoder(args.weights)
    torch.manual_seed(0)
    random = build_encoder(meta).eval()  # the trained one's shape, use_bn included
    kw = dict(lambd=args.lambd, crop=args.crop, resize=args.resize)
    results = {
        f"MSN {meta['arch']} (step {meta.get('step', '?')})": run_fewshot(trained, args.root, files, **kw),
        f"random-init {meta['arch']}": run_fewshot(random, args.root, files, **kw),
        "raw pixels": run_fewshot(None, args.root, files, **kw),
    }
    groups = sorted(next(iter(results.values()))["groups"], key=lambda g: int(g.split("imgs")[0]))
    columns = [Column("representation", max(len(k) for k in results) + 2, align="<")]
    columns += [Column(g.replace("imgs_class", " img/class"), 18) for g in groups]
    rows = [(name, *(f"{res['groups'][g]['mean']:>11.1f} +- {res['groups'][g]['std']:<4.1f}"
                     for g in groups)) for name, res in results.items()]
    print(format_table(columns, rows, title=f"\nFew-shot logistic regression, top-1 % on "
                       f"{results['raw pixels']['num_test']} validation images "
                       f"(mean +- std over splits)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
