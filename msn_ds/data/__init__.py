from .dataset import MultiViewImageFolder, collate_views, eval_folder, load_rgb
from .sampler import GlobalBatchSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, eval_transform

__all__ = ["GlobalBatchSampler", "IMAGENET_MEAN", "IMAGENET_STD", "MultiCropTransform",
           "MultiViewImageFolder", "collate_views", "eval_folder", "eval_transform",
           "load_rgb"]
