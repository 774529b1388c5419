"""NVIDIA DALI multi-crop loader: one decode per image, all views cropped from it, outputs
left where DALI made them (GPU memory in GPU mode).

Same interface and same data as the torch path (``train.py`` cannot tell them apart):
iterating yields ``(views, labels, skipped)`` with ``views = [target, random anchors...,
focal anchors...]``, each ``(B, 3, H, W)`` float32, ImageNet-normalised; the images come in
:class:`~..sampler.GlobalBatchSampler`'s order (world-size invariant;
``set_epoch(e, start_batch)`` resumes inside an epoch); unreadable samples are replaced by
the next readable one in index order and counted, by the source's one rule
(:func:`~..source.first_readable`).

How DALI is fed: the host reads each sample's bytes from the dataset's
:class:`~..source.ImageSource` (a folder, tar shards) in the sampler's order and passes them
with ``fn.external_source`` (no DALI file reader, whose sharding and shuffling would not
follow our global order). The random parameters of every view are *replayed* from the torch
path's own transform objects seeded with ``seed_for(seed, epoch, index, view)``
(:mod:`..replay`), and passed as per-sample arguments. So for the same image and view both
loaders use the same crop window, flip, jitter factors, grayscale and blur sigma.

* :mod:`.pipeline`: the DALI graph, and what differs from torchvision's pixels;
* :mod:`.host`: the host half (reading, probing, replaying), in workers or in-thread;
* :mod:`.loader`: :class:`DaliMultiCropLoader`, which deals host inputs to the pipelines.
"""
from .host import HostError, HostFeed
from .loader import DaliMultiCropLoader
from .pipeline import blur_kernels, build_pipeline, dali_available, view_vector

__all__ = ["DaliMultiCropLoader", "HostError", "HostFeed", "blur_kernels", "build_pipeline",
           "dali_available", "view_vector"]
