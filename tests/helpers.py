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
