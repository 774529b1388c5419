"""Balanced few-shot subsets of an ImageFolder, written as the reference's subset files.

A subset file lists one training image per line as ``class_dir/filename`` (relative to the
train root), the format :func:`msn_ds.data.eval_folder` reads. Images are listed exactly as
the evaluation's ImageFolder finds them, so every line resolves. Lines are file names as
bytes (``os.fsencode``): a name that is not valid UTF-8 is written as it is on disk and read
back by :func:`msn_ds.data.dataset.read_list_file`.

Within a split, each class's images are shuffled once by a seed derived from
``(seed, split, class name)``, and every subset takes a prefix of that order: the 1-image
subset is contained in the 2-image one, and adding a class elsewhere does not change the
draw of the others.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Iterable, Sequence

import numpy as np

from msn_ds.data.dataset import list_images as list_folder


def list_images(root: str) -> dict[str, list[str]]:
    """``{class_dir: sorted relative paths}``, the images the evaluation's ImageFolder
    (:func:`msn_ds.data.eval_folder`) would load."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    listing = list_folder(root)
    by_class: dict[str, list[str]] = {c: [] for c in listing.classes}
    for path, idx in listing.samples:
        by_class[listing.classes[idx]].append(os.path.relpath(path, root).replace(os.sep, "/"))
    return {c: sorted(v) for c, v in by_class.items()}


def percent_count(percent: float, n: int) -> int:
    """Round-half-up of ``percent`` % of ``n``, at least one image."""
    return max(1, int(math.floor(percent * n / 100.0 + 0.5)))


def subset_name(kind: str, value: float, split: int) -> str:
    if kind == "per_class":
        return f"{int(value)}imgs_class_split{split}.txt"
    return f"{value:g}percent_split{split}.txt"


def class_order(files: Sequence[str], seed: int, split: int, cls: str) -> list[str]:
    """A permutation of one class's images, a function of ``(seed, split, class)`` only."""
    rng = np.random.default_rng([seed, split, zlib.crc32(os.fsencode(cls))])
    return [files[i] for i in rng.permutation(len(files))]


def make_subsets(root: str, per_class: Iterable[int] = (1, 2, 5),
                 percent: Iterable[float] = (), splits: int = 3,
                 seed: int = 0) -> dict[str, list[str]]:
    """``{file name: lines}`` for every requested size and split (lines sorted)."""
    images = list_images(root)
    if not images or not any(images.values()):
        raise ValueError(f"{root}: no class folders with images")
    per_class, percent = list(per_class), list(percent)
    for cls, files in images.items():
        short = [k for k in per_class if k > len(files)]
        if short:
            raise ValueError(f"{root}/{cls}: {len(files)} images, "
                             f"cannot draw {max(short)} per class")
    out: dict[str, list[str]] = {}
    for split in range(splits):
        orders = {c: class_order(f, seed, split, c) for c, f in images.items()}
        for k in per_class:
            if k < 1:
                raise ValueError(f"--per-class must be >= 1, got {k}")
            out[subset_name("per_class", k, split)] = sorted(
                p for o in orders.values() for p in o[:k])
        for p in percent:
            if not 0 < p <= 100:
                raise ValueError(f"--percent must be in (0, 100], got {p}")
            out[subset_name("percent", p, split)] = sorted(
                f for o in orders.values() for f in o[:percent_count(p, len(o))])
    return out


def write_subsets(subsets: dict[str, list[str]], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, lines in subsets.items():
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:  # the names' own bytes, UTF-8 or not
            f.write(b"".join(os.fsencode(line) + b"\n" for line in lines))
        paths.append(path)
    return paths
