"""Small helpers shared by the tests."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The CPU suite's child processes run on the CPU even on a GPU host: DeepSpeed's CPU
# accelerator (gloo) and no visible GPU, so that a second rank never asks for a cuda:1
# that a one-GPU machine lacks. GPU tests (tests/test_gpu.py) set their own environment.
CPU_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def cpu_env(**extra) -> dict:
    return {**os.environ, **CPU_ENV, **extra}


def run_cli(*args, timeout=600, env=None, check=True, expect=0, nproc=1, launcher=None,
            umask=None):
    """``python ARGS`` in the repository root on the CPU (:data:`CPU_ENV` and ``env`` over
    the environment); asserts that it exits with ``expect`` unless ``check`` is False.
    ``nproc`` > 1 starts that many processes with ``torch.distributed.run``; ``launcher``
    replaces ``python`` (or torchrun) by another command; ``umask`` is the child's.

    Every test's child process starts here, except where the test must hold the child while
    it runs (``subprocess.Popen``: signals, concurrent runs, a stage timing out), run it from
    another folder (``test_config``: train.py from outside the repository; ``test_dali``: a
    script importing a test module), or run no Python (``mount``, ``git``, the bash device
    scripts with their own environment, the README's shell lines)."""
    if launcher is None:
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=cpu_env(**(env or {})),
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    if check:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_script(path: str):
    """The file ``ROOT/path`` (a script, or train.py) as a module, registered under its stem:
    scripts are files, not a package, so they are imported by path (no sys.path edit)."""
    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_folder(root: Path, counts: dict, size: int = 16, seed: int = 0) -> None:
    """An ImageFolder of random RGB PNGs: ``counts`` maps class name to number of images."""
    g = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / cls / f"img{i:03d}.png")


def write_shards(folder, out_dir, shard_size: int = 4) -> str:
    """The ImageFolder ``folder`` as standard WebDataset tar shards, written with Python's
    ``tarfile`` in the folder's sorted order by scripts/make_shards.py's writer
    (``<out_dir>/train-000000.tar``, ..., ``shard_size`` samples each, sample ``i`` as
    ``%09d.<ext>`` + ``%09d.cls``); returns the ``data.shards`` brace pattern naming them.
    Read back, they give the folder's batches bit for bit (tests/test_shards.py), so a test
    can run on either and compare."""
    from msn_ds.data.shards import write_shards as write
    from msn_ds.data.source import FolderSource

    os.makedirs(out_dir, exist_ok=True)
    return write(FolderSource(str(folder)), str(out_dir), shard_size).pattern


def shard_key_to_path(folder, pattern) -> dict:
    """``shard.tar:key`` (how a shard sample is named in messages and unreadable lists) ->
    the folder's file it was written from by :func:`write_shards`."""
    from msn_ds.data.shards import ShardSource
    from msn_ds.data.source import FolderSource

    shards, files = ShardSource(pattern), FolderSource(str(folder))
    assert len(shards) == len(files)
    return {shards.key(i): files.key(i) for i in range(len(files))}


def source_args(source: str, pattern: str) -> list:
    """train.py overrides for a test parametrized over where the images come from:
    "folder" as configured, or "shards": the shards ``pattern`` (written from that folder by
    :func:`write_shards`), with the folder out of reach."""
    assert source in ("folder", "shards"), source
    return [] if source == "folder" else [f"data.shards={pattern}",
                                          "data.root_path=/nonexistent-folder"]


def loader_source(source: str, folder, out_dir, shard_size: int = 4):
    """For an in-process loader test parametrized over "folder" / "shards": ``(overrides of
    the data config section, path_of)``; with "shards", the folder is written as shards
    (:func:`write_shards`, in ``out_dir``) and ``data.shards`` names them. ``path_of(key)``:
    the folder file behind a sample's key (``ds.samples``, unreadable lists)."""
    assert source in ("folder", "shards"), source
    if source == "folder":
        return {}, str
    pattern = write_shards(folder, out_dir, shard_size)
    return {"shards": pattern}, shard_key_to_path(folder, pattern).__getitem__
