"""The DALI graph of the multi-crop views: decode once, then per view ROI-resize, jitter,
blur, flip and normalise, with every view's random parameters passed in per sample
(:func:`view_vector`, replayed on the host from the torch path's own transforms).

What matches torchvision exactly: the crop box in pixels, every random parameter, ImageNet
normalisation, and the pixels of any file that is not a plain 8-bit RGB/gray JPEG/PNG (those
are decoded by PIL on the host, see :mod:`..probe`).

What differs (pixel values only; measured in ``tests/test_dali.py``):
* JPEG decoding: DALI's decoder (libjpeg-turbo on the CPU, nvJPEG on the GPU) vs PIL's
  libjpeg-turbo; EXIF orientation is ignored by both.
* resize: DALI's antialiased linear filter over the crop window vs PIL's bilinear resample
  of the cropped image; they agree to about one grey level except at the crop border.
* colour jitter: a fixed order (brightness and contrast together, then saturation and hue)
  instead of torchvision's random order. Brightness, contrast (around the crop's mean luma,
  as torchvision) and saturation commute exactly up to clipping, so only hue's position
  matters; hue is a rotation about the grey axis (DALI ``hsv``) rather than an HSV hue shift.
  Clipping to [0, 255] happens once per op group rather than after each op.
* grayscale: saturation set to 0 in the same ``hsv`` op (luma, as torchvision, up to
  rounding).
* blur: torchvision's 1-D kernel for the same sigma (taps under 1e-7 cut, as the torch path
  cuts them) and reflect padding, one pass per axis rounded to uint8 in between; rounding
  differs by about one grey level.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..replay import ViewParams
from ..transforms import IMAGENET_MEAN, IMAGENET_STD

# per-view argument vector (view_vector): roi y0 x0 y1 x1, flip, brightness, contrast,
# saturation, hue (degrees), blur sigma, blur window


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def view_vector(p: ViewParams) -> np.ndarray:
    """The per-sample DALI arguments of one view."""
    b = c = s = 1.0
    hue = 0.0
    if p.jitter is not None:
        j = p.jitter
        b = 1.0 if j["brightness_factor"] is None else j["brightness_factor"]
        c = 1.0 if j["contrast_factor"] is None else j["contrast_factor"]
        s = 1.0 if j["saturation_factor"] is None else j["saturation_factor"]
        hue = 0.0 if j["hue_factor"] is None else 360.0 * j["hue_factor"]
    if p.gray:  # luma of the jittered image; saturation does not change luma
        s = 0.0
    sigma, window = (p.sigma, p.kernel) if p.sigma is not None else (1.0, 1)  # window 1: no-op
    return np.array([p.top, p.left, p.top + p.height, p.left + p.width, float(p.flip),
                     b, c, s, hue, sigma, window], dtype=np.float32)


# Blur on the CPU: DALI's ``filter`` (a separable pass per axis, uint8 in and out) with
# torchvision's 1-D kernel, computed on the host per view, without its taps below 1e-7; only
# the views that draw a blur run it (a conditional: DALI splits the batch). DALI's
# ``gaussian_blur`` costs 6x more on the CPU (2.3 ms instead of 0.35 ms for a 13-tap 224-px
# view, 1 thread), and ran on every view, a 1-tap window costing a full pass. On the GPU the
# graph keeps ``gaussian_blur`` on every view (cheap there, and untested on a GPU so far).


def blur_kernels(views: np.ndarray) -> list[np.ndarray]:
    """torchvision's 1-D Gaussian kernel, as a (1, k) row, for each view vector (..., 11) that
    draws a blur, ``[[1]]`` for the others; flattened in the vectors' order, taps under 1e-7
    cut."""
    flat = views.reshape(-1, views.shape[-1])
    out = [np.ones((1, 1), np.float32)] * len(flat)
    for j in np.flatnonzero(flat[:, 10] > 1):
        size, sigma = int(flat[j, 10]), float(flat[j, 9])
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        x = np.linspace(-lim, lim, size, dtype=np.float32) / np.float32(sigma)
        k = np.exp(-(x * x) - np.max(-(x * x)))
        k = (k / k.sum()).astype(np.float32)
        keep = np.flatnonzero(k > 1e-7)
        reach = max(size // 2 - keep[0], keep[-1] - size // 2)
        out[j] = k[None, size // 2 - reach: size // 2 + reach + 1]
    return out


def build_pipeline(source, view_sizes: Sequence[int], batch_size: int, num_threads: int,
                   device_id: Optional[int], prefetch: int = 2):
    """The DALI graph: decode once, then per view ROI-resize, jitter, blur (only the views
    that draw one), flip+normalise.

    ``source()`` returns one batch ``(encoded, meta, view args..., blur kernels...)``, two
    per view (:func:`view_vector`, :func:`blur_kernels`; no kernels for a GPU graph), or
    raises StopIteration at the end of the epoch."""
    from nvidia.dali import fn, pipeline_def, types

    conv = getattr(fn, "filter", None) or fn.experimental.filter  # DALI < 1.42: experimental

    gpu = device_id is not None
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]
    n = len(view_sizes)

    inputs_per_view = 1 if gpu else 2  # the GPU graph takes no blur kernels

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, enable_conditionals=not gpu)
    def pipe():
        encoded, meta, *inputs = fn.external_source(
            source=source, num_outputs=2 + inputs_per_view * n, batch=True,
            dtype=[types.UINT8, types.INT64] + [types.FLOAT] * (inputs_per_view * n))
        args, kernels = inputs[:n], (inputs[n:] or [None] * n)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                  output_type=types.RGB, adjust_orientation=False)
        outputs = []
        for p, kernel, size in zip(args, kernels, view_sizes):
            x = fn.resize(image, size=[size, size], roi_start=p[0:2], roi_end=p[2:4],
                          roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
            luma = fn.reductions.mean(fn.color_space_conversion(
                x, image_type=types.RGB, output_type=types.GRAY))
            if gpu:
                luma = luma.cpu()
            x = fn.brightness_contrast(x, brightness=p[5], contrast=p[6], contrast_center=luma)
            x = fn.hsv(x, saturation=p[7], hue=p[8])
            if gpu:  # cheap there; the GPU graph is the one prepared for its first run
                x = fn.gaussian_blur(x, sigma=p[9],
                                     window_size=fn.cast(p[10], dtype=types.INT32))
            elif p[10] > 1:
                x = conv(x, kernel, border="reflect_101")  # along the rows: (1, k)
                x = conv(x, fn.reshape(kernel, src_dims=[1, 0]), border="reflect_101")
            outputs.append(fn.crop_mirror_normalize(
                x, mirror=fn.cast(p[4], dtype=types.INT32), mean=mean, std=std,
                dtype=types.FLOAT, output_layout="CHW"))
        return (*outputs, meta)

    return pipe()
