"""The one way files are written: whole or not at all, and never at the cost of the old one.

:func:`atomic_write` writes into a temporary file (or folder) beside the destination, created
with the mode the umask gives (``mkstemp``/``mkdtemp`` make it private, and the rename would
keep that), fsyncs it and renames it over the destination: a kill at any moment leaves either
the previous file or the new one. A write that fails for lack of space (full disk, quota,
``ulimit -f``) is a :class:`SaveError` saying how much was needed and is free; the temporary
file is removed and the previous file is untouched.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import re
import secrets
import shutil
import time
import traceback
from typing import Any, Callable, Optional


class SaveError(RuntimeError):
    """A save that failed (a full disk, most often); the message says which path, why, how
    much space it needed, and what was kept."""


def atomic_write(path: str, write: Callable[[str], Any], *, folder: bool = False,
                 what: str = "the file", needed: int = 0, kept: str = "") -> None:
    """``write(tmp)`` fills a new temporary file (``folder``: an empty folder) beside ``path``,
    which then replaces ``path`` in one rename. ``needed``: the expected size in bytes, for
    the message of a full disk; ``kept``: a sentence for that message saying what survives.
    Errors other than write failures pass through unchanged (the temporary is removed)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(path)
    tmp = _create_temp(path, folder)
    mode = os.stat(tmp).st_mode & 0o777  # 0666 (folders 0777) less the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # safetensors (0.8) writes its files 0600 whatever the umask
        if not folder:  # a folder's files are not synced one by one (thousands of images)
            _fsync(tmp)
        os.replace(tmp, path)
        _fsync(parent, directory=True)
    except Exception as e:
        release_writer(e)
        written = tree_size(tmp)
        remove_path(tmp)
        reason = no_space_reason(e, parent, max(needed, written))
        if reason is None and not is_write_failure(e):
            raise
        raise SaveError(
            f"cannot write {what} {path}: "
            + (f"{reason} (needs about {human_size(needed or written)}; "
               f"{human_size(free_space(parent))} available)" if reason
               else f"{type(e).__name__}: {e}")
            + f". Nothing was written (the temporary file was removed).{kept}") from None
    finally:
        remove_path(tmp)


def open_append(path: str):
    """``path`` opened for appending text, never through a symbolic link: a link planted in
    its place (pointing anywhere) is removed and a new file created, the link's target left
    untouched (and a warning logged)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    for _ in range(10):
        try:
            return os.fdopen(os.open(path, flags, 0o666), "a")
        except OSError as e:
            if e.errno != errno.ELOOP or not os.path.islink(path):
                raise
            try:
                target = os.readlink(path)
                os.unlink(path)  # the link itself, never its target
            except FileNotFoundError:
                continue
            logging.getLogger("msn_ds").warning(
                "%s was a symbolic link (to %s): replaced by a new file; its target is left "
                "untouched (a run never writes through a link)", path, target)
    raise OSError(errno.ELOOP, f"{path} keeps being replaced by a symbolic link")


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temporaries of earlier writes of ``path`` whose writer is gone (killed
    with ``kill -9`` mid-write; their names hold the writer's pid); returns them. A writer on
    another host sharing the folder looks gone too, so a temporary modified within the last
    minute (a live writer keeps writing) is left alone."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.[0-9a-f]{8}\.tmp$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if time.time() - e.stat(follow_symlinks=False).st_mtime < 60:
                continue
            remove_path(e.path)
            removed.append(e.path)
        except OSError:
            continue
    if removed:
        logging.getLogger("msn_ds").warning("removed %d temporaries left by an interrupted "
                                            "write of %s", len(removed), path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_temp(path: str, folder: bool) -> str:
    """A new empty file (or folder) beside ``path``, created with mode ``0666 & ~umask``
    (``0777 & ~umask``)."""
    while True:
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: str, directory: bool = False) -> None:
    """The data (or, for a folder, the rename) on disk before we go on; a file system that
    cannot sync a folder is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system"}


def _errno_of(e: BaseException) -> Optional[int]:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"os error (\d+)", str(e))  # safetensors (Rust) words it so
    return int(m.group(1)) if m else None


def is_write_failure(e: BaseException) -> bool:
    """An I/O error, or torch's zip writer failing (which names no errno: ``[enforce fail at
    inline_container.cc] unexpected pos``, ``PytorchStreamWriter failed writing``)."""
    return isinstance(e, OSError) or _errno_of(e) is not None or bool(re.search(
        r"inline_container|PytorchStreamWriter|unexpected pos|file write failed", str(e)))


def no_space_reason(e: BaseException, folder: str, needed: int) -> Optional[str]:
    """Why a failed write ran out of space, or None when it did not. With no errno (torch's
    writer), the file system's free space or the process's file-size limit decides."""
    import resource

    code = _errno_of(e)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    over_limit = limit != resource.RLIM_INFINITY and limit < needed
    if code not in (None, errno.EFBIG) or (code is None and not is_write_failure(e)):
        return _NO_SPACE.get(code)
    if over_limit:
        return f"the process's file-size limit (ulimit -f) of {human_size(limit)} was reached"
    if code == errno.EFBIG:
        return _NO_SPACE[code]
    if free_space(folder) < needed:
        return "no space left on the device"
    return None


def release_writer(e: BaseException) -> None:
    """Drop the failed writer's frames: until then torch's zip writer keeps the file open,
    and a removed file's space is not given back."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # the writer sits in a chained exception's frames
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__context__
    gc.collect()


def free_space(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def tree_size(path: str) -> int:
    """Bytes in a file, or in every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def remove_path(path: str) -> None:
    """Remove a file or a folder tree if it is there; errors are ignored (cleanup only)."""
    try:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass
