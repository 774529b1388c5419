"""List the images of an ImageFolder that the loaders would skip.

    python scripts/check_dataset.py ROOT [--workers N] [--fast]

ROOT is a folder of class sub-folders (e.g. ``imagenet/train``). Every file the loaders see
(torchvision's image extensions) is decoded and converted to RGB with PIL, as the torch
loader does (``--fast``: the DALI loader's header probe, which fully decodes only files that
look unusual). Prints one line per unreadable file and a count; exits 1 if there are any,
so a job script can check its data before a multi-day run.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # noqa: E402

from msn_ds.data.probe import BAD, decode_rgb, probe  # noqa: E402


def check(args: tuple[str, bool]) -> str | None:
    """None if readable, else the reason."""
    path, fast = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if fast:
        p = probe(data)
        return p.reason if p.status == BAD else None
    if not data:
        return "empty file"
    try:
        decode_rgb(data)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", help="folder of class sub-folders")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fast", action="store_true", help="header probe instead of a full decode")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    classes = sorted(e.name for e in os.scandir(args.root) if e.is_dir())
    if not classes:
        print(f"error: {args.root} has no class sub-folders", file=sys.stderr)
        return 2
    samples = make_dataset(args.root, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)
    paths = [s[0] for s in samples]
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        reasons = list(pool.map(check, [(q, args.fast) for q in paths], chunksize=64))
    bad = [(q, r) for q, r in zip(paths, reasons) if r is not None]
    for q, r in bad:
        print(f"{q}\t{r}")
    print(f"{len(bad)} unreadable of {len(paths)} images in {args.root}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
