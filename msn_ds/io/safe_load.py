"""Reading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and a pickle unpickled in full can call any function it names
(``os.system``, ``subprocess.call``): a checkpoint from someone else is a program. So every
checkpoint file is read with torch's weights-only unpickler: ours directly (:func:`safe_load`),
DeepSpeed's reads on our behalf (its checkpoint engine in ``engine.load_checkpoint``,
``zero_to_fp32``) under :func:`restricted_loads`, and the conversion to the universal format
in a subprocess (``python -m msn_ds.io.to_universal``) that installs the same restriction first.

The unpickler accepts tensors, containers and torch's own types, plus the few DeepSpeed types
that genuine checkpoints hold (:func:`allowed_globals`: listed from the pickles of ZeRO-0..3
fp32/bf16/CPU-offload and universal checkpoints that DeepSpeed 0.19.8 saves). Anything else is
refused with a :class:`CheckpointError` that names the file and the type.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Iterable

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"      # torch: weights_only=True whatever the caller says
NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_TORCH_LOAD = torch.serialization.load            # the real one, whatever we patch later


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def allowed_globals() -> list:
    """The non-torch types DeepSpeed pickles into its checkpoint files (optimizer states):
    plain data holders, rebuilt without running code of the file's choosing.

    ``LossScaler`` (bf16/fp32) and ``DynamicLossScaler`` (fp16) are the optimizer's loss
    scaler, ``ZeroStageEnum`` the stage, ``fragment_address`` (ZeRO-1/2) a ``(numel, start)``
    dataclass."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refusal(path: Any, err: BaseException) -> CheckpointError:
    """The error for a file the restricted unpickler refused, naming the file and the type."""
    msg = str(err)
    m = re.search(r"GLOBAL (\S+)", msg)
    if m:
        return refused(path, [m.group(1).rstrip(".")])
    m = re.search(r"Unsupported operand (\S+)", msg)
    return refused(path, [], f"its pickle uses opcode {m.group(1)}, which the restricted "
                             "unpickler does not allow" if m
                   else (msg.strip().splitlines() or ["refused"])[-1])


def refused(path: Any, names: list[str], what: str = "") -> CheckpointError:
    kind = "is not a type" if len(names) == 1 else "are not types"
    what = what or f"it names {', '.join(names)}, which {kind} that checkpoints hold"
    return CheckpointError(
        f"{path}: refused to load: {what}. Checkpoint files are read with torch's weights-only "
        "unpickler (a crafted checkpoint could otherwise run code); only tensors, containers "
        "and the DeepSpeed types of genuine checkpoints are accepted. Do not use files from a "
        "source you do not trust")


def _path_of(f: Any) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)


def safe_load(path: Any, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and :func:`allowed_globals`; a refusal is a
    :class:`CheckpointError` naming the file and the type. Other errors (a truncated file)
    pass through for the caller to word."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise refusal(_path_of(path), e) from None


def scan(paths: Iterable[str]) -> None:
    """Refuse, before anything is loaded, a file whose pickle names a type outside the
    allow-list (a static read of each file's ``data.pkl``, no tensor data).

    Every process runs it before the engine exists, so all of them stop at the same point
    rather than one refusing inside a collective load while the others wait for it. The
    loads themselves are restricted too: this only moves the refusal earlier."""
    with torch.serialization.safe_globals(allowed_globals()):
        for path in paths:
            if not zipfile.is_zipfile(path):
                continue  # legacy format: the restricted load itself decides
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except pickle.UnpicklingError as e:
                raise refusal(path, e) from None
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from None
            if unsafe:
                raise refused(path, sorted(unsafe))


def checkpoint_files(folder: str) -> list[str]:
    """Every ``.pt`` file under a checkpoint folder (a universal one has them in sub-folders)."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in sorted(names) if n.endswith(".pt")]
    return sorted(found)


class restricted_loads:
    """While active, every ``torch.load`` in this process (DeepSpeed's, which ask for
    ``weights_only=False``, included) is weights-only under :func:`allowed_globals`.

    Three layers: ``torch.load``/``torch.serialization.load`` are replaced by a wrapper
    that forces ``weights_only=True`` and turns a refusal into a :class:`CheckpointError`
    naming the file; torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set, which catches a
    caller holding the original function; and a refusal that the caller swallowed is raised
    again on exit. Re-entrant; restores everything on exit."""

    _depth = 0

    def __init__(self) -> None:
        self.refused: list[CheckpointError] = []

    def _load(self, f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None,
              **pickle_load_args):
        try:
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            err = refusal(_path_of(f), e)
            self.refused.append(err)
            raise err from None

    def __enter__(self) -> "restricted_loads":
        restricted_loads._depth += 1
        if restricted_loads._depth > 1:
            return self
        self._saved = (torch.load, torch.serialization.load, os.environ.get(FORCE_ENV),
                       os.environ.get(NO_FORCE_ENV))
        self._globals = torch.serialization.safe_globals(allowed_globals())
        self._globals.__enter__()
        torch.load = torch.serialization.load = self._load
        os.environ[FORCE_ENV] = "1"
        os.environ.pop(NO_FORCE_ENV, None)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        restricted_loads._depth -= 1
        if restricted_loads._depth > 0:
            return
        torch.load, torch.serialization.load = self._saved[:2]
        for name, value in zip((FORCE_ENV, NO_FORCE_ENV), self._saved[2:]):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._globals.__exit__(None, None, None)
        if exc_type is None and self.refused:
            raise self.refused[0]
