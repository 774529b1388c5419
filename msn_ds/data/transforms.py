"""The multi-crop augmentation of docs/method.md section 1 (torchvision.transforms.v2).

:func:`view_transform` is the stock torchvision ``v2.Compose``: the definition of a view, the
object whose random draws :mod:`.replay` reproduces and the DALI loader replays.
:class:`MultiCropTransform` applies it to the loader's images *fast*: it draws each view's
parameters through those very transform objects (:func:`.replay.replay`: the same draws, in
the same order, from the same seed) and applies them with kernels that give torchvision's
pixels for a fraction of its CPU (profile: ``scripts/bench_data.py --profile``):

* seeding: ``torch.default_generator.manual_seed`` per view inside one saved/restored state,
  not ``torch.manual_seed`` under ``fork_rng`` (which also seeds every accelerator backend and
  formats a stack trace per backend on each call);
* hue: one pass of the closed-form HSV rotation instead of torchvision's RGB->HSV->RGB
  round trip; same float formula, at most one grey level apart where rounding differs;
* Gaussian blur: separable (shifted multiply-adds, or two matrix products with the
  reflect-padded 1-D kernel when it has many taps) instead of a 13 x 13 depthwise
  convolution, taps under 1e-7 (denormal floats at small sigma) dropped; at most one grey
  level apart (about 2e-5 of the pixels);
* ``ToDtype`` + ``Normalize``: one table look-up per pixel, bit-identical;
* crop, flip, brightness, contrast, saturation, grayscale: torchvision's own kernels (flip and
  grayscale through the transform objects), no v2 dispatch per call.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torchvision.transforms.v2 import functional as F
from torchvision.transforms import v2

from .replay import ViewParams, replay

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


# -- fast kernels -----------------------------------------------------------------------------

# HSV -> RGB in closed form: channel = m + C * clamp(SIGN * |6h - CENTRE| + OFFSET, 0, 1)
_CENTRE = torch.tensor([3.0, 2.0, 4.0]).view(3, 1, 1)
_SIGN = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
_OFFSET = torch.tensor([-1.0, 2.0, 2.0]).view(3, 1, 1)


def adjust_hue_fast(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's ``adjust_hue`` on a uint8 (3, H, W) image, in one pass.

    A hue shift keeps each pixel's max ``M`` and min ``m``; with ``C = M - m`` and ``t`` the
    shifted hue in sixths of a turn, R, G, B become ``m + C * clamp(|t - 3| - 1, 0, 1)``,
    ``m + C * clamp(2 - |t - 2|, 0, 1)``, ``m + C * clamp(2 - |t - 4|, 0, 1)``: the float
    formula of torchvision's RGB->HSV->RGB without its stacks and gathers; within one grey
    level of it."""
    if image.shape[-3] != 3 or image.numel() == 0:
        return image
    mn8, mx8 = torch.aminmax(image, dim=-3)  # on the uint8 pixels: a quarter of the bytes
    x = image.float()
    r, g, b = x.unbind(-3)
    mn, mx = mn8.float(), mx8.float()
    chroma = mx - mn
    div = chroma.clamp_min(1.0)  # integer-valued: 0 -> 1, as torchvision's where(eq, 1, C)
    h = torch.where(mx8 == image[..., 0, :, :], g - b,
                    torch.where(mx8 == image[..., 1, :, :], (b - r).add_(div, alpha=2.0),
                                (r - g).add_(div, alpha=4.0)))
    t = h.div_(div).add_(6.0 * hue_factor).remainder_(6.0).unsqueeze(-3)
    w = (t - _CENTRE).abs_().mul_(_SIGN).add_(_OFFSET).clamp_(0.0, 1.0)
    # torchvision maps [0, 1] floats back with x * 255.999, truncated
    scale = 255.999 / 255.0
    out = w.mul_(chroma.mul_(scale).unsqueeze(-3)).add_(mn.mul_(scale).unsqueeze(-3))
    return out.to(torch.uint8)


_BLUR_INDEX: dict = {}


def _blur_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix ``B`` with ``x @ B`` = ``x`` convolved with ``kernel`` along its last axis,
    reflect-padded as torchvision pads (edge pixel not repeated)."""
    k = kernel.numel()
    key = (n, k)
    if key not in _BLUR_INDEX:
        out = torch.arange(n).view(-1, 1)
        src = out + torch.arange(k).view(1, -1) - k // 2
        src = torch.where(src < 0, -src, src)
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
        _BLUR_INDEX[key] = (src.flatten(), out.expand(n, k).flatten())
    rows, cols = _BLUR_INDEX[key]
    return torch.zeros(n, n).index_put_((rows, cols), kernel.repeat(n), accumulate=True)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel (its 2-D kernel is the outer product of two)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)


def _blur_taps(kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's 1-D kernel without the taps below 1e-7 (their sum is under 1e-6, far
    from a grey level). For small sigma the outer taps are denormal floats, which make a
    matrix product 10x slower (measured: 9.8 ms instead of 1.0 ms at 224 px, sigma 0.3)."""
    k = gaussian_kernel1d(kernel_size, sigma)
    keep = (k > 1e-7).nonzero().flatten()
    reach = max(kernel_size // 2 - int(keep[0]), int(keep[-1]) - kernel_size // 2)
    return k[kernel_size // 2 - reach: kernel_size // 2 + reach + 1]


def gaussian_blur_fast(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (square kernel, reflect padding) on a uint8 (C, H, W)
    image, separably: within one grey level of its 2-D convolution. A few taps (small sigma,
    large views): shifted multiply-adds over the reflect-padded image; many taps: two matrix
    products with the banded blur matrices."""
    k = _blur_taps(kernel_size, sigma)
    h, w = image.shape[-2:]
    x = image.float()
    if k.numel() * 16 > min(h, w):
        bw = _blur_matrix(w, k)
        bh = bw if h == w else _blur_matrix(h, k)
        out = torch.matmul(bh.t(), torch.matmul(x, bw))
    else:
        r = k.numel() // 2
        taps = k.tolist()
        if r:
            x = torch.nn.functional.pad(x.unsqueeze(0), (r, r, r, r), mode="reflect")[0]
        rows = x[..., 0:w] * taps[0]
        for i in range(1, len(taps)):
            rows.add_(x[..., i:i + w], alpha=taps[i])
        out = rows[..., 0:h, :] * taps[0]
        for i in range(1, len(taps)):
            out.add_(rows[..., i:i + h, :], alpha=taps[i])
    return out.round_().to(torch.uint8)


def _tail_lut(transform: v2.Compose) -> torch.Tensor:
    """(3, 256) table: the Compose's own ``ToDtype`` + ``Normalize`` applied to every uint8
    value; per-element float ops, so looking pixels up in it is bit-identical."""
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    x = ramp.clone()
    for t in transform.transforms:
        if isinstance(t, (v2.ToDtype, v2.Normalize)):
            x = t(x)
    if x.dtype != torch.float32:
        raise TypeError("view transform must end in ToDtype(float32, scale=True) + Normalize")
    return x.reshape(3, 256).contiguous()


class _FastView:
    """Applies one view ``Compose`` as :class:`MultiCropTransform` does (see module doc)."""

    def __init__(self, transform: v2.Compose):
        self.transform = transform
        kinds = [type(t) for t in transform.transforms]
        expected = [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToImage, v2.RandomApply,
                    v2.RandomGrayscale, v2.RandomApply, v2.ToDtype, v2.Normalize]
        if kinds != expected:
            raise TypeError(f"MultiCropTransform applies view_transform's layout, got {kinds}")
        self.crop, self.flip, _, _, self.gray = transform.transforms[:5]
        self.lut = _tail_lut(transform)

    def __call__(self, img) -> torch.Tensor:
        height, width = F.get_size(img)
        p: ViewParams = replay(self.transform, height, width)  # draws exactly as transform(img)
        x = F.resized_crop(img, p.top, p.left, p.height, p.width, self.crop.size,
                           interpolation=self.crop.interpolation, antialias=self.crop.antialias)
        if p.flip:
            x = self.flip.transform(x, {})
        # CHW-contiguous: torchvision's pil_to_tensor is a strided view of the HWC pixels, on
        # which every colour op below runs slower
        x = (F.pil_to_tensor(x) if not isinstance(x, torch.Tensor)
             else x.as_subclass(torch.Tensor)).contiguous()
        if p.jitter is not None:
            j = p.jitter
            for fn in j["fn_idx"].tolist():
                if fn == 0 and j["brightness_factor"] is not None:
                    x = F.adjust_brightness_image(x, j["brightness_factor"])
                elif fn == 1 and j["contrast_factor"] is not None:
                    x = F.adjust_contrast_image(x, j["contrast_factor"])
                elif fn == 2 and j["saturation_factor"] is not None:
                    x = F.adjust_saturation_image(x, j["saturation_factor"])
                elif fn == 3 and j["hue_factor"] is not None:
                    x = adjust_hue_fast(x, j["hue_factor"])
        if p.gray:
            x = self.gray.transform(x, {"num_input_channels": x.shape[-3]})
        if p.sigma is not None:
            x = gaussian_blur_fast(x, p.kernel, p.sigma)
        c, h, w = x.shape
        idx = x.reshape(c, h * w).long()
        return torch.gather(self.lut, 1, idx).view(c, h, w)


class MultiCropTransform:
    """Returns ``[target, anchor x rand_views, focal x focal_views]`` views of one image.

    ``view_seeds`` (one per view) make every view's random parameters a function of the
    caller's seed, independent of worker count and process layout; the caller's RNG state is
    left as it was. Without them the views draw from the global torch RNG.
    ``self.rand``/``self.focal`` are the ``view_transform`` Composes whose draws are used
    (and replayed by the DALI loader); the pixels are computed by :class:`_FastView`.
    """

    def __init__(self, rand_size: int = 224, focal_size: int = 96, rand_views: int = 1,
                 focal_views: int = 10, color_jitter: float = 0.5,
                 rand_scale: Sequence[float] = (0.3, 1.0),
                 focal_scale: Sequence[float] = (0.05, 0.3)):
        self.rand = view_transform(rand_size, rand_scale, color_jitter)
        self.focal = view_transform(focal_size, focal_scale, color_jitter)
        self.num_rand = rand_views + 1  # the first is the target view
        self.num_focal = focal_views
        self._fast: Optional[tuple] = None

    @classmethod
    def from_config(cls, data: dict) -> "MultiCropTransform":
        """The views the ``data`` config section asks for (one mapping of keys to arguments
        for the training loader and the view preview alike)."""
        return cls(rand_size=data["rand_size"], focal_size=data["focal_size"],
                   rand_views=data["rand_views"], focal_views=data["focal_views"],
                   color_jitter=data["color_jitter_strength"], rand_scale=data["rand_scale"],
                   focal_scale=data["focal_scale"])

    @property
    def num_views(self) -> int:
        return self.num_rand + self.num_focal

    def __getstate__(self):
        return dict(self.__dict__, _fast=None)  # rebuilt where used (DALI host workers)

    def __call__(self, img, view_seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        if self._fast is None:
            self._fast = (_FastView(self.rand), _FastView(self.focal))
        rand, focal = self._fast
        if view_seeds is None:
            return [(rand if i < self.num_rand else focal)(img) for i in range(self.num_views)]
        gen = torch.default_generator
        state = gen.get_state()
        try:
            views = []
            for i in range(self.num_views):
                gen.manual_seed(view_seeds[i])
                views.append((rand if i < self.num_rand else focal)(img))
        finally:
            gen.set_state(state)
        return views
