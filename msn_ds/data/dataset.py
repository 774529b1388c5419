"""Datasets for pretraining (multi-view, over any :class:`~.source.ImageSource`) and
evaluation (ImageFolders).

Folders are listed by :func:`~.source.list_images` (torchvision's order and labels, without
its FIFO and symlink-loop traps); an unreadable sample is replaced by the next readable one
by the one rule of :func:`~.source.first_readable`, shared with the DALI loader.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..seeding import seed_for
from .source import (FolderSource, ImageSource, Listing, first_readable, list_images,  # noqa: F401
                     load_rgb, new_bad_mask)

log = logging.getLogger(__name__)


class SafeImageFolder(ImageFolder):
    """:class:`ImageFolder` listed by :func:`list_images` (``self.listing``: what was skipped)
    that never fails on one image: :meth:`read_from` passes over unreadable files to the
    next readable one in folder order. Unreadable files are remembered in a shared-memory
    mask (``bad``) that loader workers write and the reading process reads: a bad file is
    read once, named once in the log, and :meth:`unreadable` lists each one once. The
    replacement does not depend on whether a file was already known to be bad, so it is the
    same in every epoch, worker and process."""

    def __init__(self, root: str, *args, **kwargs):
        super().__init__(root, *args, **kwargs)
        self.bad = new_bad_mask(len(self.samples))

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        if is_valid_file is not None:
            raise ValueError("SafeImageFolder lists by extension only")
        self.listing = list_images(directory, class_to_idx, extensions or IMG_EXTENSIONS,
                                   allow_empty)
        self.listing.log_skipped(os.fspath(directory))
        return self.listing.samples

    def keep_samples(self, keep: list) -> None:
        """Restrict the folder to ``keep`` (``(path, label)`` pairs of ``samples``)."""
        self.samples = self.imgs = keep
        self.targets = [y for _, y in keep]
        self.bad = new_bad_mask(len(keep))

    def unreadable(self) -> list[str]:
        """Paths of the distinct unreadable files found so far (by any worker)."""
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def read_from(self, index: int):
        """``(image, label, passed)``: the first readable image at or after ``index`` (folder
        order, wrapping), and how many unreadable files were passed over to reach it."""
        i, img, passed = first_readable(len(self.samples), index, self.bad,
                                        lambda j: self.loader(self.samples[j][0]),
                                        self._mark_bad, self.root)
        return img, self.samples[i][1], passed

    def _mark_bad(self, i: int, reason) -> None:
        self.bad[i] = 1
        log.warning("skipping unreadable image %s: %s", self.samples[i][0], reason)


UNREADABLE = -1
"""The label :class:`EvalImageFolder` gives the stand-in for an unreadable image."""


class EvalImageFolder(SafeImageFolder):
    """Items ``(image, label)`` for evaluation. An unreadable image's row holds the next
    readable image with the label :data:`UNREADABLE`, so batches keep their shape, rows
    stay aligned with the image list at any world size and worker count, and every consumer
    drops those rows (:func:`readable_rows`) rather than crash on one bad file."""

    def __getitem__(self, index: int):
        img, label, passed = self.read_from(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label if passed == 0 else UNREADABLE


def readable_rows(labels):
    """The boolean mask of rows whose image was read (label not :data:`UNREADABLE`)."""
    return labels != UNREADABLE


class MultiViewDataset(torch.utils.data.Dataset):
    """Items indexed by ``(epoch, index)`` over an :class:`ImageSource`, returning
    ``(views, label, skipped)``.

    Each view is seeded by ``(seed, epoch, index, view)``. An unreadable sample is replaced
    by the next readable one in index order (:meth:`ImageSource.read_from`); ``skipped``
    counts the unreadable samples passed over. ``root`` names the source in messages;
    ``samples``, ``bad`` and :meth:`unreadable` are the source's.
    """

    def __init__(self, source: ImageSource, transform: Callable, seed: int = 0):
        self.source = source
        self.multi_transform = transform
        self.seed = seed

    @property
    def root(self) -> str:
        return self.source.name

    @property
    def samples(self):
        return self.source.samples

    @property
    def bad(self) -> torch.Tensor:
        return self.source.bad

    def unreadable(self) -> list[str]:
        return self.source.unreadable()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, label, passed = self.source.read_from(index)
        seeds = [seed_for(self.seed, epoch, index, v)
                 for v in range(self.multi_transform.num_views)]
        return self.multi_transform(img, view_seeds=seeds), label, passed


class MultiViewImageFolder(MultiViewDataset):
    """:class:`MultiViewDataset` over an ImageFolder (:class:`FolderSource`; ``listing``
    says what its listing skipped)."""

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        super().__init__(FolderSource(root), transform, seed)

    @property
    def listing(self) -> Listing:
        return self.source.listing


def collate_views(batch):
    """``[(views, label, skipped)] -> ([view_0 batch, view_1 batch, ...], labels, skipped)``.

    Stacked by ``default_collate``, which in a loader worker writes straight into shared
    memory; a plain ``torch.stack`` there costs one more copy of the batch on its way to the
    training process."""
    views, labels, skipped = zip(*batch)
    return ([default_collate(list(v)) for v in zip(*views)], torch.tensor(labels),
            sum(skipped))


def read_list_file(path: str) -> list[str]:
    """Non-empty lines of a list file (subset files), as file names: read as bytes and decoded
    like the file system's names (``os.fsdecode``), so a name that is not valid UTF-8 matches
    the listed file."""
    with open(path, "rb") as f:
        return [os.fsdecode(s) for s in (line.strip() for line in f) if s]


def eval_folder(root: str, transform: Callable, subset_file: Optional[str] = None
                ) -> EvalImageFolder:
    """:class:`EvalImageFolder` (listed by :func:`list_images`), optionally restricted to the
    images listed in a subset file (``class_dir/filename`` per line, the reference's format)."""
    ds = EvalImageFolder(root, transform=transform, loader=load_rgb)
    if subset_file is not None:
        wanted = set(read_list_file(subset_file))
        keep = [(p, y) for p, y in ds.samples
                if os.path.relpath(p, root).replace(os.sep, "/") in wanted]
        missing = len(wanted) - len(keep)
        if missing:
            raise FileNotFoundError(f"{subset_file}: {missing} listed images not found "
                                    f"under {root}")
        ds.keep_samples(keep)
    return ds
