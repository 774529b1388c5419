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
import torch.nn.functional as F

from msn_ds.data import eval_folder, eval_transform
from msn_ds.models import MSNEncoder
from msn_ds.monitor.table import Column, format_table

from .features import FeatureCache, train_val_features
from .logistic import pixel_transform
from .report import (add_source_args, build_source, representation, sha256_file,  # noqa: F401
                     write_json, write_scalars)


def knn_classify(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[N_test, C]`` (float32): for each test row, the sum over its ``k``
    most cosine-similar train rows of ``exp(sim / temperature)``, per neighbour class.

    Rows are L2-normalised here. ``k`` is clamped to the train set size. The test set is
    processed ``chunk`` rows at a time, so memory is ``O(chunk * N_train)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tr = F.normalize(torch.as_tensor(train_x).float(), dim=1)
    te = torch.as_tensor(test_x).float()
    ytr = torch.as_tensor(train_y).long().to(tr.device)
    if len(tr) == 0:
        raise ValueError("empty train set")
    num_classes = num_classes if num_classes is not None else int(ytr.max()) + 1
    k = min(k, len(tr))
    scores = torch.zeros(len(te), num_classes, dtype=torch.float32)
    for i in range(0, len(te), chunk):
        q = F.normalize(te[i:i + chunk].to(tr.device), dim=1)
        sim, idx = (q @ tr.T).topk(k, dim=1)  # [b, k], largest first
        votes = (sim / temperature).exp()
        part = torch.zeros(len(q), num_classes, dtype=torch.float32, device=tr.device)
        part.scatter_add_(1, ytr[idx], votes)
        scores[i:i + chunk] = part.cpu()
    return scores


def topk_accuracy(scores: torch.Tensor, labels, ks=(1, 5)) -> dict:
    """``{"top1": %, "top5": %}``; top-k with k >= number of classes is 100 %."""
    labels = torch.as_tensor(labels).long()
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * float((top == labels[:, None]).any(dim=1).double().mean())
    return out


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None, chunk: int = 1024) -> dict:
    """``{"top1": %, "top5": %}`` of :func:`knn_classify` on ``test_y``."""
    if num_classes is None:
        num_classes = int(max(torch.as_tensor(train_y).max(), torch.as_tensor(test_y).max())) + 1
    scores = knn_classify(train_x, train_y, test_x, k, temperature, num_classes, chunk)
    return topk_accuracy(scores, test_y)


def load_datasets(root: str, transform, subset: Optional[str] = None):
    """``(train, val)`` ImageFolders of ``root`` with this transform; checks the classes agree."""
    train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
    train_ds = eval_folder(train_root, transform, subset)
    test_ds = eval_folder(val_root, transform)
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"{train_root} and {val_root} have different class folders; "
                         "labels would not line up")
    return train_ds, test_ds


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
    acc = knn_accuracy(torch.as_tensor(train_x).to(device), train_y, test_x, test_y, k,
                       temperature, len(train_ds.classes), chunk)
    return {"protocol": "knn", "representation": representation(pixels, before_norm),
            "feature_dim": int(train_x.shape[1]), "k": k, "k_used": min(k, len(train_y)),
            "temperature": temperature, "crop": crop, "resize": resize,
            "pixel_size": pixel_size if pixels else None, "subset": subset,
            "root": os.path.abspath(root), "num_classes": len(train_ds.classes),
            "num_train": int(len(train_y)), "num_test": int(len(test_y)), **acc}


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
