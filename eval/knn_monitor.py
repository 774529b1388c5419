"""k-NN accuracy of the target encoder while pretraining runs (``eval.knn_every_steps``).

A recipe that works shows k-NN top-1 rising within the first epochs; one that collapses
shows it flat at chance long before the loss says so. The classifier is :mod:`eval.classify`'s
(weighted votes of the ``k`` most cosine-similar train features, ``T = 0.07``); the
features are the target encoder's class token *before* its final LayerNorm, at the
evaluation transform (resize, centre crop): the reference's protocol and ``eval.knn``'s
default, so the monitor reports what ``python -m eval.knn`` reports on the same weights. The
token is read by a hook on the final norm's input during the target's own forward, so the
modules run in training's order (ZeRO-3's parameter trace stays valid).

Every process extracts the features of its share of the images (``rank::world``) through
the target's own ``forward``, so a ZeRO-3 target gathers its parameters as in training;
rank 0 gathers the features and classifies. Nothing here draws from a global random
generator (no ``DataLoader``, eval mode, no mask), so the training's randomness and data
order, and with them an exact resume, are untouched. Decoded images are kept in memory
when the two sets fit in ``cache_gib``, so later evaluations cost only the forward passes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from msn_ds import distributed
from msn_ds.data import eval_folder, eval_transform, readable_rows

from .classify import knn_accuracy
from .subsets import make_subsets

log = logging.getLogger("msn_ds")


class KNNMonitor:
    def __init__(self, train: str, val: str, *, train_root: Optional[str] = None, k: int = 20,
                 crop: int = 224, resize: int = 256, batch_size: int = 256,
                 temperature: float = 0.07, cache_gib: float = 2.0,
                 train_per_class: Optional[int] = None):
        """``train``: an image folder, or a subset file (``class_dir/filename`` per line) of
        ``train_root``; ``val``: an image folder with the same class folders.
        ``train_per_class``: keep that many images of each class of the train folder, drawn
        as ``make_subsets.py --per-class N --splits 1 --seed 0`` draws them (so a run needs no
        subset file to watch k-NN on a bounded set)."""
        transform = eval_transform(crop, resize)
        if os.path.isfile(train):
            if train_per_class:
                raise ValueError(f"{train} is a subset file already; knn_train_per_class "
                                 "applies to an image folder")
            self.train = eval_folder(train_root, transform, subset_file=train)
        else:
            self.train = eval_folder(train, transform)
            if train_per_class:
                self.train = _per_class(self.train, train, train_per_class)
        self.val = eval_folder(val, transform)
        if self.train.classes != self.val.classes:
            raise ValueError(f"k-NN sets {train} and {val} have different class folders")
        if len(self.train) == 0 or len(self.val) == 0:
            raise ValueError(f"k-NN sets {train} and {val} must not be empty")
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.unreadable = 0  # images of the two sets found unreadable (rank 0's count)
        images = len(self.train) + len(self.val)
        self._cache: Optional[dict[int, torch.Tensor]] = (
            {} if images * 3 * crop * crop * 4 <= cache_gib * 2**30 else None)
        self.describe = (f"k={k}, {len(self.train)} train / {len(self.val)} val images, "
                         f"{crop}-px centre crop")

    @torch.no_grad()
    def __call__(self, target: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype) -> Optional[dict[str, float]]:
        """``{"knn_top1", "knn_top5", "knn_seconds"}`` on rank 0, None elsewhere. Every
        process must call it (the features are gathered)."""
        start = time.perf_counter()
        was_training = target.training
        target.eval()
        try:
            train_x, train_y = self._features(target, self.train, 0, device, dtype)
            val_x, val_y = self._features(target, self.val, len(self.train), device, dtype)
        finally:
            target.train(was_training)
        if not distributed.is_main():
            return None
        self.unreadable = int((~readable_rows(train_y)).sum() + (~readable_rows(val_y)).sum())
        if self.unreadable:  # their rows hold stand-ins: classify without them
            keep_t, keep_v = readable_rows(train_y), readable_rows(val_y)
            train_x, train_y, val_x, val_y = (train_x[keep_t], train_y[keep_t], val_x[keep_v],
                                              val_y[keep_v])
            if not len(train_y) or not len(val_y):
                log.warning("k-NN skipped: no readable image left in %s",
                            "the train set" if not len(train_y) else "the val set")
                return None
        acc = knn_accuracy(train_x, train_y, val_x, val_y, self.k, self.temperature,
                           num_classes=len(self.train.classes))
        out = {"knn_top1": acc["top1"], "knn_top5": acc["top5"],
               "knn_seconds": time.perf_counter() - start}
        if self.unreadable:
            out["knn_unreadable"] = self.unreadable
        return out

    def _features(self, target, dataset, offset: int, device, dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N, D] float32 class tokens, [N] labels)`` on rank 0 (this process's share
        elsewhere); an unreadable image's row has the label ``UNREADABLE``. The label rides
        as one more feature column, so the gather stays one collective."""
        world, rank = distributed.world_size(), distributed.rank()
        per_rank = math.ceil(len(dataset) / world)  # equal work: ZeRO-3 gathers in lockstep
        mine = [min(rank + world * j, len(dataset) - 1) for j in range(per_rank)]
        feats, seen = [], []
        norm = getattr(target, "module", target).backbone.norm  # a ZeRO-3 target is an engine
        hook = norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, 0]))
        try:
            for i in range(0, per_rank, self.batch_size):
                x, y = zip(*(self._item(dataset, offset, j) for j in mine[i:i + self.batch_size]))
                target(torch.stack(x).to(device=device, dtype=dtype))
                h = seen.pop()  # the class token before the final LayerNorm
                feats.append(torch.cat([h.float(), torch.tensor(y, device=h.device,
                                                                dtype=torch.float32)[:, None]], 1))
        finally:
            hook.remove()
        local = torch.cat(feats)
        if world > 1:
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local.contiguous())
            # row j of rank r is image r + world * j: interleave, then drop the padding
            local = torch.stack(gathered, 1).reshape(-1, local.shape[1])[:len(dataset)]
        local = local.cpu()
        return local[:, :-1], local[:, -1].long()

    def _item(self, dataset, offset: int, index: int) -> tuple[torch.Tensor, int]:
        """``(image, label)``: decoded once when the sets fit in the cache (an unreadable
        image included: it is not read again)."""
        if self._cache is None:
            return dataset[index]
        key = offset + index
        if key not in self._cache:
            self._cache[key] = dataset[index]
        return self._cache[key]


def _per_class(dataset, root: str, n: int):
    """``dataset`` restricted to the balanced subset of ``n`` images per class that
    :func:`eval.subsets.make_subsets` draws (its own seeded order: no global RNG)."""
    (lines,) = make_subsets(root, per_class=(n,), splits=1, seed=0).values()
    wanted = set(lines)
    dataset.keep_samples([(p, y) for p, y in dataset.samples
                          if os.path.relpath(p, root).replace(os.sep, "/") in wanted])
    return dataset
