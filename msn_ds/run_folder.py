"""One run per ``logging.folder``.

Two runs writing one folder delete each other's checkpoints (``keep_last`` prunes by step
number, a save replaces the same step's folder), so before anything is written rank 0:

* takes a lock on the folder (``.lock``, holding the host, pid and start time of the
  holder); a second run is refused, naming the holder;
* refuses a fresh run (no ``--resume``) over checkpoints already there, unless
  ``--overwrite``, which moves the old run aside to ``<folder>.old-<UTC time>/`` (nothing is
  deleted; only a folder holding nothing but a run's files is moved, never a folder that
  holds anything else: ``logging.folder=. --overwrite`` in a repository is refused);
  ``--resume auto`` resumes when there is a checkpoint and starts fresh otherwise.

Nothing is written through a symbolic link planted in the folder: a ``.lock`` link is
refused, ``<tag>-config.yaml`` is replaced in one rename (:func:`write_run_file`) and
``metrics.jsonl`` is opened with ``O_NOFOLLOW`` (:func:`.io.atomic.open_append`), so a link's
target is never touched.

The lock is a POSIX record lock (``fcntl.lockf``) on ``.lock``: the kernel drops it when
the holder dies, ``kill -9`` included, so a lock left by a dead run is simply free (the
next run says whose it was and takes it over). Unlike ``flock``, a record lock is not
inherited by forked children, so data-loader workers outliving a killed trainer cannot keep
the folder locked. On a file system without locks (Lustre mounted without ``flock``) it
falls back to an ``O_EXCL`` lock file: stale when its holder's host is this host and the
process (pid and start time) is gone. ``MSN_DS_RUN_LOCK=fcntl|pidfile`` forces either.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("msn_ds")

LOCK_NAME = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: dict[str, "RunLock"] = {}  # real path -> lock held by this process
# what a run writes at the top of its folder (DeepSpeed adds its recovery scripts), and the
# temporary files of an interrupted atomic write or conversion: --overwrite moves a folder
# only when it holds nothing else
RUN_FILE_RE = re.compile(
    r"^(latest|metrics\.jsonl|tb|zero_to_fp32\.py|zero_to_torch\.py"
    r"|global_step\d+(\.(partial|stale|universal))*(\.tmp)?"
    r"|[A-Za-z0-9_][A-Za-z0-9_.+-]*-(config\.yaml|target\.safetensors))"
    r"(\.\d+\.[0-9a-f]+\.tmp)?$")


class RunFolderError(RuntimeError):
    """The folder cannot be used by this run; the message names it and the way out."""


def folder_problem(folder: str) -> Optional[str]:
    """Why ``folder`` can never be a run folder (a file where a folder must be), or None."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{folder} exists and is not a folder"
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"{folder}: {parent} is a file, not a folder"
    return None


def output_problem(folder: str, tensorboard: bool, needed: int = 0) -> Optional[str]:
    """Why the run could not write its outputs into ``folder``, or None; checked before any
    work, so that a read-only folder, ``tb`` being a file, an unwritable ``metrics.jsonl`` or
    a disk without room for one checkpoint (``needed`` bytes) fail with their names, not
    with a traceback after DeepSpeed has started."""
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path else
                                                 f" (it would hold {folder})")
    outputs = [("metrics.jsonl", False)] + ([("tb", True)] if tensorboard else [])
    for name, is_dir in outputs:
        out = os.path.join(path, name)
        if not os.path.lexists(out) or os.path.islink(out):  # a link is replaced, not used
            continue
        if os.path.isdir(out) != is_dir:
            return f"{out} is {'not ' if is_dir else ''}a folder" + (
                " (TensorBoard writes its logs into tb/; logging.tensorboard=false turns them "
                "off)" if is_dir else "")
        if not os.access(out, os.W_OK | (os.X_OK if is_dir else 0)):
            return f"{out} is not writable"
    try:
        free = os.statvfs(existing).f_bavail * os.statvfs(existing).f_frsize
    except OSError:
        return None
    if free < needed:
        mib = 2 ** 20
        return (f"{existing} has {free / mib:.0f} MiB free; one checkpoint of this model needs "
                f"about {needed / mib:.0f} MiB. Free some space or choose another "
                "logging.folder")
    return None


# --------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            + (f" (since {holder['since']})" if holder.get("since") else ""))


def _parse(text: str) -> dict:
    """A holder record, or {} for anything else (empty, garbage, no valid pid)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
    return holder if ok else {}


def read_holder(path: str) -> dict:
    """The holder recorded in a lock file ({} if none, unreadable or a link). Never call
    this in the process holding an fcntl lock on ``path``: closing the file would release
    it."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
            return _parse(f.read())
    except (OSError, ValueError):
        return {}


def planted_link(path: str, what: str) -> RunFolderError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return RunFolderError(
        f"{path} is a symbolic link (to {target}), not the run's own {what}: a run never "
        f"writes through a link (it would overwrite {target}). Remove the link ({path}) "
        "and start again.")


def write_run_file(path: str, text: str) -> None:
    """A text file of the run folder (``<tag>-config.yaml``), written whole in one rename:
    a symbolic link planted at ``path`` is replaced, its target left untouched."""
    from .io.atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, what="the run's file")


class RunLock:
    """An exclusive lock on a run folder. ``acquire`` creates the folder if needed and
    returns the previous holder it took over from (a dead run), or None; ``release`` (also
    at exit) removes the lock file, and the folder when this lock created it and nothing
    else was written."""

    def __init__(self, folder: str, method: Optional[str] = None):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.method = method or os.environ.get("MSN_DS_RUN_LOCK", "auto")
        if self.method not in ("auto", "fcntl", "pidfile"):
            raise RunFolderError(f"MSN_DS_RUN_LOCK={self.method!r}: expected fcntl or pidfile")
        self.fd: Optional[int] = None
        self.created_folder = False
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start": _start_time(os.getpid()),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def busy(self, holder: dict) -> RunFolderError:
        return RunFolderError(
            f"logging.folder {self.folder} is in use by another run: {describe(holder)} holds "
            f"{self.path}. Two runs in one folder delete each other's checkpoints: wait for "
            "that run to end (or stop it), or give this one another logging.folder.")

    def acquire(self) -> Optional[dict]:
        key = os.path.realpath(self.folder)
        if key in _HELD:  # the same process twice (record locks never conflict with oneself)
            raise self.busy(_HELD[key].record)
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
            self.created_folder = True
        if os.path.islink(self.path):
            raise planted_link(self.path, "lock file")
        previous = None
        if self.method in ("auto", "fcntl"):
            try:
                previous = self._acquire_fcntl()
            except OSError as e:
                if self.method == "fcntl" or e.errno not in _NO_LOCKS:
                    raise
                log.warning("%s: the file system has no locks (%s); using an O_EXCL lock file",
                            self.folder, os.strerror(e.errno))
                self.method = "pidfile"
        if self.method == "pidfile":
            previous = self._acquire_pidfile()
        _HELD[key] = self
        atexit.register(self.release)
        return previous

    def _acquire_fcntl(self) -> Optional[dict]:
        import fcntl

        while True:
            try:  # mode: the umask's; a link planted since the check above is refused
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise planted_link(self.path, "lock file") from None
                raise
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise self.busy(read_holder(self.path)) from None
                raise
            try:  # still the file at the path? (a releasing holder unlinks it, then unlocks)
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        previous = _parse(os.pread(fd, 65536, 0).decode(errors="replace"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.record) + "\n").encode(), 0)
        os.fsync(fd)
        return previous or None

    def _acquire_pidfile(self) -> Optional[dict]:
        """``O_EXCL`` creation is atomic on local file systems and NFS v3+. A stale file is
        removed, then creation retried; two runs taking over the same stale file in the
        same instant is the one race left (fcntl locks have none)."""
        previous = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if os.path.islink(self.path):  # O_EXCL never follows one
                    raise planted_link(self.path, "lock file") from None
                holder = read_holder(self.path)
                if not holder:  # being written this instant, or garbage
                    time.sleep(0.2)
                    holder = read_holder(self.path)
                    if not holder:
                        raise RunFolderError(f"logging.folder {self.folder}: unreadable lock "
                                             f"file {self.path}; if no run is using the "
                                             "folder, delete it") from None
                if holder.get("host") != self.record["host"]:
                    raise RunFolderError(
                        f"{self.busy(holder)} (This file system has no locks, so a lock held "
                        f"on another host cannot be checked: if that run has ended, delete "
                        f"{self.path}.)") from None
                if _alive(holder["pid"], holder.get("start")):
                    raise self.busy(holder) from None
                previous = holder
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return previous
        raise self.busy(read_holder(self.path))

    def release(self) -> None:
        if _HELD.get(os.path.realpath(self.folder)) is not self:
            return
        del _HELD[os.path.realpath(self.folder)]
        mine = self.fd is not None or read_holder(self.path) == self.record
        try:  # unlink first, unlock second: a waiter that opened the old file retries
            if mine:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.created_folder:
            try:
                os.rmdir(self.folder)  # only if nothing was written
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# Occupied folders, --overwrite, --resume auto
# --------------------------------------------------------------------------------------
def foreign_files(folder: str) -> list[str]:
    """The names in ``folder`` that no run writes (see :data:`RUN_FILE_RE`), sorted."""
    return sorted(n for n in os.listdir(folder)
                  if n != LOCK_NAME and not RUN_FILE_RE.fullmatch(n))


def move_aside(folder: str) -> str:
    """Move everything in ``folder`` but the lock to a new ``<folder>.old-<UTC time>[-N]``
    beside it; return that folder. Renames only: nothing is copied or deleted."""
    base = os.path.abspath(folder).rstrip(os.sep)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        dest = f"{base}.old-{stamp}" + (f"-{n}" if n else "")
        try:
            os.mkdir(dest)
            break
        except FileExistsError:
            continue
    else:
        raise RunFolderError(f"cannot find a free name for {base}.old-{stamp}")
    for name in sorted(os.listdir(folder)):
        if name != LOCK_NAME:
            os.rename(os.path.join(folder, name), os.path.join(dest, name))
    return dest


@dataclass
class Claim:
    """The outcome on every process: where to resume from (None: fresh) and, on rank 0,
    the lock to hold until the end."""
    resume_from: Optional[str]
    lock: Optional[RunLock] = None
    notes: list = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(folder: str, resume: Optional[str], overwrite: bool) -> Claim:
    """Rank 0: lock ``folder`` and decide what this run may do there. ``resume``: None
    (fresh), ``"latest"``, ``"auto"`` or a checkpoint path."""
    from .io.checkpoint import complete_tags, find_checkpoint
    from .io.safe_load import CheckpointError

    problem = folder_problem(folder)
    if problem:
        raise RunFolderError(f"logging.folder {problem}")
    lock = RunLock(folder)
    previous = lock.acquire()
    try:
        out = Claim(resume_from=None, lock=lock)
        if previous:
            out.notes.append(f"logging.folder {folder}: took over the lock left by "
                             f"{describe(previous)}, which ended without releasing it")
        tags = [t for _, t in complete_tags(folder)]
        held = (f"{folder} holds the checkpoints of another run ({', '.join(tags[-3:])}"
                f"{', ...' if len(tags) > 3 else ''})")
        if resume == "latest":
            out.resume_from = folder
        elif resume == "auto":
            out.resume_from = folder if tags else None
            if not tags:
                out.notes.append(f"--resume auto: no checkpoint in {folder} yet, "
                                 "starting fresh")
        elif resume is not None:  # an explicit checkpoint: in this folder, or refuse to mix
            try:
                source = os.path.realpath(find_checkpoint(resume)[0])
            except CheckpointError:
                source = None  # plan_resume reports it
            out.resume_from = resume
            if tags and source is not None and source != os.path.realpath(folder):
                raise RunFolderError(
                    f"logging.folder {held}; resuming {resume} into it would mix two runs "
                    "(keep_last prunes by step across both). Give this run another "
                    "logging.folder.")
        elif overwrite:
            foreign = foreign_files(folder)
            if foreign:  # not a run folder (the repository, a home folder): move nothing
                shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)"
                                                  if len(foreign) > 5 else "")
                raise RunFolderError(
                    f"--overwrite: logging.folder {folder} holds files that no run writes "
                    f"({shown}); --overwrite moves aside only a folder that holds nothing but "
                    "a run's files (checkpoints, latest, metrics.jsonl, tb, <tag>-config.yaml, "
                    "<tag>-target.safetensors). Give this run another logging.folder, or move "
                    "those files out first.")
            if any(name != LOCK_NAME for name in os.listdir(folder)):
                dest = move_aside(folder)
                out.notes.append(f"--overwrite: moved the previous run in {folder} to {dest}")
        elif tags:
            raise RunFolderError(
                f"logging.folder {held}; a fresh run here would delete them. Continue that "
                "run with --resume (or --resume auto), give this one another logging.folder, "
                f"or pass --overwrite to move the old run aside to {folder.rstrip(os.sep)}"
                ".old-<time>/ (nothing is deleted).")
        return out
    except BaseException:
        lock.release()
        raise


def claim_everywhere(folder: str, resume: Optional[str], overwrite: bool) -> Claim:
    """Collective: rank 0 claims the folder; every process learns the outcome (so that
    all resume or all start fresh, and all exit if rank 0 is refused; none waits)."""
    from . import distributed as D

    result, error = None, None
    if D.is_main():
        try:
            result = claim(folder, resume, overwrite)
        except RunFolderError as e:
            error = str(e)
        except OSError as e:
            error = f"logging.folder {folder}: {e}"
        except Exception as e:  # still tell the other processes, or they would wait forever
            error = f"logging.folder {folder}: {type(e).__name__}: {e}"
    error, resume_from = D.from_main((error, None if result is None else result.resume_from))
    if not D.is_main():
        result = Claim(resume_from=resume_from)
    if error is not None:
        raise RunFolderError(error)
    return result
