"""The torchvision loader's fast path (one-pass hue, separable blur, lookup-table
normalisation) applies each view's replayed draws like the stock v2 pipeline it replaces:
within one grey level on every pixel, identical on almost all, and without touching the
caller's random generator."""
import numpy as np
import pytest
import torch
from PIL import Image

from msn_ds.data.transforms import IMAGENET_STD, MultiCropTransform


def images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(30, 120, 2))
        base = Image.fromarray((rng.random((h // 8 + 2, w // 8 + 2, 3)) * 255).astype(np.uint8))
        arr = np.asarray(base.resize((w, h), Image.BICUBIC)).astype(float)
        arr += rng.normal(0, 20, (h, w, 3))
        yield Image.fromarray(arr.clip(0, 255).astype(np.uint8)), [
            int(s) for s in rng.integers(0, 2**62, 6)]


@pytest.mark.slow
def test_fast_views_equal_the_v2_pipeline():
    mc = MultiCropTransform(64, 24, rand_views=1, focal_views=4)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    worst, same, total = 0.0, 0, 0
    for img, seeds in images():
        torch.manual_seed(5)
        fast = mc(img, seeds)
        after_fast = torch.rand(1)
        torch.manual_seed(5)
        ref = []
        for i, seed in enumerate(seeds):  # the v2 composes, seeded per view as before
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ref.append((mc.rand if i < mc.num_rand else mc.focal)(img))
        assert torch.equal(after_fast, torch.rand(1))  # the caller's generator untouched
        for x, y in zip(fast, ref):
            assert x.shape == y.shape
            levels = ((x - y) * std * 255).abs()
            worst = max(worst, levels.max().item())
            same += int((levels < 1e-3).sum())
            total += levels.numel()
    assert worst <= 1.0 + 1e-3, worst
    assert same / total > 0.999, same / total  # measured 0.99999 over 60 images


def test_blur_equals_torchvision_at_every_sigma_and_size():
    """Both separable paths (shifted adds for few taps, banded matrices for many), across the
    sigmas whose outer taps are denormal floats (the reason taps under 1e-7 are dropped)."""
    from torchvision.transforms.v2 import functional as F

    from msn_ds.data.transforms import _blur_taps, gaussian_blur_fast, gaussian_kernel1d

    rng = np.random.default_rng(1)
    same = total = 0
    for h, w in [(224, 224), (96, 96), (60, 80), (17, 13)]:
        x = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        for sigma in (0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 2.0):
            ref = F.gaussian_blur(x, [13, 13], [sigma, sigma])
            out = gaussian_blur_fast(x, 13, sigma)
            diff = (out.int() - ref.int()).abs()
            assert out.dtype == torch.uint8 and diff.max() <= 1, (h, w, sigma)
            same, total = same + int((diff == 0).sum()), total + diff.numel()
        taps = _blur_taps(13, 0.3)
        full = gaussian_kernel1d(13, 0.3)
        assert taps.numel() < 13 and full.min() < 1e-30  # denormals there, gone here
        assert abs(taps.sum().item() - 1.0) < 1e-6
    assert same / total > 0.999, same / total


def test_dali_blur_kernels_are_torchvisions():
    """The DALI loader's per-view blur kernels (computed on the host) are torchvision's 1-D
    kernel for the view's sigma, cut where the torch path cuts it; views without a blur get
    the identity and are not run through the filter."""
    from msn_ds.data.dali import blur_kernels
    from msn_ds.data.transforms import _blur_taps

    views = np.zeros((2, 3, 11), np.float32)
    views[..., 9], views[..., 10] = 1.0, 1.0  # no blur: window 1
    for (v, b), sigma in zip([(0, 0), (0, 2), (1, 1)], (0.1, 0.7, 2.0)):
        views[v, b, 9:11] = sigma, 13
    kernels = blur_kernels(views)
    assert len(kernels) == 6
    for j, k in enumerate(kernels):
        v, b = divmod(j, 3)
        assert k.ndim == 2 and k.shape[0] == 1 and k.dtype == np.float32
        if views[v, b, 10] == 1:
            assert k.tolist() == [[1.0]]
        else:
            ref = _blur_taps(13, float(views[v, b, 9])).numpy()
            assert k.shape[1] == ref.size and np.allclose(k[0], ref, rtol=1e-5, atol=1e-8)
