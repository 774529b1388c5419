"""The multi-crop augmentation of DESIGN.md section 1 (torchvision.transforms.v2)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def view_transform(size: int, scale: Sequence[float], color_jitter: float = 0.5,
                   blur_sigma: Sequence[float] = (0.1, 2.0)) -> v2.Compose:
    """Random-resized crop, flip (p 0.5), colour jitter (p 0.8, brightness/contrast/saturation
    0.8 s, hue 0.2 s), grayscale (p 0.2), Gaussian blur (p 0.5, sigma in [0.1, 2]) and
    ImageNet normalisation. The blur kernel spans +-3 sigma of the largest sigma, capped at
    the crop size."""
    s = color_jitter
    kernel = min(2 * math.ceil(3 * blur_sigma[1]) + 1, size - (1 - size % 2))
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToImage(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(crop: int = 224, resize: int = 256) -> v2.Compose:
    """Resize the short side to ``resize``, centre crop ``crop``, normalise."""
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MultiCropTransform:
    """Returns ``[target, anchor x rand_views, focal x focal_views]`` views of one image.

    ``view_seeds`` (one per view) make every view's random parameters a function of the
    caller's seed, independent of worker count and process layout.
    """

    def __init__(self, rand_size: int = 224, focal_size: int = 96, rand_views: int = 1,
                 focal_views: int = 10, color_jitter: float = 0.5,
                 rand_scale: Sequence[float] = (0.3, 1.0),
                 focal_scale: Sequence[float] = (0.05, 0.3)):
        self.rand = view_transform(rand_size, rand_scale, color_jitter)
        self.focal = view_transform(focal_size, focal_scale, color_jitter)
        self.num_rand = rand_views + 1  # the first is the target view
        self.num_focal = focal_views

    @property
    def num_views(self) -> int:
        return self.num_rand + self.num_focal

    def __call__(self, img, view_seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        views = []
        for i in range(self.num_views):
            transform = self.rand if i < self.num_rand else self.focal
            if view_seeds is None:
                views.append(transform(img))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seeds[i])
                    views.append(transform(img))
        return views
