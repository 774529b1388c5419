"""WebDataset tar shards as an :class:`~.source.ImageSource` (``data.shards``).

``data.shards`` is a brace pattern as WebDataset writes them
(``/data/train-{000000..000127}.tar``; ``{a,b}`` lists too) or a list of them. A sample is
the run of consecutive tar members sharing a key (the member name up to the first dot of
its last component): ``key.<jpg|jpeg|png|webp>`` the image, ``key.cls`` its label (decimal
text; absent: 0); other members are ignored. Shards written by the ``webdataset`` library or
by plain ``tar`` / Python's ``tarfile`` read alike; they must be uncompressed, since every
sample is read by offset.

Index-addressable: each shard's offset index (key, image offset and size, label per sample)
is built on first use by one pass over the tar headers (members' data is skipped, labels
read) and kept in ``<shard>.msn-index.json`` beside the shard, or, if that folder is not
writable, under :func:`index_dir` (``$MSN_DS_SHARD_INDEX``, default
``~/.cache/msn_ds/shard-index``). It is reused while the shard's size and modification time
are the ones it was built from, and rebuilt otherwise. Reading sample ``i`` is one
``pread`` of its image's bytes: no scan of the tar, no shared file offset between loader
workers. Samples are numbered shard by shard in the order given, so the sampler, the views'
seeds and the unreadable-sample rule are the folder's, and shards written in a folder's
sorted order give the folder's batches bit for bit.

Everything that can be checked before training is, with a :class:`ShardError` (a
``ValueError``) naming the value: a pattern that does not parse, a shard that is missing or
not a regular file, a file that is not an uncompressed tar or ends inside a member, a sample
without an image, a label that is not an integer. An image that does not decode (truncated,
corrupt) is a bad sample like a bad file in a folder: skipped, counted, named
``shard.tar:key``.

:func:`write_shards` writes any source (a folder: ``scripts/make_shards.py``) as such shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..io.atomic import atomic_write
from .probe import decode_rgb
from .source import ImageSource, new_bad_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".msn-index.json"
INDEX_FORMAT = "msn_ds shard index"
INDEX_VERSION = 1
MAX_OPEN_SHARDS = 64  # file descriptors a reader keeps open (least recently used closed)


class ShardError(ValueError):
    """Shards that cannot be trained on, found before any work."""


# --- patterns --------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's (``braceexpand``'s) brace patterns: ``{000..012}`` (zero-padded to the
    width of the bounds as written), ``{a,b,c}``; several groups multiply, left to right.
    Raises :class:`ShardError` for unbalanced braces or a range that runs backwards."""
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise ShardError(f"{pattern!r}: unbalanced braces")
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    if "{" in head or "}" in head:
        raise ShardError(f"{pattern!r}: unbalanced braces")
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ShardError(f"{pattern!r}: the range {{{body}}} runs backwards")
        width = max(len(r.group(1)), len(r.group(2))) if r.group(1).startswith("0") else 0
        items = [str(v).zfill(width) for v in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ShardError(f"{pattern!r}: {{{body}}} is neither a range {{lo..hi}} nor a list "
                         "{a,b}")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def expand_shards(spec: Union[str, Sequence[str]]) -> list[str]:
    """The shard paths of ``data.shards`` (a pattern or a list of them), in order. Raises
    :class:`ShardError` for a bad pattern, an empty list, or a shard named twice."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ShardError(f"{spec!r}: no shard given")
    paths = []
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise ShardError(f"{spec!r}: every entry must be a non-empty path or pattern, "
                             f"got {p!r}")
        paths += expand_braces(p)
    seen = set()
    for p in paths:
        if p in seen:
            raise ShardError(f"{spec!r}: names the shard {p} twice")
        seen.add(p)
    return paths


def shard_problem(spec, check_files: bool = True) -> Optional[str]:
    """Why ``data.shards`` cannot be used (a bad pattern; with ``check_files``, a missing
    or non-regular shard), or None. Cheap: one ``stat`` per shard, nothing read."""
    try:
        paths = expand_shards(spec)
    except ShardError as e:
        return str(e)
    if not check_files:
        return None
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        return (f"{spec!r}: {len(missing)} of {len(paths)} shards not found, e.g. {missing[0]}"
                if len(missing) < len(paths) else
                f"{spec!r} matches no file ({len(paths)} names, e.g. {paths[0]}, none exists)")
    for p in paths:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):
            return f"{spec!r}: {p} is not a regular file"
    return None


# --- the index of one shard ------------------------------------------------------------------
def index_dir() -> str:
    """Where indexes go when a shard's own folder is not writable."""
    return os.environ.get("MSN_DS_SHARD_INDEX") or os.path.join(
        os.path.expanduser("~"), ".cache", "msn_ds", "shard-index")


def index_paths(shard: str) -> list[str]:
    """Where the index of ``shard`` is looked for, in order: beside it, then the fallback
    folder (a name made unique by the shard's absolute path)."""
    real = os.path.abspath(shard)
    tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [shard + INDEX_SUFFIX,
            os.path.join(index_dir(), f"{tag}-{os.path.basename(shard)}{INDEX_SUFFIX}")]


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member name: the extension starts at the first
    dot of the last path component (``a/b.c.jpg`` -> ``a/b``, ``c.jpg``); no dot: no
    extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def scan_shard(path: str) -> list[list]:
    """``[[key, extension, offset, size, label], ...]``, one per sample, from one pass over
    the tar's headers (labels read from ``.cls`` members). :class:`ShardError` for a file
    that is not an uncompressed tar, one that ends inside a member or in a broken header,
    a sample without an image, or a label that is not an integer."""
    size = os.path.getsize(path)
    samples: list[list] = []
    cur = None  # [key, ext, offset, size, label, has_image]

    def close(cur):
        if cur is None:
            return
        if cur[1] is None:
            raise ShardError(f"{path}: sample {cur[0]!r} has no image "
                             f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
        samples.append(cur[:5])

    with open(path, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise ShardError(f"{path}: not an uncompressed tar file ({e})") from None
        with tf:
            while True:
                try:
                    m = tf.next()
                except tarfile.TarError as e:
                    raise ShardError(f"{path}: unreadable tar ({e})") from None
                if m is None:
                    break
                if m.offset_data + m.size > size:
                    raise ShardError(f"{path}: ends inside member {m.name!r} (truncated)")
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                ext = ext.lower()
                if not ext:
                    continue
                if cur is None or cur[0] != key:
                    close(cur)
                    cur = [key, None, 0, 0, 0]
                if ext in IMAGE_EXTENSIONS and cur[1] is None:
                    cur[1:4] = ext, m.offset_data, m.size
                elif ext == "cls":
                    f.seek(m.offset_data)
                    text = f.read(min(m.size, 64)).decode("utf-8", "replace").strip()
                    try:
                        cur[4] = int(text)
                    except ValueError:
                        raise ShardError(f"{path}: {key}.cls holds {text!r}, not an integer "
                                         "class index") from None
            close(cur)
            end = tf.offset  # after the last member: only zero blocks may follow
        f.seek(end)
        rest = f.read(64 * 1024)
        if rest.strip(b"\0"):
            raise ShardError(f"{path}: unreadable tar (a broken header at byte {end})")
    if not samples:
        raise ShardError(f"{path}: holds no image sample (key.jpg, key.png, ...)")
    return samples


def load_index(shard: str, rebuild: bool = False) -> list[list]:
    """The shard's samples (:func:`scan_shard`) from its cached index when it was built
    from the shard as it is now (size, modification time), else scanned and cached (beside
    the shard, else in :func:`index_dir`; written atomically, so ranks building one at the
    same time are safe)."""
    st = os.stat(shard)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    places = index_paths(shard)
    if not rebuild:
        for place in places:
            try:
                with open(place, encoding="utf-8") as f:
                    idx = json.load(f)
            except (OSError, ValueError):
                continue
            if (isinstance(idx, dict) and idx.get("format") == INDEX_FORMAT
                    and idx.get("version") == INDEX_VERSION
                    and all(idx.get(k) == v for k, v in stamp.items())):
                return idx["samples"]
    samples = scan_shard(shard)
    text = json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION, **stamp,
                       "shard": os.path.basename(shard), "samples": samples},
                      separators=(",", ":"))
    for place in places:
        tmp = f"{place}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(place) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, place)
            break
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    else:
        log.warning("%s: could not write its index (beside it or in %s); it will be rebuilt "
                    "next time", shard, index_dir())
    return samples


# --- the source -------------------------------------------------------------------------------
class ShardSource(ImageSource):
    """The samples of WebDataset tar shards, numbered shard by shard in the given order.
    ``shards``: a brace pattern or a list of them (``data.shards``)."""

    def __init__(self, shards: Union[str, Sequence[str]]):
        self.spec = shards
        self.name = shards if isinstance(shards, str) else ", ".join(shards)
        problem = shard_problem(shards)
        if problem:
            raise ShardError(problem)
        self.shards = expand_shards(shards)
        keys, shard_of, offsets, sizes, labels = [], [], [], [], []
        for s, path in enumerate(self.shards):
            samples = load_index(path)
            keys.append([k for k, *_ in samples])
            shard_of.append(np.full(len(samples), s, np.int32))
            offsets.append(np.array([x[2] for x in samples], np.int64))
            sizes.append(np.array([x[3] for x in samples], np.int64))
            labels.append(np.array([x[4] for x in samples], np.int64))
        self._keys = keys
        self._starts = np.cumsum([0] + [len(k) for k in keys])
        self._shard = np.concatenate(shard_of)
        self._offset, self._size = np.concatenate(offsets), np.concatenate(sizes)
        self._label = np.concatenate(labels)
        self.bad = new_bad_mask(len(self._label))
        self._fds: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        log.info("data: %d samples in %d shards (%s)", len(self), len(self.shards), self.name)

    def __len__(self) -> int:
        return len(self._label)

    def label(self, i: int) -> int:
        return int(self._label[i])

    def key(self, i: int) -> str:
        s = int(self._shard[i])
        return f"{self.shards[s]}:{self._keys[s][i - self._starts[s]]}"

    def read(self, i: int) -> bytes:
        s, size = int(self._shard[i]), int(self._size[i])
        data = os.pread(self._fd(s), size, int(self._offset[i]))
        if len(data) != size:
            raise OSError(f"{self.shards[s]} is shorter than its index says (changed since "
                          "it was indexed?)")
        return data

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        fd = os.open(self.shards[s], os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced by a FIFO since indexed
            os.close(fd)
            raise OSError(f"not a regular file: {self.shards[s]}")
        self._fds[s] = fd
        while len(self._fds) > MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()  # descriptors stay with their process
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


KEY_DIGITS = 9  # sample keys the writer gives: the sample's index in the source
SHARD_DIGITS = 6  # at least; more when the shard count needs them


@dataclass
class Written:
    """What :func:`write_shards` wrote: the ``data.shards`` pattern, the shard paths, the
    bytes, and the samples converted to PNG or stored unreadable (keys of the source)."""
    pattern: str
    paths: list
    samples: int
    bytes: int = 0
    converted: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)


def shard_names(out_dir: str, prefix: str, count: int) -> tuple[list[str], str]:
    """The ``count`` shard paths and the brace pattern naming them (at least 6 digits, more
    when ``count`` needs them, all of one width so that the pattern expands to them)."""
    width = max(SHARD_DIGITS, len(str(count - 1)))
    paths = [os.path.join(out_dir, f"{prefix}-{s:0{width}d}.tar") for s in range(count)]
    first, last = f"{0:0{width}d}", f"{count - 1:0{width}d}"
    return paths, os.path.join(out_dir, f"{prefix}-{{{first}..{last}}}.tar")


def _sample_bytes(source: ImageSource, i: int, written: Written) -> tuple[str, bytes]:
    """``(extension, bytes)`` of sample ``i`` as :func:`write_shards` stores it."""
    ext = source.key(i).rsplit(".", 1)[-1].lower()
    try:
        data = source.read(i)
    except OSError:
        written.unreadable.append(source.key(i))
        return (ext if ext in IMAGE_EXTENSIONS else "png"), b""
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    try:
        buf = io.BytesIO()
        decode_rgb(data).save(buf, "PNG")
    except Exception:  # undecodable: stays so in the shard (skipped and counted alike)
        written.unreadable.append(source.key(i))
        return "png", data
    written.converted.append(source.key(i))
    return "png", buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0, mode 0644, no owner: the same folder, the same bytes
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(source: ImageSource, out_dir: str, shard_size: int, prefix: str = "train",
                 labels: bool = True, on_image: Callable[[], None] = lambda: None,
                 on_shard: Callable[[int, int], None] = lambda s, done: None) -> Written:
    """Write ``source``'s samples in index order as standard WebDataset shards with Python's
    ``tarfile`` (``<out_dir>/<prefix>-000000.tar``, ..., ``shard_size`` samples each, the
    last the rest): sample ``i`` is ``<i, 9 digits>.<ext>``, its bytes verbatim (``ext`` its
    key's, lower case), plus ``.cls`` (its label) when ``labels``. Read back, the shards give
    ``source``'s batches bit for bit.

    A sample in a format that is not a WebDataset image type is decoded to RGB as both
    loaders do and stored as PNG (lossless for what the loaders see); one that cannot be read
    or decoded is stored as it is (unreadable: empty), so the loaders skip and count it as in
    the source. Each shard is written atomically (``out_dir`` must exist); raises
    ``OSError`` / :class:`~msn_ds.io.atomic.SaveError` when one cannot be (it is left out
    whole). ``on_image()`` / ``on_shard(s, samples done)``: progress."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    n = len(source)
    count = -(-n // shard_size)
    paths, pattern = shard_names(out_dir, prefix, count)
    written = Written(pattern, paths, n)
    for s, path in enumerate(paths):
        stop = min(n, (s + 1) * shard_size)

        def fill(tmp, start=s * shard_size, stop=stop):
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
                for i in range(start, stop):
                    ext, data = _sample_bytes(source, i, written)
                    _add(tf, f"{i:0{KEY_DIGITS}d}.{ext}", data)
                    if labels:
                        _add(tf, f"{i:0{KEY_DIGITS}d}.cls", str(source.label(i)).encode())
                    on_image()

        atomic_write(path, fill, what="the shard")
        written.bytes += os.path.getsize(path)
        on_shard(s, stop)
    return written


def verify(source: ImageSource, written: Written) -> None:
    """Read the shards back (building and caching each one's offset index): the same count
    and labels as ``source``; raises ``RuntimeError`` otherwise (a bug, not bad input)."""
    back = ShardSource(written.pattern)
    if len(back) != len(source) or any(back.label(i) != source.label(i)
                                       for i in range(len(source))):
        raise RuntimeError(f"{written.pattern}: read back {len(back)} samples, not the "
                           f"{len(source)} of {source.name} with their labels")
