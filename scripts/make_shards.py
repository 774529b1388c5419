"""Write an image folder as WebDataset tar shards, in the order the loaders read the folder.

    python scripts/make_shards.py FOLDER --out DIR --shard-size N [--prefix train] [--overwrite]

FOLDER is what ``data.image_folder``'s ``train/`` would be: class sub-folders, or images
directly in it (one unlabelled set, sub-folders of any depth included). It is listed by
``msn_ds.data.source.FolderSource`` itself, so the shards hold its samples in exactly its
order with its labels: sample ``i`` of the folder is sample ``i`` of the shards, and training
with ``data.shards`` gives the folder's batches bit for bit. Shard ``s`` is
``DIR/<prefix>-<s, 6 digits>.tar`` (uncompressed, ``N`` samples, the last one the rest);
sample ``i`` is ``<i, 9 digits>.<ext>``, its image bytes copied verbatim (``ext`` the file's
own, lower case: jpg, jpeg, png, webp), plus ``<i, 9 digits>.cls``, its class index as decimal
text (not written for an unlabelled folder, which reads as label 0 either way).

The other formats the folder loader reads (bmp, ppm, pgm, tif, tiff) are not WebDataset image
types: each is decoded and converted to RGB as both loaders do, and stored as a PNG, which is
lossless for what the loaders see (the same RGB pixels). A file that cannot be read or
decoded is stored as it is (an unreadable file as an empty member), so the shards' samples
stay the folder's and the loaders skip and count it exactly as in the folder; the end
summary counts them (``check_dataset.py`` lists them).

Each shard is written to a temporary file beside it and renamed when complete (fsynced): a
killed run leaves whole shards only, never half of one under its final name. The last lines
printed are the count and the ``data.shards`` value naming the shards; each shard's offset
index (``<shard>.msn-index.json``, see ``msn_ds/data/shards.py``) is built at the end, so
training does not have to, and the shards are read back to check their count and labels.

Exits 2, with a one-line ``error:`` naming the value, for a folder that is missing or holds
no image, a shard size below 1, a ``--out`` that cannot be written or (without
``--overwrite``) already holds files. ``--overwrite`` first removes ``<prefix>-*.tar``
shards (and their indexes) left there by an earlier run, and leaves other files alone.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from msn_ds.data.shards import INDEX_SUFFIX, SHARD_DIGITS, verify, write_shards
from msn_ds.data.source import UNLABELLED, FolderSource
from msn_ds.io.atomic import SaveError, human_size


class _Progress:
    """tqdm's bar on stderr where tqdm is installed and stderr a terminal, else one line per
    shard."""

    def __init__(self, total: int, shards: int):
        self.total, self.shards, self.bar = total, shards, None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit="img", desc="shards", file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        if self.bar.disable:  # stderr is not a terminal (a log file): a line per shard
            self.bar = None

    def image(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def shard(self, s: int, samples_done: int) -> None:
        if self.bar is None:
            print(f"shard {s + 1}/{self.shards} written ({samples_done}/{self.total} images)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_OURS = r"-\d{%d,}\.tar(%s|\.\d+\.[0-9a-f]{8}\.tmp)?$" % (SHARD_DIGITS, re.escape(INDEX_SUFFIX))


def remove_old_shards(out_dir: str, prefix: str) -> int:
    """Remove the shards of an earlier run (``<prefix>-NNNNNN.tar``, their indexes and
    temporaries) from ``out_dir``; returns how many files went."""
    pattern = re.compile(re.escape(prefix) + _OURS)
    gone = 0
    for e in os.scandir(out_dir):
        if pattern.match(e.name) and e.is_file(follow_symlinks=False):
            os.unlink(e.path)
            gone += 1
    return gone


def prepare_out(out_dir: str, prefix: str, overwrite: bool) -> str | None:
    """Create ``out_dir`` if needed; the reason it cannot be used, or None."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"--out {out_dir} exists and is not a folder"
    try:
        os.makedirs(out_dir, exist_ok=True)
        entries = os.listdir(out_dir)
    except OSError as e:
        return f"--out {out_dir}: cannot create or read it ({e.strerror or e})"
    if entries and not overwrite:
        return (f"--out {out_dir} is not empty ({len(entries)} entries, e.g. "
                f"{sorted(entries)[0]}); choose an empty folder or pass --overwrite")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return f"--out {out_dir} is not writable"
    if entries:
        try:
            remove_old_shards(out_dir, prefix)
        except OSError as e:
            return f"--out {out_dir}: cannot remove the earlier shards ({e})"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", help="image folder: class sub-folders, or images directly in it")
    p.add_argument("--out", required=True, help="folder for the shards (created if missing)")
    p.add_argument("--shard-size", dest="shard_size", type=int, required=True, metavar="N",
                   help="samples per shard (the last shard holds the rest)")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (replacing PREFIX-*.tar shards there)")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # names that are not UTF-8 print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    if args.shard_size < 1:
        print(f"error: --shard-size must be at least 1, got {args.shard_size}", file=sys.stderr)
        return 2
    if not args.prefix or "/" in args.prefix or re.search(r"[{}]", args.prefix):
        print(f"error: --prefix {args.prefix!r}: must be a non-empty file name without "
              "'/', '{' or '}'", file=sys.stderr)
        return 2
    try:
        source = FolderSource(args.folder)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    problem = prepare_out(out, args.prefix, args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    unlabelled = source.classes == [UNLABELLED]
    try:
        bar = _Progress(len(source), -(-len(source) // args.shard_size))
        try:
            written = write_shards(source, out, args.shard_size, args.prefix,
                                   labels=not unlabelled, on_image=bar.image, on_shard=bar.shard)
        finally:
            bar.close()
    except (OSError, SaveError) as e:
        print(f"error: cannot write the shards to {out}: {e}", file=sys.stderr)
        return 2
    verify(source, written)
    kind = "unlabelled, label 0" if unlabelled else f"{len(source.classes)} classes"
    print(f"wrote {len(source)} images ({kind}) of {args.folder} as {len(written.paths)} "
          f"shards of up to {args.shard_size} ({human_size(written.bytes)}) in {out}")
    if written.converted:
        print(f"{len(written.converted)} images converted to PNG (not a WebDataset image "
              f"type), e.g. {written.converted[0]}")
    if written.unreadable:
        print(f"{len(written.unreadable)} unreadable images stored as they are (the loaders "
              f"skip and count them, as in the folder), e.g. {written.unreadable[0]}")
    print(f'data.shards="{written.pattern}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
