"""Write balanced few-shot subset files for an ImageFolder root.

    python scripts/make_subsets.py data/mnist_demo/train --per-class 1 2 5 --percent 1 \
        --splits 3 --seed 0 --out data/mnist_demo/subsets

writes ``{k}imgs_class_split{s}.txt`` and ``{p}percent_split{s}.txt``, one
``class_dir/filename`` per line (see eval/subsets.py for how images are drawn), each name
as its bytes on disk, so names that are not UTF-8 survive the round trip.
"""
import argparse
import sys

from eval.subsets import make_subsets, write_subsets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", help="ImageFolder root (class sub-folders), e.g. DATA/train")
    p.add_argument("--per-class", type=int, nargs="*", default=[1, 2, 5])
    p.add_argument("--percent", type=float, nargs="*", default=[])
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the subset files")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # paths print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        subsets = make_subsets(args.root, args.per_class, args.percent, args.splits, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in write_subsets(subsets, args.out):
        with open(path, "rb") as f:
            n = sum(1 for _ in f)
        print(f"wrote {path} ({n} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
