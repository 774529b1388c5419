"""Throughput of the pretraining loaders, in images/s of complete multi-view samples.

    python scripts/bench_data.py --root R --loader plain,torch,dali --rounds 3 --workers N \\
        [--device cpu|gpu --batch 32 --steps 10 --rand-size 224 --focal-size 96 --focal-views 10]
    python scripts/bench_data.py --root /tmp/synth --synthesize 256 ...   # make test JPEGs first
    python scripts/bench_data.py --config configs/demo_cpu.yaml --loader plain,torch  # its data
    python scripts/bench_data.py --root R --loader torch --workers 0 --profile 25  # where it goes
    python scripts/bench_data.py --root R --loader plain,torch,dali --shards  # + from tar shards

R is a folder of class sub-folders. ``--loader``: one or more of

* ``plain``: the yardstick, a stock torchvision pipeline as the reference builds it (PIL
  image, ``torchvision.transforms`` RandomResizedCrop, flip, ColorJitter p 0.8, grayscale
  p 0.2, the reference's PIL Gaussian blur p 0.5 with sigma in [0.1, 2], ToTensor,
  Normalize; the same parameters as ours) over an ``ImageFolder``, the global RNG, a
  shuffling ``DataLoader``: no per-view seeds, no replay, no skipping of bad files;
* ``torch``: ours, ``data.loader=torch`` (DataLoader workers, views seeded per image and view);
* ``dali``: ours, ``data.loader=dali`` (``--device``: where DALI decodes and augments).

``--shards``: each of ours (torch, dali) also reads the same images from WebDataset tar
shards (``data.shards``), one more row each with ``source`` ``shards`` (``folder``: R
itself): alone, R is first written as shards of ``--shard-size`` images into a temporary
folder by ``scripts/make_shards.py``'s writer (removed at the end); ``--shards PATTERN``
reads existing shards, which should hold R's images (``make_shards.py R``). The stock
``plain`` row reads the folder only.

``--workers``: DataLoader worker processes (plain, torch) or DALI threads (dali). Each
loader is built and run for one untimed epoch (``first s``: build until its first batch);
then each round times every loader in turn over whole epochs (at least ``--steps``
batches): nothing a loader prefetched is left running while the next one is timed, and a
change of machine load hits all rows of a round alike. ``cpu ms/img``: CPU time of this
process and its workers per image (steadier than wall time on a shared machine). With
several loaders or rounds the medians over rounds follow, with ``x plain``: the median over
rounds of (images/s / plain's of the same round), and the same for plain's CPU per image
over the row's. Pin the process to N cores (``taskset -c 0-(N-1)``) to compare per core.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from msn_ds.monitor.table import Column, format_header, format_row

LOADERS = ("plain", "torch", "dali")
COLUMNS = (Column("loader", 7, align="<"), Column("source", 6, align="<"),
           Column("device", 6, align="<"), Column("workers", 7),
           Column("batch", 5), Column("views", 5), Column("sizes", 8), Column("first s", 7, ".2f"),
           Column("ms/batch", 8, ".1f"), Column("images/s", 8, ".1f"), Column("skipped", 7),
           Column("round", 5), Column("cpu ms/img", 10, ".1f"))


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


class PILGaussianBlur:
    """The reference's blur: with probability ``p``, PIL's Gaussian blur of a radius drawn
    uniformly in [radius_min, radius_max], both from the global torch RNG."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        from PIL import ImageFilter

        if torch.bernoulli(torch.tensor(self.p)) == 0:
            return img
        radius = self.radius_min + torch.rand(1).item() * (self.radius_max - self.radius_min)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class PlainMultiCrop:
    """The reference's multi-crop transform with stock torchvision: ``[target, anchors...,
    focal...]``, every draw from the global RNG."""

    def __init__(self, data: dict):
        from torchvision import transforms as T

        from msn_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        s = data["color_jitter_strength"]

        def view(size, scale):
            return T.Compose([
                T.RandomResizedCrop(size, scale=tuple(scale)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
                PILGaussianBlur(p=0.5),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])

        self.rand = view(data["rand_size"], data["rand_scale"])
        self.focal = view(data["focal_size"], data["focal_scale"])
        self.num_rand, self.num_focal = data["rand_views"] + 1, data["focal_views"]

    def __call__(self, img):
        return ([self.rand(img) for _ in range(self.num_rand)]
                + [self.focal(img) for _ in range(self.num_focal)])


def build_plain_loader(data: dict, root: str, batch: int):
    """``ImageFolder`` + shuffling ``DataLoader`` (persistent workers), default collate."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(root, transform=PlainMultiCrop(data))
    workers = data["num_workers"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    return dataset, loader


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its live descendants
    (loader workers, DALI host workers), from /proc; NaN where there is no /proc. Wall time
    on a shared machine moves with the other jobs' load; CPU time per image much less."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        stats = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    except OSError:
        return float("nan")
    mine, total, grew = {os.getpid()}, 0, True
    while grew:
        new = {p for p, (ppid, _) in stats.items() if ppid in mine and p not in mine}
        mine |= new
        grew = bool(new)
    total = sum(stats[p][1] for p in mine if p in stats)
    return total / tick


def write_bench_shards(root: str, shard_size: int) -> tuple[str, str]:
    """``(temporary folder, data.shards pattern)``: ``root`` written as tar shards by the
    writer of ``scripts/make_shards.py`` (``msn_ds.data.shards.write_shards``)."""
    from msn_ds.data.shards import write_shards
    from msn_ds.data.source import UNLABELLED, FolderSource

    source = FolderSource(root)
    tmp = tempfile.mkdtemp(prefix="bench_data_shards_")
    try:
        written = write_shards(source, tmp, shard_size, labels=source.classes != [UNLABELLED])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, written.pattern


class Bench:
    """One loader: ``epoch()`` iterates one whole epoch, returns (seconds, batches, skipped,
    seconds to the first batch, CPU seconds of the process tree). ``shards``: read these
    (``data.shards``) instead of the folder ``root``."""

    def __init__(self, kind: str, data: dict, root: str, batch: int, device_id, shards=None):
        from msn_ds.data.loader import build_pretrain_data

        self.kind, self.device_id, self.epoch_no = kind, device_id, 0
        self.source = "shards" if shards else "folder"
        self.label = kind if shards is None else f"{kind} {self.source}"
        t0 = time.perf_counter()
        if kind == "plain":
            self.dataset, self.loader = build_plain_loader(data, root, batch)
            self.sampler = None
        else:
            built = build_pretrain_data({**data, "shards": shards}, root, batch, seed=0,
                                        device_id=device_id, loader=kind)
            self.dataset, self.sampler, self.loader = built.dataset, built.sampler, built.loader
        self.build_s = time.perf_counter() - t0

    def epoch(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch_no)
        self.epoch_no += 1
        cpu0 = tree_cpu_seconds()
        start = time.perf_counter()
        n = skipped = 0
        first = None
        for batch in self.loader:
            views = batch[0]
            if views[0].is_cuda:
                torch.cuda.synchronize()
            if first is None:
                first = time.perf_counter() - start
            n += 1
            skipped += batch[2] if self.kind != "plain" else 0
        wall = time.perf_counter() - start
        return wall, n, skipped, first, tree_cpu_seconds() - cpu0

    def close(self):
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def data_settings(args) -> tuple[dict, str, int]:
    """``(data section, root, batch)`` from the defaults or ``--config``, then the flags."""
    from msn_ds.config import ConfigError, defaults, load_config, train_folder

    if args.config:
        try:
            cfg = load_config(args.config, check_paths=False)
        except ConfigError as e:
            raise SystemExit(f"error: {e}")
        data, root, batch = dict(cfg["data"]), train_folder(cfg), cfg["criterion"]["batch_size"]
    else:
        data, root, batch = dict(defaults()["data"]), None, 32
    for key in ("rand_size", "focal_size", "rand_views", "focal_views"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.workers is not None:
        data["num_workers"] = args.workers
    data["pin_mem"] = False
    root = args.root or root
    if root is None:
        raise SystemExit("error: --root or --config is required")
    return data, root, args.batch or batch


def profile(bench: Bench, steps: int, top: int) -> None:
    """cProfile of ``steps`` batches in this process (``--workers 0``), by own time."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    done = 0
    while done < steps:
        done += bench.epoch()[1]
    pr.disable()
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(top)
    pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", help="image folder (class sub-folders); default: the config's")
    p.add_argument("--config", help="take the data settings, batch and folder from this YAML")
    p.add_argument("--loader", required=True,
                   help="comma-separated, timed in this order: plain, torch, dali")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where DALI decodes and augments (plain and torch use the CPU)")
    p.add_argument("--workers", type=int, default=None, help="default 2 (or the config's)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (or the config's)")
    p.add_argument("--steps", type=int, default=10, help="at least this many timed batches "
                   "per loader and round (whole epochs)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rand-size", dest="rand_size", type=int, default=None)
    p.add_argument("--focal-size", dest="focal_size", type=int, default=None)
    p.add_argument("--rand-views", dest="rand_views", type=int, default=None)
    p.add_argument("--focal-views", dest="focal_views", type=int, default=None)
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="first write N synthetic 500x375 JPEGs into ROOT (skips existing)")
    p.add_argument("--shards", nargs="?", const="", default=None, metavar="PATTERN",
                   help="also read the images from tar shards (torch, dali): these, or, "
                        "without PATTERN, ROOT written as shards into a temporary folder")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=64, metavar="N",
                   help="images per shard when --shards writes them (default 64)")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="cProfile the (single) loader for --steps batches in this process "
                        "(use --workers 0) and print the TOP functions")
    args = p.parse_args(argv)

    kinds = [k.strip() for k in args.loader.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in LOADERS]
    if not kinds or unknown:
        print(f"error: --loader {args.loader!r}: choose from {', '.join(LOADERS)}",
              file=sys.stderr)
        return 2
    if args.shard_size < 1:
        print(f"error: --shard-size must be at least 1, got {args.shard_size}", file=sys.stderr)
        return 2
    data, root, batch = data_settings(args)
    if args.synthesize:
        synthesize(root, args.synthesize)
    torch.set_num_threads(1)  # the main process only collates / copies
    device_id = None
    if args.device == "gpu":
        if not torch.cuda.is_available():
            print("error: --device gpu but no CUDA GPU", file=sys.stderr)
            return 2
        device_id = 0

    benches, shard_dir, shards = [], None, args.shards or None
    try:
        if args.shards == "":
            shard_dir, shards = write_bench_shards(root, args.shard_size)
        elif shards:
            from msn_ds.data.shards import shard_problem

            problem = shard_problem(shards)
            if problem:
                print(f"error: --shards {problem}", file=sys.stderr)
                return 2
        for kind in kinds:
            for pattern in [None] + ([shards] if shards and kind != "plain" else []):
                b = Bench(kind, data, root, batch, device_id if kind == "dali" else None,
                          shards=pattern)
                first = b.epoch()[3]  # warm-up: workers, pipeline, page cache
                b.first_s = b.build_s + first
                benches.append(b)
        if args.profile:
            if len(benches) != 1:
                print("error: --profile takes one loader", file=sys.stderr)
                return 2
            profile(benches[0], args.steps, args.profile)
            return 0
        n_views = 1 + data["rand_views"] + data["focal_views"]
        print(format_header(COLUMNS, " "))

        def row(b, ms, rate, skipped, label, cpu, extra=""):
            device = args.device if b.kind == "dali" else "cpu"
            sizes = f"{data['rand_size']:>4d}/{data['focal_size']:<3d}"
            print(format_row(COLUMNS, (b.kind, b.source, device, data["num_workers"], batch,
                                       n_views, sizes, b.first_s, ms, rate, skipped, label, cpu),
                             " ") + extra, flush=True)

        rates = {b.label: [] for b in benches}
        cpus = {b.label: [] for b in benches}
        for r in range(args.rounds):
            for b in benches:
                secs = done = skipped = cpu = 0
                while done < args.steps:
                    s, n, sk, _, c = b.epoch()
                    secs, done, skipped, cpu = secs + s, done + n, skipped + sk, cpu + c
                rates[b.label].append(done * batch / secs)
                cpus[b.label].append(1000 * cpu / (done * batch))
                row(b, 1000 * secs / done, rates[b.label][-1], skipped, str(r + 1),
                    cpus[b.label][-1])
        if len(benches) > 1 or args.rounds > 1:
            for b in benches:
                rate, cpu = statistics.median(rates[b.label]), statistics.median(cpus[b.label])
                extra = ""
                if "plain" in rates:
                    ratio = statistics.median(x / y for x, y in zip(rates[b.label],
                                                                    rates["plain"]))
                    c_ratio = statistics.median(y / x for x, y in zip(cpus[b.label],
                                                                      cpus["plain"]))
                    extra = f"  {ratio:.2f}x plain (CPU per image: {c_ratio:.2f}x less)"
                row(b, 1000 * batch / rate, rate, 0, "med", cpu, extra)
        print(f"({len(benches[0].dataset)} images in {root}"
              + next((f", {len(b.dataset)} in the shards {shards}"
                      + (" (written for this run, removed)" if shard_dir else "")
                      for b in benches if b.source == "shards"), "")
              + f", {os.cpu_count()} CPUs visible, affinity {len(os.sched_getaffinity(0))} "
              f"cores, {args.rounds} rounds of >= {args.steps} batches per loader)")
    finally:
        for b in benches:
            b.close()
        if shard_dir is not None:
            shutil.rmtree(shard_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
