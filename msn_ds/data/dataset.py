"""ImageFolder datasets for pretraining (multi-view) and evaluation."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from .sampler import seed_for

log = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.convert("RGB")


class MultiViewImageFolder(ImageFolder):
    """ImageFolder whose items are indexed by ``(epoch, index)`` and return
    ``(views, label, skipped)``.

    Each view is seeded by ``(seed, epoch, index, view)``. An unreadable image is replaced
    by the next readable one in folder order; ``skipped`` counts the unreadable files passed
    over (returned with the sample, since loader workers hold their own copies of the
    dataset); the caller decides when too many is too many.
    """

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        super().__init__(root, loader=load_rgb)
        self.multi_transform = transform
        self.seed = seed

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:  # corrupt, truncated, not an image
                log.warning("skipping unreadable image %s: %s", path, e)
                continue
            n = self.multi_transform.num_views
            seeds = [seed_for(self.seed, epoch, index, v) for v in range(n)]
            return self.multi_transform(img, view_seeds=seeds), label, attempt
        raise RuntimeError(f"no readable image in {self.root}")


def collate_views(batch):
    """``[(views, label, skipped)] -> ([view_0 batch, view_1 batch, ...], labels, skipped)``."""
    views, labels, skipped = zip(*batch)
    return [torch.stack(v) for v in zip(*views)], torch.tensor(labels), sum(skipped)


def eval_folder(root: str, transform: Callable, subset_file: Optional[str] = None) -> ImageFolder:
    """ImageFolder, optionally restricted to the images listed in a subset file
    (``class_dir/filename`` per line, the reference's format)."""
    ds = ImageFolder(root, transform=transform, loader=load_rgb)
    if subset_file is not None:
        with open(subset_file) as f:
            wanted = {line.strip() for line in f if line.strip()}
        keep = [(p, y) for p, y in ds.samples
                if os.path.relpath(p, root).replace(os.sep, "/") in wanted]
        missing = len(wanted) - len(keep)
        if missing:
            raise FileNotFoundError(f"{subset_file}: {missing} listed images not found "
                                    f"under {root}")
        ds.samples = ds.imgs = keep
        ds.targets = [y for _, y in keep]
    return ds
