"""Throughput of the pretraining loaders, in images/s of complete multi-view samples.

    python scripts/bench_data.py --root R --loader dali|torch --device cpu|gpu --workers N \\
        [--batch 32 --steps 10 --rand-size 224 --focal-size 96 --focal-views 10]
    python scripts/bench_data.py --root /tmp/synth --synthesize 256 ...   # make test JPEGs first

R is a folder of class sub-folders. ``--workers``: DataLoader worker processes (torch) or
DALI threads (dali). The first batch (pipeline build, worker start, first-touch probing)
is timed separately; images/s counts the following ``--steps`` batches, each one image
with 1 target + ``--rand-views`` + ``--focal-views`` views, materialised as torch tensors on
the loader's device. Pin the process to N cores (``taskset -c 0-(N-1)``) to compare per core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def synthesize(root: str, n: int, width: int = 500, height: int = 375, classes: int = 4) -> None:
    """ImageNet-sized JPEGs (smooth colour fields plus noise, ~quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i:05d}.jpg")
        if os.path.exists(path):
            continue
        base = Image.fromarray((rng.random((height // 25, width // 25, 3)) * 255).astype(np.uint8))
        img = np.asarray(base.resize((width, height), Image.BICUBIC), dtype=np.float32)
        img = img + rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--loader", choices=["dali", "torch"], required=True)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where DALI decodes and augments (torch always uses the CPU)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rand-size", type=int, default=224)
    p.add_argument("--focal-size", type=int, default=96)
    p.add_argument("--rand-views", type=int, default=1)
    p.add_argument("--focal-views", type=int, default=10)
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="first write N synthetic 500x375 JPEGs into ROOT (skips existing)")
    args = p.parse_args(argv)

    from msn_ds.config import defaults
    from msn_ds.data.loader import build_pretrain_loader

    if args.synthesize:
        synthesize(args.root, args.synthesize)
    torch.set_num_threads(1)  # the main process only collates / copies
    data = dict(defaults()["data"], num_workers=args.workers, rand_size=args.rand_size,
                focal_size=args.focal_size, rand_views=args.rand_views,
                focal_views=args.focal_views, pin_mem=False)
    device_id = None
    if args.device == "gpu":
        if not torch.cuda.is_available():
            print("error: --device gpu but no CUDA GPU", file=sys.stderr)
            return 2
        device_id = 0
    dataset, sampler, loader = build_pretrain_loader(data, args.root, args.batch, seed=0,
                                                     device_id=device_id, loader=args.loader)
    need = args.steps + 1
    times, skipped, done, epoch = [], 0, 0, 0
    start = time.perf_counter()
    while done < need:
        sampler.set_epoch(epoch)
        for views, _, sk in loader:
            if views[0].is_cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - start)
            start, skipped, done = now, skipped + sk, done + 1
            if done >= need:
                break
        epoch += 1
    steady = sum(times[1:])
    n_views = 1 + args.rand_views + args.focal_views
    rate = args.steps * args.batch / steady
    print(f"{'loader':7s} {'device':6s} {'workers':>7s} {'batch':>5s} {'views':>5s} {'sizes':>8s} "
          f"{'first s':>7s} {'ms/batch':>8s} {'images/s':>8s} {'skipped':>7s}")
    print(f"{args.loader:7s} {args.device:6s} {args.workers:7d} {args.batch:5d} {n_views:5d} "
          f"{args.rand_size:>4d}/{args.focal_size:<3d} {times[0]:7.2f} "
          f"{1000 * steady / args.steps:8.1f} {rate:8.1f} {skipped:7d}")
    print(f"({len(dataset)} images in {args.root}, {os.cpu_count()} CPUs visible, "
          f"affinity {len(os.sched_getaffinity(0))} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
