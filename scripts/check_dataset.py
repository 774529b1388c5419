"""List the images of an ImageFolder (or of tar shards) that the loaders would skip, and the
folder's traps.

    python scripts/check_dataset.py ROOT [--workers N] [--fast]
    python scripts/check_dataset.py --shards "DIR/train-{000000..000127}.tar" [--workers N]
    python scripts/check_dataset.py "DIR/train-{000000..000127}.tar"   # the same

ROOT is a folder of class sub-folders (e.g. ``imagenet/train``), or of images directly in it
(one unlabelled set), listed as the loaders list it (``msn_ds.data.dataset.list_images``).
``--shards PATTERN`` (or a ROOT that is not a folder and names ``.tar`` files) checks WebDataset
tar shards as ``data.shards`` reads them (``msn_ds/data/shards.py``): a brace pattern, or
several. Every listed file (torchvision's image extensions; in shards, every sample's image)
is decoded and converted to RGB with PIL, as the torch loader does (``--fast``: the DALI
loader's header probe, which fully decodes only files that look unusual). Prints one line
per finding, ``PATH<TAB>REASON`` (in shards ``SHARD.tar:KEY<TAB>REASON``):

* an unreadable image (skipped by the loaders, counted against ``data.max_bad_fraction``);
* a non-regular file named like an image (a FIFO, socket, device, broken symlink: never
  opened, since reading a FIFO blocks forever; skipped by the loaders);
* a directory symlink loop, or a directory symlink to a folder listed elsewhere (not
  followed by the loaders);
* a file listed twice under different names (symlinks to one file: trained on twice).

then a count per kind. Exits 1 if there is any finding, 2 if ROOT is not an ImageFolder, or
if the shards cannot be trained on at all (missing, not an uncompressed tar, truncated, a
sample without an image: what training refuses), so a job script can check its data before
a multi-day run. ``--workers 1`` checks in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from msn_ds.data.dataset import list_images
from msn_ds.data.probe import BAD, decode_rgb, probe, read_regular


def reason(data: bytes, fast: bool) -> str | None:
    """None if ``data`` decodes (``fast``: passes the DALI loader's probe), else why not."""
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


def check(args: tuple[str, bool]) -> str | None:
    """None if readable, else the reason."""
    path, fast = args
    try:
        data = read_regular(path)  # never blocks: a FIFO made after listing is refused
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return reason(data, fast)


_shards = None  # the ShardSource that check_sample reads (one per worker process)


def open_shards(spec) -> None:
    """A worker's own reader of ``spec`` (its index is cached by then: no scan)."""
    global _shards
    from msn_ds.data.shards import ShardSource

    _shards = ShardSource(spec)


def check_sample(args: tuple[int, bool]) -> str | None:
    """None if sample ``i`` of the shards is readable, else the reason."""
    i, fast = args
    try:
        data = _shards.read(i)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return reason(data, fast)


def run_checks(fn, items: list, workers: int, initializer=None, initargs=()) -> list:
    """``fn`` over ``items``: in this process for one worker, else in a pool."""
    if workers <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
        return list(pool.map(fn, items, chunksize=64))


def check_shards(spec, workers: int, fast: bool) -> int:
    """The shards' part of :func:`main`: unreadable samples by ``shard.tar:key``."""
    global _shards
    from msn_ds.data.shards import ShardError, ShardSource

    try:
        source = ShardSource(spec)  # refuses what training refuses; builds missing indexes
    except (ShardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _shards = source
    try:
        reasons = run_checks(check_sample, [(i, fast) for i in range(len(source))], workers,
                             open_shards, (spec,))
    finally:
        _shards = None
    bad = [(source.key(i), r) for i, r in enumerate(reasons) if r is not None]
    for key, r in bad:
        print(f"{key}\t{r}")
    print(f"{len(bad)} unreadable of {len(source)} images in {source.name}")
    return 1 if bad else 0


def duplicates(paths: list[str]) -> list[tuple[str, str]]:
    """``(path, first path)`` of every listed file that is the same file as an earlier one."""
    seen: dict[tuple[int, int], str] = {}
    out = []
    for q in paths:
        try:
            st = os.stat(q)
        except OSError:
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), q)
        if first != q:
            out.append((q, first))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", nargs="?",
                   help="folder of class sub-folders (or of images), or a shard pattern (.tar)")
    p.add_argument("--shards", nargs="+", metavar="PATTERN",
                   help="check WebDataset tar shards (as data.shards) instead of a folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fast", action="store_true", help="header probe instead of a full decode")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # names that are not UTF-8 print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    if args.root is not None and args.shards:
        print(f"error: give a folder ({args.root}) or --shards, not both", file=sys.stderr)
        return 2
    if args.root is None and not args.shards:
        print("error: give a folder (ROOT) or --shards PATTERN", file=sys.stderr)
        return 2
    if args.root is not None and not os.path.isdir(args.root) and args.root.endswith(".tar"):
        args.shards = [args.root]
    if args.shards:
        spec = args.shards[0] if len(args.shards) == 1 else args.shards
        return check_shards(spec, args.workers, args.fast)
    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    try:
        listing = list_images(args.root, allow_empty=True)
    except FileNotFoundError as e:  # neither class sub-folders nor images in it
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = [s[0] for s in listing.samples]
    reasons = run_checks(check, [(q, args.fast) for q in paths], args.workers)
    bad = [(q, r) for q, r in zip(paths, reasons) if r is not None]
    dups = duplicates(paths)
    for q, r in bad:
        print(f"{q}\t{r}")
    for q, kind in listing.special:
        print(f"{q}\tnot a regular file ({kind}): skipped, never opened")
    for link, real in listing.loops:
        print(f"{link}\tsymlink loop -> {real}: not followed")
    for link, real in listing.duplicate_dirs:
        print(f"{link}\tsymlink to a folder listed elsewhere -> {real}: not followed")
    for q, first in dups:
        print(f"{q}\tduplicate: the same file as {first} (listed twice)")
    print(f"{len(bad)} unreadable of {len(paths)} images in {args.root}")
    extra = [(len(listing.special), "non-regular files skipped"),
             (len(listing.loops), "symlink loops"),
             (len(listing.duplicate_dirs), "symlinks to folders listed elsewhere"),
             (len(dups), "duplicate files")]
    for n, what in extra:
        if n:
            print(f"{n} {what}")
    return 1 if bad or any(n for n, _ in extra) else 0


if __name__ == "__main__":
    sys.exit(main())
