"""Small helpers shared by the evaluation tests."""
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


def run_cli(*args, timeout=180, env=None, check=True):
    """``python ARGS`` in the repository root, one thread; asserts success unless ``check``."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env=cpu_env(**(env or {})))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_folder(root: Path, counts: dict, size: int = 16, seed: int = 0) -> None:
    """An ImageFolder of random RGB PNGs: ``counts`` maps class name to number of images."""
    g = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / cls / f"img{i:03d}.png")
