"""The images and frozen features every protocol evaluates: the train/val folder pair, the
raw-pixel baseline's transform, class-token extraction and the feature cache.

The reference (``logistic_eval.py`` -> ``deit.forward_blocks(x, 1)``) takes the class token of
the last block *before* the final LayerNorm; ``before_norm=False`` gives the token after it,
the representation the projection head sees in pretraining. Both come from
:meth:`MSNEncoder.tokens`, run with the final norm swapped for an identity when needed, so that
patch embedding, position-embedding resampling and blocks are exactly the training code's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from msn_ds.data import UNREADABLE, eval_folder, readable_rows
from msn_ds.models import MSNEncoder

log = logging.getLogger(__name__)


def load_datasets(root: str, transform, subset: Optional[str] = None):
    """``(train, val)`` ImageFolders of ``root`` with this transform; checks the classes agree."""
    train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
    train_ds = eval_folder(train_root, transform, subset)
    test_ds = eval_folder(val_root, transform)
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"{train_root} and {val_root} have different class folders; "
                         "labels would not line up")
    return train_ds, test_ds


def drop_unreadable(x: np.ndarray, y: np.ndarray, dataset, what: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` without the rows of unreadable images (label ``UNREADABLE``; the loader
    named each in the log when it met it), with one line saying how many were left out."""
    keep = readable_rows(y)
    if keep.all():
        return x, y
    log.warning("%s: %d unreadable images left out (%s)", what, int((~keep).sum()),
                getattr(dataset, "root", "?"))
    return x[keep], y[keep]


def pixel_transform(size: Optional[int] = None) -> v2.Compose:
    """Raw pixels in [0, 1], resized/centre-cropped only when ``size`` is given."""
    resize = [v2.Resize(size, antialias=True), v2.CenterCrop(size)] if size else []
    return v2.Compose(resize + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@contextlib.contextmanager
def without_final_norm(encoder: MSNEncoder) -> Iterator[MSNEncoder]:
    """Temporarily replace ``backbone.norm`` by an identity (restored on exit)."""
    norm = encoder.backbone.norm
    encoder.backbone.norm = nn.Identity()
    try:
        yield encoder
    finally:
        encoder.backbone.norm = norm


def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
            desc: str = "features"):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    # A progress bar on a terminal only: logs of batch jobs stay readable.
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)


@torch.inference_mode()
def extract_features(encoder: MSNEncoder, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", before_norm: bool = True,
                     num_workers: int = 0, desc: str = "features"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float32, labels [N] int64)``: the class token of the last block,
    in dataset order, with the encoder frozen (eval mode, no grad; bf16 autocast on CUDA)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    feats, labels = [], []
    norm_ctx = without_final_norm(encoder) if before_norm else contextlib.nullcontext()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with norm_ctx, autocast:
            for x, y in _loader(dataset, batch_size, num_workers, device, desc):
                h = encoder.tokens(x.to(device, non_blocking=True))[:, 0]
                feats.append(h.float().cpu())
                labels.append(torch.as_tensor(y))
    finally:
        encoder.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


def pixel_features(dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                   desc: str = "pixels") -> tuple[np.ndarray, np.ndarray]:
    """``(flattened images [N, C*H*W] float32, labels [N])``: the no-learning floor that any
    representation has to beat under the same classifier."""
    feats, labels = [], []
    for x, y in _loader(dataset, batch_size, num_workers, torch.device("cpu"), desc):
        feats.append(x.flatten(1).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


def encoder_fingerprint(encoder: Optional[MSNEncoder], before_norm: bool = True) -> str:
    """sha256 over the backbone (what the features depend on): its class, the feature tap
    and every tensor of its state. The same weights give the same key however they were
    loaded (our file, an imported reference file, a checkpoint); any changed weight gives
    another."""
    h = hashlib.sha256()
    if encoder is None:
        h.update(b"pixels")
        return h.hexdigest()
    h.update(f"{type(encoder.backbone).__name__}|before_norm={before_norm}".encode())
    for name, t in sorted(encoder.backbone.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 over the image list (path, label, size, mtime) and the transform's description:
    a changed crop, resize, subset or re-written image gives another key."""
    h = hashlib.sha256(repr(getattr(dataset, "transform", None)).encode())
    root = os.path.abspath(getattr(dataset, "root", ""))
    h.update(os.fsencode(root))  # names as bytes: not every file name is UTF-8
    for path, label in dataset.samples:
        st = os.stat(path)
        h.update(os.fsencode(f"\n{os.path.relpath(path, root)}|{label}|{st.st_size}|"
                             f"{st.st_mtime_ns}"))
    return h.hexdigest()


def dataset_labels(dataset) -> Optional[np.ndarray]:
    """The labels of ``dataset`` in row order, from its image list (no image is read): what a
    cache entry for it must hold. None when the dataset does not say."""
    if hasattr(dataset, "samples"):
        return np.asarray([y for _, y in dataset.samples], np.int64)
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, np.int64)
    return None


def _mismatch(value, expect: Optional[np.ndarray], width: Optional[int] = None
              ) -> Optional[str]:
    """Why a cache entry does not fit the image list and the feature width (None if it
    does)."""
    x, y = value
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        return f"features {x.shape} and labels {y.shape} do not form a table"
    if width is not None and x.shape[1] != width:
        return f"{x.shape[1]} features per image, the encoder gives {width}"
    if expect is None:
        return None
    if len(x) != len(expect):
        return f"{len(x)} rows for {len(expect)} images"
    if not np.array_equal(np.where(y == UNREADABLE, expect, y), expect):  # unreadable: -1
        return f"labels differ from the image list (first at row {int(np.argmax(y != expect))})"
    return None


class FeatureCache:
    """Features keyed by (weights, images, transform): extracted once, reused across lambda
    values, subset splits and, with a ``folder``, later runs.

    Entries are ``.npz`` files (numpy arrays only; loaded with ``allow_pickle=False``)
    written to a temporary name and renamed, so an interrupted run leaves no half entry.
    Without a folder the cache lives in memory for the life of the object.
    """

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.hits = self.misses = 0
        if folder:
            os.makedirs(folder, exist_ok=True)

    @staticmethod
    def key(encoder_key: str, dataset) -> str:
        return hashlib.sha256(f"{encoder_key}|{dataset_fingerprint(dataset)}".encode()
                              ).hexdigest()[:32]

    def get(self, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]],
            info: Optional[dict] = None, labels: Optional[np.ndarray] = None,
            width: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The entry for ``key``, else ``compute()`` (stored). ``labels``: the image list's
        labels; an entry whose row count or labels differ from them (a truncated or
        foreign file under this name) is recomputed, never used."""
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = os.path.join(self.folder, f"{key}.npz") if self.folder else None
        if path and os.path.exists(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    value = (z["x"], z["y"])
                why = _mismatch(value, labels, width)
                if why is None:
                    self.hits += 1
                    self._memory[key] = value
                    log.info("features from cache %s", path)
                    return value
                log.warning("ignoring feature cache entry %s: %s; recomputing", path, why)
            except (OSError, ValueError, KeyError) as e:  # unreadable entry: recompute
                log.warning("ignoring unreadable feature cache entry %s: %s", path, e)
        self.misses += 1
        value = compute()
        self._memory[key] = value
        if path:
            tmp = f"{path}.{os.getpid()}.tmp.npz"
            np.savez(tmp, x=value[0], y=value[1])
            os.replace(tmp, path)
            with open(f"{path[:-4]}.json", "w") as f:
                json.dump(info or {}, f, indent=1)
        return value


def dataset_features(encoder: Optional[MSNEncoder], dataset, *, pixels: bool = False,
                     before_norm: bool = True, batch_size: int = 256,
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     cache: Optional[FeatureCache] = None, encoder_key: Optional[str] = None,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` numpy: raw pixels or the encoder's class token, through
    ``cache`` when given (``encoder_key`` saves re-hashing the weights for every dataset)."""
    pixels = pixels or encoder is None

    def compute():
        if pixels:
            return pixel_features(dataset, batch_size, num_workers, desc)
        return extract_features(encoder, dataset, batch_size, device, before_norm, num_workers,
                                desc)

    if cache is None:
        return compute()
    enc_key = encoder_key or encoder_fingerprint(None if pixels else encoder, before_norm)
    info = {"root": os.path.abspath(getattr(dataset, "root", "")), "images": len(dataset),
            "transform": repr(getattr(dataset, "transform", None)), "encoder": enc_key,
            "representation": "pixels" if pixels else
            ("before_norm" if before_norm else "after_norm")}
    return cache.get(FeatureCache.key(enc_key, dataset), compute, info,
                     labels=dataset_labels(dataset),
                     width=None if pixels else encoder.spec.embed_dim)


def train_val_features(encoder: Optional[MSNEncoder], train_ds, val_ds, *, pixels: bool = False,
                       before_norm: bool = True, cache: Optional[FeatureCache] = None, **kw):
    """``(train_x, train_y, val_x, val_y)``: :func:`dataset_features` of both sets, hashing
    the weights once for the cache."""
    pixels = pixels or encoder is None
    key = encoder_fingerprint(None if pixels else encoder, before_norm) if cache else None
    common = dict(pixels=pixels, before_norm=before_norm, cache=cache, encoder_key=key, **kw)
    train_x, train_y = dataset_features(encoder, train_ds, desc="train", **common)
    val_x, val_y = dataset_features(encoder, val_ds, desc="val", **common)
    if train_x.shape[1] != val_x.shape[1]:  # raw pixels of images of another size
        raise ValueError(f"train and val features differ in width ({train_x.shape[1]} and "
                         f"{val_x.shape[1]}): with --pixels, give --pixel-size")
    return train_x, train_y, val_x, val_y
