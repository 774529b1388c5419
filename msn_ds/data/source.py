"""Where pretraining images come from: an index-addressable :class:`ImageSource`.

A source is ``len(source)`` samples, each addressed by its index ``i``: ``read(i)`` gives
its encoded bytes, ``label(i)`` its class index, ``key(i)`` the name messages use for it
(a path, or ``shard.tar:key``), ``name`` the name of the whole (a folder, a shard pattern).
Both loaders read only through it, so a new kind of storage is one more subclass: the
sampler's order, the seeded views, the skipping and counting of unreadable samples and both
loaders' batches follow from the index alone.

The one rule for an unreadable sample (:func:`first_readable`): it is replaced by the next
readable sample in index order (wrapping), and remembered in ``bad``, a shared-memory mask
that loader workers write and the training process reads, so each one is read once, named
once in the log (:meth:`ImageSource.mark_bad`) and counted once. The replacement does not
depend on what is already known to be bad, so it is the same in every epoch, worker,
process and loader.

:class:`FolderSource` is an ImageFolder listed by :func:`list_images`: torchvision's order
and labels without its two traps: a FIFO (or socket, device) named ``*.png`` would block the
first read forever, and a directory symlink loop would list the same images over and over
(and under other classes). Non-regular files are skipped and counted; a directory symlink is
followed only when its real path is outside the tree already listed, at most once.
Tar shards are :class:`msn_ds.data.shards.ShardSource`.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .probe import decode_rgb, read_regular

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


UNLABELLED = ""
"""The one class of an unlabelled folder (images directly in it): its tree, label 0."""


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

    An unlabelled folder (``class_to_idx`` not given, and images directly in ``root``) is
    one source: the whole tree, sub-folders of any depth included, with label 0 (class
    ``""``, :data:`UNLABELLED`): self-supervised pretraining needs no class folders.

    ``FileNotFoundError`` when a class has no image (unless ``allow_empty``), as torchvision.
    """
    root = os.fspath(root)
    if class_to_idx is None:
        entries = list(os.scandir(root))
        classes = sorted(e.name for e in entries if e.is_dir())
        suffixes = tuple(e.lower() for e in extensions)
        if any(e.name.lower().endswith(suffixes) and not e.is_dir() for e in entries):
            class_to_idx = {UNLABELLED: 0}
        elif not classes:
            raise FileNotFoundError(f"Couldn't find any class folder or image in {root}.")
        else:
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


def first_readable(n: int, index: int, bad: torch.Tensor, open_one: Callable[[int], object],
                   mark_bad: Callable[[int, Exception], None], where: str):
    """``(i, opened, passed)``: the first sample ``i`` at or after ``index`` (index order,
    wrapping) that ``open_one`` opens, and how many unreadable samples were passed over to
    reach it. Samples already marked in ``bad`` are passed over unread; one that fails is
    handed to ``mark_bad``. The one replacement rule of every loader and dataset."""
    for attempt in range(n):
        i = (index + attempt) % n
        if bad[i]:
            continue
        try:
            return i, open_one(i), attempt
        except Exception as e:  # corrupt, truncated, a decompression bomb, not a file
            mark_bad(i, e)
    raise RuntimeError(f"no readable image in {where}")


def new_bad_mask(n: int) -> torch.Tensor:
    """The shared record of unreadable samples: one byte per sample, in shared memory so
    that loader workers' finds reach the training process."""
    return torch.zeros(n, dtype=torch.uint8).share_memory_()


class ImageSource:
    """Index-addressable samples: see the module docstring. Subclasses set ``name`` and
    ``bad`` (:func:`new_bad_mask`) and define ``__len__``, :meth:`read`, :meth:`label` and
    :meth:`key`; :meth:`open` may decode more cheaply than ``decode_rgb(read(i))`` but must
    give the same pixels. A source is pickled into loader processes (DALI's host workers),
    so open handles must not travel: each process opens its own."""

    name: str = "?"
    bad: torch.Tensor

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i``; raises ``OSError`` if they cannot be read."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        """Sample ``i``'s name in messages and unreadable lists."""
        raise NotImplementedError

    def open(self, i: int) -> Image.Image:
        """Sample ``i`` decoded to RGB, as the torch loader reads it."""
        return decode_rgb(self.read(i))

    @property
    def samples(self):
        """``(key, label)`` per sample, as a sequence (computed on access)."""
        return _Samples(self)

    @property
    def targets(self) -> list[int]:
        return [self.label(i) for i in range(len(self))]

    def mark_bad(self, i: int, reason) -> None:
        """Record sample ``i`` as unreadable (named in the log the first time)."""
        if not self.bad[i]:
            self.bad[i] = 1
            log.warning("skipping unreadable image %s: %s", self.key(i), reason)

    def read_from(self, index: int):
        """``(image, label, passed)``: the first readable sample at or after ``index``
        (:func:`first_readable`)."""
        i, img, passed = first_readable(len(self), index, self.bad, self.open, self.mark_bad,
                                        self.name)
        return img, self.label(i), passed

    def unreadable(self) -> list[str]:
        """Keys of the distinct unreadable samples found so far (by any worker)."""
        return [self.key(i) for i in self.bad.nonzero().flatten().tolist()]


class _Samples:
    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.source.key(i), self.source.label(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class FolderSource(ImageSource):
    """An ImageFolder (class sub-folders) listed by :func:`list_images`: ``samples`` are
    ``(path, class index)``; ``listing`` says what was skipped (logged once)."""

    def __init__(self, root: str, extensions: tuple = IMG_EXTENSIONS):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = self.name = root
        self.listing = list_images(root, extensions=extensions)
        self.listing.log_skipped(root)
        if self.listing.classes == [UNLABELLED]:
            log.info("%s: no class sub-folders, images directly in it: %d images (sub-folders "
                     "included) as one unlabelled set, label 0", root, len(self.listing.samples))
        self.classes, self.class_to_idx = self.listing.classes, self.listing.class_to_idx
        self._samples = self.listing.samples
        self.bad = new_bad_mask(len(self._samples))

    @property
    def samples(self) -> list:
        return self._samples

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self._samples]

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, i: int) -> bytes:
        return read_regular(self._samples[i][0])  # a FIFO raises instead of blocking

    def open(self, i: int) -> Image.Image:
        return load_rgb(self._samples[i][0])

    def label(self, i: int) -> int:
        return self._samples[i][1]

    def key(self, i: int) -> str:
        return self._samples[i][0]
