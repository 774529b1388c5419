"""Write the views grid of a config to a PNG, without training.

    python scripts/show_views.py --config C [--loader dali|torch|auto] [--samples 4] \\
        [section.key=value ...] --out grid.png

The same picture a run writes to TensorBoard (``data/views``) at its start: one row per
image (the first of epoch 0), target, random anchor(s) with the patches step 0 drops
greyed out, focal anchors; de-normalised.
"""
from __future__ import annotations

import argparse
import sys



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--loader", choices=["auto", "dali", "torch"], default=None,
                   help="default: the config's data.loader")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_intermixed_args(argv)

    import torch
    from PIL import Image

    from msn_ds.config import ConfigError, load_config, train_folder
    from msn_ds.data.loader import build_pretrain_data, resolve_loader
    from msn_ds.monitor.views_grid import grid_for_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = cfg["data"]
    kind = resolve_loader(args.loader or data["loader"])
    device_id = 0 if kind == "dali" and torch.cuda.is_available() else None
    try:  # the folder, or data.shards, as training reads it
        images = build_pretrain_data(dict(data, num_workers=0), train_folder(cfg), args.samples,
                                     cfg["meta"]["seed"], device_id=device_id, loader=kind)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {args.config}: {data['shards'] or train_folder(cfg)}: {e}",
              file=sys.stderr)
        return 2
    try:
        grid = grid_for_config(cfg, images, args.samples)
    finally:
        images.close()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.out)
    print(f"wrote {args.out} ({grid.shape[2]}x{grid.shape[1]}, {kind} loader, "
          f"{args.samples} images x {1 + data['rand_views'] + data['focal_views']} views)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
