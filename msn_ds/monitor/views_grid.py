"""An image grid of a few samples' views exactly as the encoders receive them, so a user can
check the augmentation by eye (TensorBoard ``data/views`` at run start, or
``scripts/show_views.py``).

One row per image: target, random anchor(s), focal anchors, de-normalised. The patches the
first training step drops from the random anchor views are greyed out: the mask is drawn
by :mod:`msn_ds.masking` from the same numbers as the trainer's, so it is the mask of that
step, not a look-alike. The images are the first of epoch 0 in the global order, as the
data's ``preview`` gives them (the training loader is not touched).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..masking import keep_indices, mask_generator


def anchor_masks(views: Sequence[torch.Tensor], num_rand: int, patch_size: int, mask_ratio: float,
                 batch_size: int, per_sample: bool, seed: int, step: int = 0) -> list[torch.Tensor]:
    """Boolean ``(n, gh, gw)`` masks (True: dropped) for each random anchor view, as the
    trainer drops tokens at ``step`` for a batch of ``batch_size`` per process."""
    anchors = views[1:num_rand]
    n, size = anchors[0].shape[0], anchors[0].shape[-1]
    g = size // patch_size
    if mask_ratio <= 0 or g == 0:
        return [torch.zeros(n, g, g, dtype=torch.bool) for _ in anchors]
    rows = batch_size * len(anchors)  # the masked group: all anchor views, view-major
    idx = keep_indices(g * g, mask_ratio, rows, per_sample, mask_generator(seed, step), "cpu")
    masks = []
    for a in range(len(anchors)):
        drop = torch.ones(n, g * g, dtype=torch.bool)
        for i in range(n):
            drop[i, idx[a * batch_size + i] if per_sample else idx] = False
        masks.append(drop.view(n, g, g))
    return masks


def views_grid(views: Sequence[torch.Tensor], num_rand: int, masks: Sequence[torch.Tensor] = (),
               patch_size: int = 16, pad: int = 2) -> torch.Tensor:
    """``(3, H, W)`` uint8 grid: a row per sample, a cell per view (focal views top-left in
    a cell of the largest size), masked patches of the anchor views grey."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imgs = [(v.detach().float().cpu() * std + mean).clamp(0, 1) for v in views]
    for a, drop in enumerate(masks):
        x = imgs[1 + a].clone()
        up = drop.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
        h, w = up.shape[-2:]
        region = x[:, :, :h, :w]
        region[up.unsqueeze(1).expand_as(region)] = 0.5
        imgs[1 + a] = x
    n = imgs[0].shape[0]
    cell = max(v.shape[-1] for v in imgs)
    grid = torch.ones(3, n * (cell + pad) + pad, len(imgs) * (cell + pad) + pad)
    for c, v in enumerate(imgs):
        for r in range(n):
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            grid[:, y:y + v.shape[-2], x:x + v.shape[-1]] = v[r]
    return (grid * 255).round().to(torch.uint8)


def grid_for_config(cfg: dict, data, num_samples: int = 4) -> torch.Tensor:
    """The grid for a resolved config: the views of ``data`` (a
    :class:`~msn_ds.data.loader.PretrainData`), its patch size, its mask at step 0."""
    from ..models import resolve_arch

    views = data.preview(num_samples)
    num_rand = 1 + cfg["data"]["rand_views"]
    patch = resolve_arch(cfg["meta"]["model_name"]).patch_size
    masks = anchor_masks(views, num_rand, patch, cfg["data"]["patch_drop"],
                         cfg["criterion"]["batch_size"], cfg["criterion"]["per_sample_mask"],
                         cfg["meta"]["seed"])
    return views_grid(views, num_rand, masks, patch)


def log_views(cfg: dict, data, num_samples: int = 4) -> None:
    """Write the grid to TensorBoard (``<logging.folder>/tb``, tag ``data/views``); a failure
    here is logged, never fatal to the run."""
    import logging
    import os

    try:
        from torch.utils.tensorboard import SummaryWriter

        grid = grid_for_config(cfg, data, num_samples)
        writer = SummaryWriter(os.path.join(cfg["logging"]["folder"], "tb"))
        writer.add_image("data/views", grid, 0)
        writer.close()
    except Exception as e:  # the picture is a convenience
        logging.getLogger(__name__).warning("could not write the views grid: %s", e)
