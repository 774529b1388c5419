"""The random parameters of one torchvision view, drawn without touching any pixels.

The DALI pipeline must produce the views that the torchvision pipeline would produce for the
same ``(seed, epoch, index, view)``. Rather than re-implementing torchvision's sampling in
numpy (a second random stream that could only match in distribution), we replay the very
transform objects of :class:`MultiCropTransform`: seed the torch RNG exactly as the torch
path does, then call each transform's own ``make_params`` in the order and with the coin
flips of its ``forward``, on a zero-memory stand-in image of the real size. The crop window,
flip, jitter factors and order, grayscale and blur sigma are then *identical* to what the
torch path applies (``tests/test_dali.py`` checks this bit for bit against torchvision).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.transforms import v2


@dataclass
class ViewParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    jitter: Optional[dict] = None  # ColorJitter.make_params output, None when not applied
    gray: bool = False
    sigma: Optional[float] = None  # Gaussian blur sigma, None when not applied
    kernel: int = 0  # Gaussian blur kernel size of the torchvision transform


_PASSIVE = (v2.ToImage, v2.ToDtype, v2.Normalize)


def replay(transform: v2.Compose, height: int, width: int) -> ViewParams:
    """Consume the global torch RNG exactly as ``transform(image of height x width)`` would,
    and return the parameters it would apply. Seed (or fork) the RNG first."""
    dummy = [torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, height, width)]  # no memory
    p: Optional[ViewParams] = None
    for t in transform.transforms:
        if isinstance(t, v2.RandomResizedCrop):
            box = t.make_params(dummy)
            p = ViewParams(box["top"], box["left"], box["height"], box["width"])
        elif p is None:
            raise TypeError(f"cannot replay {type(t).__name__} before RandomResizedCrop")
        elif isinstance(t, v2.RandomHorizontalFlip):
            p.flip = bool(torch.rand(1) < t.p)
        elif isinstance(t, v2.RandomGrayscale):
            p.gray = bool(torch.rand(1) < t.p)
        elif isinstance(t, v2.RandomApply):
            if not torch.rand(1) < t.p:
                continue
            for inner in t.transforms:
                if isinstance(inner, v2.ColorJitter):
                    p.jitter = inner.make_params(dummy)
                elif isinstance(inner, v2.GaussianBlur):
                    p.sigma = inner.make_params(dummy)["sigma"][0]
                    p.kernel = int(inner.kernel_size[0])
                else:
                    raise TypeError(f"cannot replay {type(inner).__name__} inside RandomApply")
        elif not isinstance(t, _PASSIVE):
            raise TypeError(f"cannot replay {type(t).__name__}: teach msn_ds/data/replay.py "
                            "its random draws before using it with the DALI loader")
    if p is None:
        raise TypeError("view transform has no RandomResizedCrop")
    return p
