"""Few-shot logistic regression on frozen features: the MSN reference protocol.

The reference (``logistic_eval.py``) does, for a labelled subset of the train set:

1. ``cyan.preprocess(embs, normalize=True, columns=False, centering=True)`` on the train
   features and, separately, on the test features. cyanure hands ``X.T`` to C++ and centres
   and L2-normalises its *columns*, i.e. each sample: every feature vector has its own mean
   (over its D entries) subtracted and is scaled to unit norm. No statistic is shared between
   train and test. That is ``centering="sample"`` here (the default); ``"train"`` subtracts the
   mean train feature instead (a common variant, not the reference's), ``"none"`` only
   normalises.
2. ``MultiClassifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False)`` fitted
   with ``lambd / n_train``: cyanure minimises ``(1/n) sum_i CE(W^T x_i, y_i) + lambd/2 ||W||^2``.
   We minimise the same strongly convex objective with full-batch, preconditioned L-BFGS
   (strong Wolfe line search, float64) to a gradient of ~1e-9, much tighter than cyanure's
   ``tol=1e-3`` duality gap, so the two agree up to cyanure's own tolerance.
3. top-1 accuracy on the whole val set.

Features are extracted once per (weights, images, transform) and reused for every subset
and every ``--lambd`` value (several may be given); ``--cache-dir`` keeps them on disk for
later runs.

    python -m eval.logistic --weights runs/x/weights.safetensors --root data/mnist_demo \
        --subsets data/mnist_demo/subsets/1imgs_class_split*.txt --crop 32 --resize 32
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msn_ds.data import eval_transform, readable_rows
from msn_ds.data.dataset import read_list_file
from msn_ds.models import MSNEncoder
from msn_ds.monitor.table import Column, format_row, format_table

from .features import (FeatureCache, drop_unreadable, load_datasets, pixel_transform,
                       train_val_features)
from .report import (add_source_args, build_source, check_source_args, representation, write_json,
                     write_scalars)

log = logging.getLogger(__name__)

CENTERING = ("sample", "train", "none")


def preprocess(x: torch.Tensor, centering: str = "sample",
               train_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Centre (see the module docstring) and L2-normalise the rows of ``x`` (float64)."""
    x = x.double()
    if centering == "sample":
        x = x - x.mean(dim=1, keepdim=True)
    elif centering == "train":
        x = x - train_mean.to(x)
    elif centering != "none":
        raise ValueError(f"centering must be one of {CENTERING}, got {centering!r}")
    return F.normalize(x, dim=1, eps=1e-12)


def objective(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lambd: float) -> torch.Tensor:
    """cyanure's multinomial logistic objective: mean cross-entropy + lambd/2 ||W||^2."""
    return F.cross_entropy(x @ W, y) + 0.5 * lambd * W.pow(2).sum()


def fit_logistic(train_x, train_y, num_classes: int, lambd: float, max_iter: int = 1000,
                 gtol: float = 1e-9, device: Optional[str | torch.device] = None) -> torch.Tensor:
    """``W [D, C]`` (float64, no intercept) minimising :func:`objective` with this ``lambd``
    (already divided by n if following the reference).

    Two exact reformulations keep few-shot problems cheap:

    * with fewer samples than dimensions, the minimiser lies in the span of the samples
      (the penalty kills any component the data cannot see), so we solve in an orthonormal
      basis ``Q`` of that span: ``W = Q B``, features ``X Q`` of size ``n``;
    * the features are badly conditioned (after per-sample centring one direction holds
      almost all the variance), so we solve for ``V`` with ``B = P V``,
      ``P = (Z^T Z / (n C) + lambd I)^(-1/2)``: same minimiser, near-isotropic Hessian.

    L-BFGS stops when ``max |grad_V| <= gtol``; as ``||P^-1|| <= 1`` (unit-norm rows,
    ``lambd <= 1/2``) and ``Q`` is orthonormal, the gradient in ``W`` is no larger (2-norm).
    """
    if lambd <= 0:
        raise ValueError("lambd must be > 0 (the objective is then strongly convex)")
    x = torch.as_tensor(train_x)
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, torch.float64)
    y = torch.as_tensor(train_y).to(device, torch.long)
    n, dim = x.shape
    Q = torch.linalg.qr(x.T).Q if n < dim else None  # [D, n], orthonormal columns
    z = x @ Q if Q is not None else x
    evals, U = torch.linalg.eigh(z.T @ z / (n * num_classes))
    P = (U * (evals.clamp_min(0) + lambd).rsqrt()) @ U.T
    V = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, device=device,
                    requires_grad=True)
    opt = torch.optim.LBFGS([V], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            history_size=20, tolerance_grad=gtol, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(P @ V, z, y, lambd)  # ||Q B|| = ||B||: the same objective
        loss.backward()
        return loss

    opt.step(closure)  # until max |grad| <= gtol, no progress, or max_iter iterations
    B = (P @ V).detach()
    return Q @ B if Q is not None else B


def _cyanure_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     lambd: float) -> np.ndarray:
    """The reference's own solver, when ``cyanure`` is installed (not required), run in a
    child process (:mod:`eval.cyanure_solver` says why)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "problem.npz"), os.path.join(tmp, "pred.npy")
        np.savez(src, train_x=train_x, train_y=train_y, test_x=test_x, lambd=lambd)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run([sys.executable, "-m", "eval.cyanure_solver", src, dst],
                              capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"cyanure failed: {proc.stderr[-2000:]}")
        return np.load(dst, allow_pickle=False)


def evaluate_fewshot(train_feats, train_labels, test_feats, test_labels, lambd: float,
                     num_classes: Optional[int] = None, centering: str = "sample",
                     solver: str = "lbfgs", device: Optional[str | torch.device] = None) -> float:
    """Top-1 accuracy (percent) of the reference protocol; ``lambd`` is divided by the number
    of training samples, as ``logistic_eval.py`` does before calling cyanure."""
    tr, te = torch.as_tensor(train_feats), torch.as_tensor(test_feats)
    ytr = torch.as_tensor(train_labels).long()
    yte = torch.as_tensor(test_labels).long()
    mean = tr.double().mean(dim=0) if centering == "train" else None
    tr, te = preprocess(tr, centering, mean), preprocess(te, centering, mean)
    lam = lambd / len(tr)
    if solver == "cyanure":
        pred = torch.from_numpy(_cyanure_predict(tr.numpy(), ytr.numpy(), te.numpy(), lam))
    elif solver == "lbfgs":
        k = num_classes if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
        W = fit_logistic(tr, ytr, k, lam, device=device)
        pred = (te.to(W.device) @ W).argmax(dim=1).cpu()
    else:
        raise ValueError(f"solver must be 'lbfgs' or 'cyanure', got {solver!r}")
    return 100.0 * float((pred == yte).double().mean())


def cyanure_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cyanure") is not None


def read_subset(path: str) -> list[str]:
    """The subset's ``class_dir/filename`` lines; names as bytes, so that non-UTF-8 names
    match the files (see :func:`msn_ds.data.dataset.read_list_file`)."""
    return read_list_file(path)


def check_lambd(values: Sequence[float]) -> Optional[str]:
    """What is wrong with the ``--lambd`` values, if anything (checked before any feature
    is extracted, so one bad value in a sweep costs nothing)."""
    for v in values:
        if not (math.isfinite(v) and v > 0):
            return f"--lambd must be a finite value > 0 (the objective is then strongly " \
                   f"convex), got {v:g}"
    return None


def group_name(path: str) -> str:
    """``.../1imgs_class_split2.txt -> 1imgs_class``: the splits of one size form a group."""
    return re.sub(r"_split\d+$", "", os.path.splitext(os.path.basename(path))[0])


def run_fewshot(encoder: Optional[MSNEncoder], root: str, subset_files: Sequence[str],
                lambd: float = 0.0025, crop: int = 224, resize: int = 256,
                before_norm: bool = True, pixels: bool = False, *, batch_size: int = 256,
                device: Optional[str] = None, num_workers: int = 0, centering: str = "sample",
                solver: str = "lbfgs", pixel_size: Optional[int] = None,
                cache: Optional[FeatureCache] = None) -> dict:
    """Train on ``root/train`` restricted to each subset file, test on all of ``root/val``.

    Features of the union of the subsets' images are extracted once and indexed per subset
    (a 1 % ImageNet run does not embed all 1.28 M training images). ``encoder=None`` or
    ``pixels=True`` evaluates raw pixels instead. Pass one ``cache`` to several calls (other
    ``lambd``, other splits) to extract the features only once.
    """
    problem = check_lambd([lambd])
    if problem:
        raise ValueError(problem)
    pixels = pixels or encoder is None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    transform = pixel_transform(pixel_size) if pixels else eval_transform(crop, resize)
    train_ds, test_ds = load_datasets(root, transform)
    train_root = os.path.join(root, "train")

    subsets = {path: read_subset(path) for path in subset_files}
    empty = [path for path, lines in subsets.items() if not lines]
    if empty:
        raise ValueError(f"empty subset file: {empty[0]}")
    wanted = sorted({line for lines in subsets.values() for line in lines})
    by_rel = {os.path.relpath(p, train_root).replace(os.sep, "/"): (p, y)
              for p, y in train_ds.samples}
    missing = [w for w in wanted if w not in by_rel]
    if missing:
        raise FileNotFoundError(f"{len(missing)} subset images not found under {train_root}, "
                                f"e.g. {missing[0]!r} (lines are class_dir/filename)")
    train_ds.keep_samples([by_rel[w] for w in wanted])
    row = {w: i for i, w in enumerate(wanted)}

    train_x, train_y, test_x, test_y = train_val_features(
        encoder, train_ds, test_ds, pixels=pixels, before_norm=before_norm, cache=cache,
        batch_size=batch_size, device=device, num_workers=num_workers)
    rows = len(train_y) + len(test_y)
    test_x, test_y = drop_unreadable(test_x, test_y, test_ds, "val")
    readable = readable_rows(train_y)  # a subset's unreadable images are left out of it
    if not readable.all():
        log.warning("train: %d unreadable images left out of the subsets (%s)",
                    int((~readable).sum()), train_root)
    if not len(test_y):
        raise ValueError(f"no readable image in {os.path.join(root, 'val')}")
    rep = representation(pixels, before_norm)
    solve_device = device if solver == "lbfgs" else None

    splits, groups = [], {}
    for path, lines in subsets.items():
        idx = np.array([row[w] for w in lines])
        idx = idx[readable[idx]]
        if not len(idx):
            raise ValueError(f"{path}: no readable image among its {len(lines)}")
        acc = evaluate_fewshot(train_x[idx], train_y[idx], test_x, test_y, lambd,
                               num_classes=len(train_ds.classes), centering=centering,
                               solver=solver, device=solve_device)
        splits.append({"subset": path, "group": group_name(path), "num_train": len(idx),
                       "top1": acc})
        groups.setdefault(group_name(path), []).append(acc)
    summary = {g: {"mean": float(np.mean(a)), "splits": len(a), "top1": a,
                   "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0}  # across splits
               for g, a in groups.items()}
    return {"protocol": "logistic", "representation": rep, "feature_dim": int(train_x.shape[1]),
            "lambd": lambd, "centering": centering, "solver": solver, "crop": crop,
            "resize": resize, "pixel_size": pixel_size if pixels else None,
            "root": os.path.abspath(root),
            "num_classes": len(train_ds.classes), "num_test": int(len(test_y)),
            "num_train_extracted": int(len(train_y)), "splits": splits, "groups": summary,
            "num_unreadable": rows - int(readable.sum()) - len(test_y)}


def format_result(result: dict, title: str = "") -> str:
    head = (f"{title + ': ' if title else ''}{result['representation']} features "
            f"(D={result['feature_dim']}), lambd={result['lambd']:g}/n, "
            f"centering={result['centering']}, solver={result['solver']}, "
            f"{result['num_test']} test images")
    columns = [Column("subset", 36, align="<"), Column("n_train", 8), Column("top1", 9, ".2f")]
    rows = [(os.path.basename(s["subset"]), s["num_train"], s["top1"]) for s in result["splits"]]
    rows += [f"{format_row(columns[:1], [g])}{s['mean']:>8.2f} +- {s['std']:.2f} "
             f"({s['splits']} splits)" for g, s in result["groups"].items()]
    return format_table(columns, rows, title=head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.logistic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--subsets", nargs="+", required=True, help="subset files (class_dir/file)")
    p.add_argument("--lambd", type=float, nargs="+", default=[0.0025],
                   help="L2 weight before division by n (README 0.0025 for 1-5 images per "
                        "class, 0.075 for 1 %%); several values reuse the same features")
    p.add_argument("--centering", choices=CENTERING, default="sample",
                   help="sample: the reference's per-vector centring (default)")
    p.add_argument("--solver", choices=("lbfgs", "cyanure"), default="lbfgs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a non-UTF-8 path in the table prints
        sys.stdout.reconfigure(errors="backslashreplace")
    problem = check_lambd(args.lambd) or check_source_args(args)
    if problem:  # before the weights are loaded and any feature extracted
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.solver == "cyanure" and not cyanure_available():
        print("error: --solver cyanure needs the cyanure package (pip install cyanure)",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = FeatureCache(args.cache_dir)
    results = []
    try:
        encoder, source = build_source(args, device)
        for lambd in args.lambd:
            result = run_fewshot(encoder, args.root, args.subsets, lambd, args.crop,
                                 args.resize, before_norm=not args.after_norm,
                                 pixels=args.pixels, batch_size=args.feature_batch_size,
                                 device=device, num_workers=args.num_workers,
                                 centering=args.centering, solver=args.solver,
                                 pixel_size=args.pixel_size, cache=cache)
            result.update(source)
            print(format_result(result, source["source"]))
            results.append(result)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, results[0] if len(results) == 1 else {"sweep": results})
    if args.run_dir:
        scalars = {f"eval/fewshot_{g}_top1" + (f"_lambd{r['lambd']:g}" if len(results) > 1
                                                else ""): s["mean"]
                   for r in results for g, s in r["groups"].items()}
        print("TensorBoard:", write_scalars(args.run_dir, scalars, source.get("step")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
