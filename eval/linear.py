"""Linear classification on frozen features: the MSN paper's protocol, scaled down.

The paper trains a linear layer on the frozen class token with SGD + Nesterov momentum 0.9,
batch 16384, lr 6.4 for 100 epochs. Here:

* features (class token before the final LayerNorm, ``--after-norm`` for after, or raw
  pixels with ``--pixels``) are **extracted once** and kept (in memory; with ``--cache-dir``
  on disk too, shared with :mod:`eval.logistic` and :mod:`eval.knn`), with the eval transform
  (resize, centre crop). The paper's training augmentation (random resized crop +
  horizontal flip) is optional, ``--augment``: it re-extracts the train features every epoch
  (a forward pass of the frozen encoder over the train set per epoch), which is what makes
  linear evaluation expensive; caching is the default because with a frozen encoder it
  changes the result only a little and costs one pass instead of ``epochs`` passes;
* every feature vector is L2-normalised; a single ``nn.Linear`` (with bias) is trained with
  cross-entropy, SGD + Nesterov momentum 0.9, weight decay 0 by default;
* ``lr = base_lr * batch_size / 16384`` (``base_lr`` 6.4), decayed per step with a cosine
  schedule over all the epochs' steps to 0;
* top-1 / top-5 accuracy on all of ``ROOT/val`` (eval transform, no augmentation).

Data parallel: under ``torchrun`` (gloo on CPU, nccl on GPU) each process extracts an
interleaved shard of the images, the shards are all-gathered into the same cache on every
process, and each global batch (a seeded per-epoch permutation, the same on every process)
is split across processes. Each process's loss is its share of the *global* batch mean
(sum of its cross-entropies / global batch size) and the linear layer's gradients are summed
with ``all_reduce``, i.e. the gradient of the global batch mean, so the result equals the
single-process run up to float summation order. Without a launcher the world size is 1.

Resumable: with ``--out DIR`` the weights, optimiser state and epoch are written to
``DIR/linear_last.pt`` after every epoch (temporary file + ``os.replace``); ``--resume``
continues from it. The per-epoch permutation and the lr depend only on the seed, the epoch and
the step, so an interrupted and resumed run is bit-for-bit the uninterrupted one.

    python -m eval.linear --weights runs/x/weights.safetensors --root data/mnist_demo \
        --crop 32 --resize 32 --epochs 100 --batch-size 256 --out runs/x/linear
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset
from torchvision.transforms import v2

from msn_ds import distributed
from msn_ds.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from msn_ds.io.atomic import atomic_write
from msn_ds.monitor.table import Column, format_table
from msn_ds.schedules import cosine

from .classify import topk_accuracy
from .features import (FeatureCache, dataset_features, drop_unreadable, encoder_fingerprint,
                       load_datasets, pixel_transform)
from .report import (add_source_args, build_source, check_source_args, representation, unwritable,
                     write_json, write_scalars)

REFERENCE_BATCH = 16384
CHECKPOINT = "linear_last.pt"


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: ``base_lr`` is the lr at batch 16384 (the paper: 6.4)."""
    return base_lr * batch_size / REFERENCE_BATCH


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[tuple[torch.Tensor, int]]:
    """This process's ``(indices, global batch size)`` per step of ``epoch``: every process
    draws the same permutation and takes every ``world_size``-th index of each global batch.
    Not :class:`msn_ds.data.GlobalBatchSampler`: every image counts here, so the last, partial
    batch is kept (the sampler drops it), and results stay those of earlier runs."""
    perm = epoch_permutation(n, seed, epoch)
    return [(perm[i:i + batch_size][rank::world_size], len(perm[i:i + batch_size]))
            for i in range(0, n, batch_size)]


def train_linear(train_x, train_y, num_classes: int, *, epochs: int = 100,
                 batch_size: int = 16384, base_lr: float = 6.4, momentum: float = 0.9,
                 weight_decay: float = 0.0, seed: int = 0, out: Optional[str] = None,
                 resume: bool = False, stop_after: Optional[int] = None,
                 device: str | torch.device = "cpu",
                 features: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                 log: Optional[Callable[[str], None]] = None) -> tuple[nn.Linear, dict]:
    """Train ``nn.Linear(D, num_classes)`` on L2-normalised ``train_x``; returns the layer and
    ``{"epoch", "train_top1", "loss"}`` of the last epoch trained.

    ``features(epoch, indices)``, when given, supplies the (unnormalised) train features of
    those rows for that epoch (augmentation); ``train_x`` then only gives the shape.
    ``stop_after`` ends the run after that many epochs in total (the schedule still spans
    ``epochs``): an interruption, for testing resumption.
    """
    rank, world_size = distributed.rank(), distributed.world_size()
    device = torch.device(device)
    x_all = torch.as_tensor(train_x)
    y_all = torch.as_tensor(train_y).long()
    n, dim = x_all.shape
    if features is None:
        x_all = F.normalize(x_all.float(), dim=1).to(device)
    y_all = y_all.to(device)
    torch.manual_seed(seed)
    model = nn.Linear(dim, num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(base_lr, batch_size),
                          momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    config = {"dim": dim, "num_classes": num_classes, "epochs": epochs, "batch_size": batch_size,
              "base_lr": base_lr, "momentum": momentum, "weight_decay": weight_decay,
              "seed": seed, "num_train": n}
    start = 0
    ckpt_path = os.path.join(out, CHECKPOINT) if out else None
    if resume and ckpt_path and os.path.exists(ckpt_path):
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
            saved = ckpt["config"]
            diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        except Exception as e:  # truncated, not a checkpoint, or not ours
            raise ValueError(f"{ckpt_path}: cannot resume from it ({type(e).__name__}: "
                             f"{e}); remove it to start over") from None
        if diff:
            raise ValueError(f"{ckpt_path} was written with other settings "
                             f"(checkpoint, now): {diff}")
        try:
            model.load_state_dict(ckpt["linear"])
            opt.load_state_dict(ckpt["optimizer"])
            start = int(ckpt["epoch"])
        except Exception as e:
            raise ValueError(f"{ckpt_path}: cannot resume from it ({type(e).__name__}: "
                             f"{e}); remove it to start over") from None
        if log:
            log(f"resumed from {ckpt_path} at epoch {start}")

    lr0 = scaled_lr(base_lr, batch_size)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    last = {"epoch": start}
    end = epochs if stop_after is None else min(epochs, stop_after)
    for epoch in range(start, end):
        batches = epoch_batches(n, batch_size, seed, epoch, rank, world_size)
        if features is not None:  # this epoch's (augmented) features of this rank's rows
            rows = torch.cat([idx for idx, _ in batches])
            fx = F.normalize(torch.as_tensor(features(epoch, rows)).float(), dim=1).to(device)
            pos = torch.empty(n, dtype=torch.long)
            pos[rows] = torch.arange(len(rows))
        correct = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        model.train()
        for b, (idx, global_bs) in enumerate(batches):
            step = epoch * steps_per_epoch + b
            for group in opt.param_groups:
                group["lr"] = cosine(step, total, lr0, 0.0)
            x = fx[pos[idx].to(device)] if features is not None else x_all[idx.to(device)]
            y = y_all[idx.to(device)]
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum") / global_bs
            opt.zero_grad(set_to_none=False)
            loss.backward()
            for p in model.parameters():
                if p.grad is None:  # an empty local share of a tiny last batch
                    p.grad = torch.zeros_like(p)
            for p in model.parameters():
                distributed.all_reduce_sum_(p.grad)
            opt.step()
            correct += (logits.argmax(1) == y).sum().double()
            loss_sum += loss.detach().double() * global_bs
        stats = torch.stack([correct, loss_sum])
        distributed.all_reduce_sum_(stats)
        last = {"epoch": epoch + 1, "train_top1": 100.0 * float(stats[0]) / n,
                "loss": float(stats[1]) / n}
        if ckpt_path and rank == 0:
            state = {"linear": model.state_dict(), "optimizer": opt.state_dict(),
                     "epoch": epoch + 1, "config": config}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {last['loss']:.4f} "
                f"train top1 {last['train_top1']:.2f} lr {cosine(step + 1, total, lr0, 0.0):.4g}")
        distributed.barrier()
    return model, last


@torch.no_grad()
def evaluate_linear(model: nn.Linear, test_x, test_y) -> dict:
    device = next(model.parameters()).device
    model.eval()
    x = F.normalize(torch.as_tensor(test_x).float(), dim=1).to(device)
    return topk_accuracy(model(x).float().cpu(), test_y)


def augment_transform(crop: int) -> v2.Compose:
    """The paper's linear-eval training augmentation: random resized crop + flip."""
    return v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def sharded_features(dataset, rows: Optional[torch.Tensor] = None, gather: bool = True,
                     **kw) -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` of ``dataset`` (restricted to ``rows``), each process extracting
    every ``world_size``-th row; with ``gather`` the full arrays, in row order, on every
    process. An unreadable image's label is ``UNREADABLE``; the labels ride the gather as
    one more feature column."""
    rank, world_size = distributed.rank(), distributed.world_size()
    rows = torch.arange(len(dataset)) if rows is None else rows
    mine = rows[rank::world_size] if gather else rows
    x, y = dataset_features(kw.pop("encoder"), Subset(dataset, mine.tolist()), **kw)
    if world_size == 1 or not gather:
        return x, y
    x = torch.cat([torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)[:, None]], 1)
    dev = distributed.comm_device()
    size = math.ceil(len(rows) / world_size)
    pad = torch.zeros(size, x.shape[1], dtype=torch.float32, device=dev)
    pad[:len(x)] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(world_size)]
    dist.all_gather(parts, pad)
    full = torch.empty(len(rows), x.shape[1], dtype=torch.float32)
    for r, part in enumerate(parts):
        full[r::world_size] = part[:len(range(r, len(rows), world_size))].cpu()
    return full[:, :-1].numpy(), full[:, -1].long().numpy()


def cached_features(cache: Optional[FeatureCache], encoder_key: str, dataset, **kw):
    """:func:`sharded_features` ``(x, y)`` of the whole ``dataset`` through ``cache``. Every process
    must take the same branch (extraction is collective), so a disk entry is used only
    when every process can read it."""
    if cache is None:
        return sharded_features(dataset, **kw)
    key = FeatureCache.key(encoder_key, dataset)
    labels = np.asarray(dataset.targets, np.int64)
    width = None if kw.get("pixels") or kw.get("encoder") is None else kw["encoder"].spec.embed_dim
    if distributed.world_size() > 1:
        have = cache.folder is not None and os.path.exists(os.path.join(cache.folder, f"{key}.npz"))
        flag = torch.tensor([float(have)], device=distributed.comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            xy = sharded_features(dataset, **kw)
            if distributed.is_main():  # the one writer; the others keep theirs in memory
                cache.get(key, lambda: xy, labels=labels, width=width)
            distributed.barrier()
            return xy
    # an entry whose rows or labels do not match the image list is recomputed (on every
    # process alike: each reads the same entry and finds the same mismatch)
    return cache.get(key, lambda: sharded_features(dataset, **kw), labels=labels, width=width)


def run_linear(encoder, root: str, *, epochs: int = 100, batch_size: int = 16384,
               base_lr: float = 6.4, momentum: float = 0.9, weight_decay: float = 0.0,
               crop: int = 224, resize: int = 256, subset: Optional[str] = None,
               before_norm: bool = True, pixels: bool = False, augment: bool = False,
               seed: int = 0, out: Optional[str] = None, resume: bool = False,
               stop_after: Optional[int] = None, feature_batch_size: int = 256,
               device: Optional[str] = None, num_workers: int = 0,
               pixel_size: Optional[int] = None, log=None,
               cache: Optional[FeatureCache] = None) -> dict:
    """Linear evaluation of ``encoder`` (or raw pixels) on ``root``; a JSON-ready dict."""
    problem = check_counts(epochs=epochs, batch_size=batch_size, stop_after=stop_after,
                           feature_batch_size=feature_batch_size)
    if problem:  # before any feature is extracted
        raise ValueError(problem)
    pixels = pixels or encoder is None
    if augment and pixels:
        raise ValueError("--augment needs an encoder (not --pixels)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    transform = pixel_transform(pixel_size) if pixels else eval_transform(crop, resize)
    train_ds, test_ds = load_datasets(root, transform, subset)
    kw = dict(encoder=encoder, pixels=pixels, before_norm=before_norm,
              batch_size=feature_batch_size, device=device, num_workers=num_workers)
    train_y = np.asarray(train_ds.targets, dtype=np.int64)
    feature_fn = None
    if augment:
        train_x = np.empty((len(train_ds), encoder.spec.embed_dim), np.float32)
        aug_ds, _ = load_datasets(root, augment_transform(crop), subset)

        def augmented(epoch: int, rows: torch.Tensor) -> np.ndarray:
            rank = distributed.rank()  # random crops: a function of (seed, epoch, rank), resumable
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
                return sharded_features(aug_ds, rows, gather=False, **kw)[0]
        feature_fn = augmented
    enc_key = encoder_fingerprint(None if pixels else encoder, before_norm) if cache else ""
    if not augment:  # unreadable images are left out (augmented: their stand-ins stay)
        train_x, train_y = drop_unreadable(*cached_features(cache, enc_key, train_ds, **kw),
                                           train_ds, "train")
    test_x, test_y = drop_unreadable(*cached_features(cache, enc_key, test_ds, **kw), test_ds,
                                     "val")
    model, last = train_linear(train_x, train_y, len(train_ds.classes), epochs=epochs,
                               batch_size=batch_size, base_lr=base_lr, momentum=momentum,
                               weight_decay=weight_decay, seed=seed, out=out, resume=resume,
                               stop_after=stop_after, device=device, features=feature_fn,
                               log=log)
    acc = evaluate_linear(model, test_x, test_y)
    world_size = distributed.world_size()
    return {"protocol": "linear", "representation": representation(pixels, before_norm),
            "feature_dim": int(train_x.shape[1]), "epochs": epochs,
            "epochs_trained": last["epoch"], "batch_size": batch_size, "base_lr": base_lr,
            "lr": scaled_lr(base_lr, batch_size), "momentum": momentum, "nesterov": True,
            "weight_decay": weight_decay, "schedule": "cosine", "augment": augment,
            "seed": seed, "world_size": world_size, "crop": crop, "resize": resize,
            "pixel_size": pixel_size if pixels else None, "subset": subset,
            "root": os.path.abspath(root), "num_classes": len(train_ds.classes),
            "num_train": int(len(train_y)), "num_test": int(len(test_y)),
            "train_top1": last.get("train_top1"), "train_loss": last.get("loss"), **acc}


def check_counts(**counts: Optional[int]) -> Optional[str]:
    """What is wrong with the positive counts (``--epochs``, ``--batch-size``...), if anything:
    a batch of 0 divides by zero and 0 epochs train nothing (nan accuracy)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    return None


def format_result(result: dict, title: str = "") -> str:
    head = (f"{title + ': ' if title else ''}{result['representation']} features "
            f"(D={result['feature_dim']}), linear, {result['epochs_trained']}/{result['epochs']} "
            f"epochs, batch {result['batch_size']}, lr {result['lr']:.4g}, "
            f"{result['num_train']} train / {result['num_test']} test images")
    train = result["train_top1"]
    columns = [Column("train top1", 11, ".2f"), Column("top1", 8, ".2f"), Column("top5", 8, ".2f")]
    return format_table(columns, [(train if train is not None else float("nan"),
                                   result["top1"], result["top5"])], title=head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--subset", default=None, help="restrict ROOT/train to this subset file "
                                                  "(e.g. 1 %% of ImageNet)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=REFERENCE_BATCH,
                   help="global batch (all processes together)")
    p.add_argument("--base-lr", type=float, default=6.4, help="lr at batch 16384")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--augment", action="store_true",
                   help="random resized crop + flip, features re-extracted every epoch")
    p.add_argument("--train-seed", type=int, default=0, help="classifier init and shuffling")
    p.add_argument("--out", default=None, help=f"folder for {CHECKPOINT} (every epoch)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in total (schedule still spans --epochs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resume and not args.out:
        print("error: --resume needs --out", file=sys.stderr)
        return 2
    problem = check_counts(epochs=args.epochs, batch_size=args.batch_size,
                           stop_after=args.stop_after, feature_batch_size=args.feature_batch_size
                           ) or check_source_args(args, positive=("base_lr",)) or (
        f"--momentum {args.momentum}: must be in [0, 1)" if not 0 <= args.momentum < 1 else None
    ) or (f"--weight-decay {args.weight_decay}: must be a finite number, 0 or more"
          if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0) else None) or (
        f"--out {args.out} {unwritable(args.out)}" if args.out and unwritable(args.out)
        else None)
    if problem:  # before loading weights or extracting features
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        try:
            distributed.init_process_group()
        except distributed.LaunchError as e:  # a rank missing, a bad variable
            print(f"error: {e}", file=sys.stderr)
            return 2
    rank = distributed.rank()
    device = args.device or str(distributed.step_device())
    log = print if rank == 0 else None
    try:
        encoder, source = build_source(args, device)
        result = run_linear(encoder, args.root, epochs=args.epochs, batch_size=args.batch_size,
                            base_lr=args.base_lr, momentum=args.momentum,
                            weight_decay=args.weight_decay, crop=args.crop, resize=args.resize,
                            subset=args.subset, before_norm=not args.after_norm,
                            pixels=args.pixels, augment=args.augment, seed=args.train_seed,
                            out=args.out, resume=args.resume, stop_after=args.stop_after,
                            feature_batch_size=args.feature_batch_size, device=device,
                            num_workers=args.num_workers, pixel_size=args.pixel_size, log=log,
                            cache=FeatureCache(args.cache_dir) if args.cache_dir else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.cleanup()
        return 2
    result.update(source)
    if rank == 0:
        print(format_result(result, source["source"]))
        if args.json:
            write_json(args.json, result)
        if args.run_dir:
            print("TensorBoard:", write_scalars(args.run_dir, {
                "eval/linear_top1": result["top1"], "eval/linear_top5": result["top5"]},
                source.get("step")))
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
