"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Train and test features are L2-normalised; each test feature takes its ``k`` (default 20)
nearest train features by cosine similarity, and each neighbour votes for its class with
weight ``exp(sim / T)`` (``T = 0.07``). The class scores are the summed votes; top-1 / top-5
accuracy are read off them. Nothing is trained, so the result depends only on the features
(and ``k``, ``T``): a quick check of a representation that needs no hyper-parameter search.

Train is ``ROOT/train`` (optionally restricted to a subset file, ``class_dir/filename`` per
line), test is all of ``ROOT/val``. Features are the class token before the final LayerNorm
(``--after-norm`` for after), as in :mod:`eval.logistic`; ``--pixels`` uses raw pixels.

    python -m eval.knn --weights runs/x/weights.safetensors --root data/mnist_demo \
        --crop 32 --resize 32 --json runs/x/knn.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from msn_ds.data import eval_transform
from msn_ds.models import MSNEncoder
from msn_ds.monitor.table import Column, format_table

from .classify import knn_accuracy
from .features import (FeatureCache, drop_unreadable, load_datasets, pixel_transform,
                       train_val_features)
from .report import (add_source_args, build_source, check_source_args, representation, write_json,
                     write_scalars)


def run_knn(encoder: Optional[MSNEncoder], root: str, k: int = 20, temperature: float = 0.07,
            crop: int = 224, resize: int = 256, subset: Optional[str] = None,
            before_norm: bool = True, pixels: bool = False, *, batch_size: int = 256,
            device: Optional[str] = None, num_workers: int = 0,
            pixel_size: Optional[int] = None, chunk: int = 1024,
            cache: Optional[FeatureCache] = None) -> dict:
    """k-NN evaluation of ``encoder`` (or raw pixels) on ``root``; a JSON-ready dict."""
    pixels = pixels or encoder is None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    transform = pixel_transform(pixel_size) if pixels else eval_transform(crop, resize)
    train_ds, test_ds = load_datasets(root, transform, subset)
    train_x, train_y, test_x, test_y = train_val_features(
        encoder, train_ds, test_ds, pixels=pixels, before_norm=before_norm, cache=cache,
        batch_size=batch_size, device=device, num_workers=num_workers)
    rows = len(train_y) + len(test_y)
    train_x, train_y = drop_unreadable(train_x, train_y, train_ds, "train")
    test_x, test_y = drop_unreadable(test_x, test_y, test_ds, "val")
    if not len(train_y) or not len(test_y):
        raise ValueError(f"no readable image in {root}/{'val' if len(train_y) else 'train'}")
    acc = knn_accuracy(torch.as_tensor(train_x).to(device), train_y, test_x, test_y, k,
                       temperature, len(train_ds.classes), chunk)
    return {"protocol": "knn", "representation": representation(pixels, before_norm),
            "feature_dim": int(train_x.shape[1]), "k": k, "k_used": min(k, len(train_y)),
            "temperature": temperature, "crop": crop, "resize": resize,
            "pixel_size": pixel_size if pixels else None, "subset": subset,
            "root": os.path.abspath(root), "num_classes": len(train_ds.classes),
            "num_train": int(len(train_y)), "num_test": int(len(test_y)),
            "num_unreadable": rows - len(train_y) - len(test_y), **acc}


def format_result(result: dict, title: str = "") -> str:
    head = (f"{title + ': ' if title else ''}{result['representation']} features "
            f"(D={result['feature_dim']}), k={result['k_used']}, T={result['temperature']:g}, "
            f"{result['num_train']} train / {result['num_test']} test images")
    return format_table([Column("top1", 8, ".2f"), Column("top5", 8, ".2f")],
                        [(result["top1"], result["top5"])], title=head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--subset", default=None, help="restrict ROOT/train to this subset file")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--chunk", type=int, default=1024, help="test rows per similarity block")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_source_args(args, positive=("temperature",)) or (
        f"--k {args.k}: must be 1 or more" if args.k < 1 else None) or (
        f"--chunk {args.chunk}: must be 1 or more" if args.chunk < 1 else None)
    if problem:  # before the weights are loaded and any feature extracted
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder, source = build_source(args, device)
        result = run_knn(encoder, args.root, args.k, args.temperature, args.crop, args.resize,
                         args.subset, before_norm=not args.after_norm, pixels=args.pixels,
                         batch_size=args.feature_batch_size, device=device,
                         num_workers=args.num_workers, pixel_size=args.pixel_size,
                         chunk=args.chunk, cache=FeatureCache(args.cache_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(source)
    print(format_result(result, source["source"]))
    if args.json:
        write_json(args.json, result)
    if args.run_dir:
        print("TensorBoard:", write_scalars(args.run_dir, {"eval/knn_top1": result["top1"],
                                                          "eval/knn_top5": result["top5"]},
                                            source.get("step")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
