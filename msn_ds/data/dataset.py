"""ImageFolder datasets for pretraining (multi-view) and evaluation.

Both list their images with :func:`list_images`, torchvision's order and labels without its
two traps: a FIFO (or socket, device) named ``*.png`` would block the first read forever,
and a directory symlink loop would list the same images over and over (and under other
classes). Non-regular files are skipped and counted; a directory symlink is followed only
when its real path is outside the tree already listed, at most once.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..seeding import seed_for

log = logging.getLogger(__name__)

_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to RGB. Opened non-blocking and checked to be a regular file first: a
    file that became a FIFO after listing raises at once instead of blocking the reader (and,
    in the main process, the stop signal) forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({_kind(mode)}): {path}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        img = Image.open(f)
        img.load()
    return img.convert("RGB")


@dataclass
class Listing:
    """What :func:`list_images` found. ``special``: ``(path, kind)`` of files with an image
    extension that are not regular files (skipped); ``loops``/``duplicate_dirs``: ``(link,
    real path)`` of directory symlinks not followed; ``samples``: ``(path, class index)``."""
    classes: list
    class_to_idx: dict
    samples: list = field(default_factory=list)
    special: list = field(default_factory=list)
    loops: list = field(default_factory=list)
    duplicate_dirs: list = field(default_factory=list)

    def log_skipped(self, root: str) -> None:
        if self.special:
            log.warning("%s: skipped %d non-regular files named like images, e.g. %s (%s)",
                        root, len(self.special), *self.special[0])
        if self.loops:
            log.warning("%s: %d directory symlink loops not followed, e.g. %s -> %s", root,
                        len(self.loops), *self.loops[0])
        if self.duplicate_dirs:
            log.warning("%s: %d directory symlinks to folders listed elsewhere not followed, "
                        "e.g. %s -> %s", root, len(self.duplicate_dirs), *self.duplicate_dirs[0])


def _inside(path: str, tops) -> bool:
    return any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in tops)


def list_images(root: str, class_to_idx: Optional[dict] = None,
                extensions: tuple = IMG_EXTENSIONS, allow_empty: bool = False) -> Listing:
    """torchvision's ImageFolder listing (classes: sorted sub-folders; per class, the sorted
    walk of its tree, files with an image extension in sorted order), made safe:

    * only regular files (after following file symlinks) are listed; others with an image
      extension go to ``special``;
    * a directory symlink is followed only if its real path lies outside every class
      folder's real tree and every tree already followed: a link to an ancestor is a loop,
      one into the dataset (another class included) or to a tree followed before is a
      duplicate; both are reported, not followed.

    ``FileNotFoundError`` when a class has no image (unless ``allow_empty``), as torchvision.
    """
    root = os.fspath(root)
    if class_to_idx is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
        class_to_idx = {c: i for i, c in enumerate(classes)}
    classes = sorted(class_to_idx, key=class_to_idx.get)
    out = Listing(classes, class_to_idx)
    followed = {os.path.realpath(os.path.join(root, c)) for c in class_to_idx}
    ext = tuple(e.lower() for e in extensions)
    empty = []
    for cls in sorted(class_to_idx):
        top = os.path.join(root, cls)
        if not os.path.isdir(top):
            continue
        walked = []  # (dirpath, [file entries]) as os.walk(followlinks=True) would give
        stack = [top]
        while stack:
            d = stack.pop()
            try:  # by name, depth first: which of two links to one folder is followed is fixed
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:  # os.walk ignores unreadable folders too
                continue
            files, here, subdirs = [], None, []
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append(e)
                    continue
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    here = here or os.path.realpath(d)
                    if _inside(here, [real]):
                        out.loops.append((e.path, real))
                        continue
                    if _inside(real, followed):
                        out.duplicate_dirs.append((e.path, real))
                        continue
                    followed.add(real)
                subdirs.append(e.path)
            stack.extend(reversed(subdirs))
            walked.append((d, files))
        n = len(out.samples)
        for d, files in sorted(walked, key=lambda t: t[0]):
            for e in sorted(files, key=lambda e: e.name):
                if not e.name.lower().endswith(ext):
                    continue
                try:
                    regular = e.is_file()  # d_type, no stat for plain entries
                    mode = None if regular else os.stat(e.path).st_mode
                except OSError:
                    out.special.append((e.path, "broken symlink"))
                    continue
                if regular:
                    out.samples.append((e.path, class_to_idx[cls]))
                else:
                    out.special.append((e.path, _kind(mode)))
        if len(out.samples) == n:
            empty.append(cls)
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}"
                                f" in {root}. Supported extensions are: {', '.join(extensions)}")
    return out


class SafeImageFolder(ImageFolder):
    """:class:`ImageFolder` listed by :func:`list_images` (``self.listing``: what was skipped)."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        if is_valid_file is not None:
            raise ValueError("SafeImageFolder lists by extension only")
        self.listing = list_images(directory, class_to_idx, extensions or IMG_EXTENSIONS,
                                   allow_empty)
        self.listing.log_skipped(os.fspath(directory))
        return self.listing.samples


class MultiViewImageFolder(SafeImageFolder):
    """ImageFolder whose items are indexed by ``(epoch, index)`` and return
    ``(views, label, skipped)``.

    Each view is seeded by ``(seed, epoch, index, view)``. An unreadable image is replaced
    by the next readable one in folder order; ``skipped`` counts the unreadable files passed
    over. Unreadable files are remembered in a shared-memory mask (``bad``) that loader
    workers write and the training process reads: a bad file is read once, not every epoch,
    and :meth:`unreadable` lists each one once however often it was passed over. The
    replacement does not depend on whether a file was already known to be bad, so it stays
    the same in every epoch and every worker.
    """

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        super().__init__(root, loader=load_rgb)
        self.multi_transform = transform
        self.seed = seed
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def unreadable(self) -> list[str]:
        """Paths of the distinct unreadable files found so far (by any worker)."""
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self.bad[i]:
                continue
            path, label = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:  # corrupt, truncated, not an image, not a regular file
                self.bad[i] = 1
                log.warning("skipping unreadable image %s: %s", path, e)
                continue
            n = self.multi_transform.num_views
            seeds = [seed_for(self.seed, epoch, index, v) for v in range(n)]
            return self.multi_transform(img, view_seeds=seeds), label, attempt
        raise RuntimeError(f"no readable image in {self.root}")


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


def eval_folder(root: str, transform: Callable, subset_file: Optional[str] = None) -> ImageFolder:
    """ImageFolder (listed by :func:`list_images`), optionally restricted to the images listed
    in a subset file (``class_dir/filename`` per line, the reference's format)."""
    ds = SafeImageFolder(root, transform=transform, loader=load_rgb)
    if subset_file is not None:
        wanted = set(read_list_file(subset_file))
        keep = [(p, y) for p, y in ds.samples
                if os.path.relpath(p, root).replace(os.sep, "/") in wanted]
        missing = len(wanted) - len(keep)
        if missing:
            raise FileNotFoundError(f"{subset_file}: {missing} listed images not found "
                                    f"under {root}")
        ds.samples = ds.imgs = keep
        ds.targets = [y for _, y in keep]
    return ds
