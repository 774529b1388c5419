"""List the images of an ImageFolder that the loaders would skip, and the folder's traps.

    python scripts/check_dataset.py ROOT [--workers N] [--fast]

ROOT is a folder of class sub-folders (e.g. ``imagenet/train``), listed as the loaders list it
(``msn_ds.data.dataset.list_images``). Every listed file (torchvision's image extensions) is
decoded and converted to RGB with PIL, as the torch loader does (``--fast``: the DALI loader's
header probe, which fully decodes only files that look unusual). Prints one line per finding,
``PATH<TAB>REASON``:

* an unreadable image (skipped by the loaders, counted against ``data.max_bad_fraction``);
* a non-regular file named like an image (a FIFO, socket, device, broken symlink: never
  opened, since reading a FIFO blocks forever; skipped by the loaders);
* a directory symlink loop, or a directory symlink to a folder listed elsewhere (not
  followed by the loaders);
* a file listed twice under different names (symlinks to one file: trained on twice).

then a count per kind. Exits 1 if there is any finding, 2 if ROOT is not an ImageFolder, so a
job script can check its data before a multi-day run.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from msn_ds.data.dataset import list_images
from msn_ds.data.probe import BAD, decode_rgb, probe, read_regular


def check(args: tuple[str, bool]) -> str | None:
    """None if readable, else the reason."""
    path, fast = args
    try:
        data = read_regular(path)  # never blocks: a FIFO made after listing is refused
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
    p.add_argument("root", help="folder of class sub-folders")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fast", action="store_true", help="header probe instead of a full decode")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # names that are not UTF-8 print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    if not any(e.is_dir() for e in os.scandir(args.root)):
        print(f"error: {args.root} has no class sub-folders", file=sys.stderr)
        return 2
    listing = list_images(args.root, allow_empty=True)
    paths = [s[0] for s in listing.samples]
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        reasons = list(pool.map(check, [(q, args.fast) for q in paths], chunksize=64))
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
