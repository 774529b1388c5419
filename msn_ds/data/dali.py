"""NVIDIA DALI multi-crop loader: one decode per image, all views cropped from it, outputs
left where DALI made them (GPU memory in GPU mode).

Same interface and same data as the torch path (``train.py`` cannot tell them apart):
iterating yields ``(views, labels, skipped)`` with ``views = [target, random anchors...,
focal anchors...]``, each ``(B, 3, H, W)`` float32, ImageNet-normalised; the images come in
:class:`GlobalBatchSampler`'s order (world-size invariant; ``set_epoch(e, start_batch)``
resumes inside an epoch); unreadable files are replaced by the next readable one in folder
order and counted, as in :class:`MultiViewImageFolder`.

How DALI is fed: the host reads each file's bytes in the sampler's order and passes them
with ``fn.external_source`` (no DALI file reader, whose sharding and shuffling would not
follow our global order). The random parameters of every view are *replayed* from the torch
path's own transform objects seeded with ``seed_for(seed, epoch, index, view)``
(:mod:`.replay`), and passed as per-sample arguments. So for the same image and view both
loaders use the same crop window, flip, jitter factors, grayscale and blur sigma.

What matches torchvision exactly: the file order, which files are skipped (as far as the
probe below agrees with PIL), every random parameter above, the crop box in pixels,
ImageNet normalisation, the pixels of any file that is not a plain 8-bit RGB/gray JPEG/PNG
(those are decoded by PIL on the host, see :mod:`.probe`).

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
* blur: the same kernel size, sigma and reflect padding; rounding differs by one grey level.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from .probe import BAD, RAW, TRANSCODE, decode_rgb, probe, to_ppm
from .replay import ViewParams, replay
from .sampler import GlobalBatchSampler, seed_for
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform

log = logging.getLogger(__name__)

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


def build_pipeline(source, view_sizes: Sequence[int], batch_size: int, num_threads: int,
                   device_id: Optional[int], prefetch: int = 2):
    """The DALI graph: decode once, then per view ROI-resize, jitter, blur, flip+normalise.

    ``source()`` returns one batch ``(encoded, meta, view_0 args, view_1 args, ...)``, or
    raises StopIteration at the end of the epoch."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch)
    def pipe():
        encoded, meta, *args = fn.external_source(
            source=source, num_outputs=2 + len(view_sizes), batch=True,
            dtype=[types.UINT8, types.INT64] + [types.FLOAT] * len(view_sizes))
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                  output_type=types.RGB, adjust_orientation=False)
        outputs = []
        for p, size in zip(args, view_sizes):
            x = fn.resize(image, size=[size, size], roi_start=p[0:2], roi_end=p[2:4],
                          roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
            luma = fn.reductions.mean(fn.color_space_conversion(
                x, image_type=types.RGB, output_type=types.GRAY))
            if gpu:
                luma = luma.cpu()
            x = fn.brightness_contrast(x, brightness=p[5], contrast=p[6], contrast_center=luma)
            x = fn.hsv(x, saturation=p[7], hue=p[8])
            x = fn.gaussian_blur(x, sigma=p[9], window_size=fn.cast(p[10], dtype=types.INT32))
            outputs.append(fn.crop_mirror_normalize(
                x, mirror=fn.cast(p[4], dtype=types.INT32), mean=mean, std=std,
                dtype=types.FLOAT, output_layout="CHW"))
        return (*outputs, meta)

    return pipe()


class DaliMultiCropLoader:
    """Iterates ``(views, labels, skipped)`` over ``dataset`` in ``sampler``'s order.

    ``dataset`` supplies ``samples`` (path, label), ``multi_transform`` (whose random draws
    are replayed) and ``seed``: a :class:`MultiViewImageFolder`, so both loaders share one
    file list. ``device_id=None`` runs DALI on the CPU.
    """

    def __init__(self, dataset, sampler: GlobalBatchSampler, num_threads: int = 2,
                 device_id: Optional[int] = None, prefetch: int = 2):
        self.dataset, self.sampler = dataset, sampler
        self.transform: MultiCropTransform = dataset.multi_transform
        self.batch_size = sampler.batch_size
        self.num_threads, self.device_id, self.prefetch = max(1, num_threads), device_id, prefetch
        n = len(dataset.samples)
        self._status = np.zeros(n, np.int8)
        self._shape = np.zeros((n, 2), np.int32)
        self._pipe = None
        self._clean = False
        self._source, self._pending = iter(()), deque()
        self.bad_files: list[str] = []

    @property
    def view_sizes(self) -> list[int]:
        t = self.transform
        rand, focal = t.rand.transforms[0].size[0], t.focal.transforms[0].size[0]
        return [rand] * t.num_rand + [focal] * t.num_focal

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch

    # host side -------------------------------------------------------------------------
    def _read(self, i: int) -> Optional[bytes]:
        """Bytes to hand DALI for file ``i``, or None if it is unreadable."""
        path = self.dataset.samples[i][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._mark_bad(i, f"{type(e).__name__}: {e}")
            return None
        if self._status[i] == 0:
            pr = probe(data)
            if pr.status == BAD:
                self._mark_bad(i, pr.reason)
                return None
            self._status[i], self._shape[i] = pr.status, (pr.height, pr.width)
        if self._status[i] == TRANSCODE:
            try:
                return to_ppm(decode_rgb(data))
            except Exception as e:  # changed on disk since the probe
                self._mark_bad(i, f"{type(e).__name__}: {e}")
                return None
        return data if self._status[i] == RAW else None

    def _mark_bad(self, i: int, reason: str) -> None:
        if self._status[i] != BAD:
            self._status[i] = BAD
            self.bad_files.append(self.dataset.samples[i][0])
            log.warning("skipping unreadable image %s: %s", self.dataset.samples[i][0], reason)

    def _sample(self, epoch: int, index: int):
        """Like ``MultiViewImageFolder.__getitem__``: the next readable file from ``index``,
        with the views seeded by the *requested* index."""
        n = len(self.dataset.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            if self._status[i] == BAD:
                continue
            data = self._read(i)
            if data is None:
                continue
            h, w = self._shape[i]
            params = []
            for v in range(self.transform.num_views):
                t = self.transform.rand if v < self.transform.num_rand else self.transform.focal
                torch.default_generator.manual_seed(seed_for(self.dataset.seed, epoch, index, v))
                params.append(view_vector(replay(t, int(h), int(w))))
            return i, data, params, attempt
        raise RuntimeError(f"no readable image in {self.dataset.root}")

    def _host_batch(self, items: list[tuple[int, int]]):
        encoded, meta, views = [], [], [[] for _ in range(self.transform.num_views)]
        with torch.random.fork_rng(devices=[]):  # the replay must not move the caller's RNG
            for epoch, index in items:
                i, data, params, skipped = self._sample(epoch, index)
                encoded.append(np.frombuffer(data, np.uint8))
                meta.append(np.array([self.dataset.samples[i][1], skipped], np.int64))
                for v, p in enumerate(params):
                    views[v].append(p)
        return items, encoded, meta, views

    def _batches(self):
        items = []
        for item in self.sampler:
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                items = []

    # DALI side -------------------------------------------------------------------------
    def _callback(self):
        """Called by DALI (in this thread, ahead of use) for the next batch."""
        items = next(self._source)  # StopIteration ends the epoch
        _, encoded, meta, views = self._host_batch(items)
        self._pending.append(items)
        return (encoded, meta, *views)

    def _build(self) -> None:
        self._pipe = build_pipeline(self._callback, self.view_sizes, self.batch_size,
                                    self.num_threads, self.device_id, self.prefetch)
        self._pipe.build()

    def _to_torch(self, outputs):
        """One copy out of DALI's buffers (reused by the next run) into torch memory on
        DALI's device: no host round trip in GPU mode."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        *views, meta = outputs
        gpu = self.device_id is not None
        device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        stream = torch.cuda.current_stream(device) if gpu else None
        tensors = []
        for tl in views:
            t = tl.as_tensor()
            tensors.append(feed_ndarray(t, torch.empty(t.shape(), dtype=torch.float32,
                                                       device=device), cuda_stream=stream))
        meta = torch.from_numpy(np.array(meta.as_tensor()))
        return tensors, meta[:, 0].clone(), int(meta[:, 1].sum())

    def __iter__(self):
        if self._pipe is None or not self._clean:
            self._build()  # first epoch, or the caller left the previous one early
        self._source, self._pending, self._clean = self._batches(), deque(), False
        while True:
            try:
                outputs = self._pipe.run()
            except StopIteration:
                break
            except Exception as e:  # a file DALI cannot decode although the probe passed it
                self._recover(e)
                continue
            self._pending.popleft()
            yield self._to_torch(outputs)
        self._pipe.reset()
        self._clean = True

    def _recover(self, error: Exception) -> None:
        """Decide the failed batch's files with PIL (skip or transcode), rebuild the
        pipeline and feed the batches in flight again."""
        if not self._pending:
            raise error
        changed = False
        n = len(self.dataset.samples)
        for _, index in self._pending[0]:
            i = next((j % n for j in range(index, index + n) if self._status[j % n] != BAD), None)
            if i is not None and self._status[i] == RAW:
                try:
                    with open(self.dataset.samples[i][0], "rb") as f:
                        decode_rgb(f.read())
                    self._status[i] = TRANSCODE
                except Exception as e:
                    self._mark_bad(i, f"{type(e).__name__}: {e}")
                changed = True
        if not changed:
            raise RuntimeError(f"DALI failed on a batch of {self.dataset.root} whose files PIL "
                               f"reads: {error}") from error
        text = str(error).strip()
        log.warning("DALI could not decode a batch; its files were re-checked with PIL (%s)",
                    text.splitlines()[0] if text else type(error).__name__)
        self._source = itertools.chain(list(self._pending), self._source)
        self._pending = deque()
        self._build()
