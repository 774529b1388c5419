from .dataset import (UNREADABLE, EvalImageFolder, MultiViewImageFolder, collate_views,
                      eval_folder, load_rgb, readable_rows)
from .sampler import GlobalBatchSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, eval_transform

__all__ = ["EvalImageFolder", "GlobalBatchSampler", "IMAGENET_MEAN", "IMAGENET_STD",
           "MultiCropTransform", "MultiViewImageFolder", "UNREADABLE", "collate_views",
           "eval_folder", "eval_transform", "load_rgb", "readable_rows"]
