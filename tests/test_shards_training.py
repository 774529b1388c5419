"""Training on WebDataset tar shards is training on the folder they were written from.

Standard WebDataset tars (``key.jpg`` + ``key.cls``, written with Python's ``tarfile`` in
the folder's sorted order, ``helpers.write_shards``) train to the folder's weights: 3 steps,
ZeRO-0, fp32, through the torch loader and through DALI on the CPU, whole-vector relative L2
within 1e-6 (measured: 0, the batches being bit-identical). A JPEG truncated inside a shard
is skipped and counted in ``metrics.jsonl``'s ``bad_images`` as the same file in the folder,
and named ``shard.tar:key``.

The folder and shards runs of a pair are independent one-thread processes: they run at the
same time (the suite runs one test at a time on 2 cores).
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import run_cli, shard_key_to_path, source_args, write_shards

pytestmark = pytest.mark.slow  # launches processes

BATCH, STEPS = 4, 3  # 12 images: the 3 steps are one epoch, every image drawn once
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images in 3 classes (JPEGs of several sizes, two PNGs), one JPEG truncated inside
    its entropy-coded data; and 3 shards of 4 written from them. Returns ``(root_path,
    pattern, truncated file)``."""
    base = tmp_path_factory.mktemp("data")
    train = base / "ds" / "train"
    rng = np.random.default_rng(0)
    for i in range(12):
        d = train / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
        coarse.resize((30 + 2 * i, 44 - i), Image.BICUBIC).save(
            d / f"img{i:02d}.{'png' if i % 5 == 4 else 'jpg'}", quality=90)
    bad = train / "c1" / "img07.jpg"
    jpeg = bad.read_bytes()
    scan = jpeg.index(b"\xff\xda")  # start of scan: cut between it and the end
    bad.write_bytes(jpeg[:(scan + len(jpeg)) // 2])
    pattern = write_shards(train, base / "shards", shard_size=4)
    return str(base), pattern, str(bad)


def train_args(base, run, loader, *extra):
    return ["train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
            "ds_configs/zero0_fp32.json", "--max-steps", str(STEPS), f"data.root_path={base}",
            "data.image_folder=ds", f"logging.folder={run}", f"criterion.batch_size={BATCH}",
            "criterion.num_proto=16", "data.num_workers=0", f"data.loader={loader}",
            "data.max_bad_fraction=0.15", "logging.log_every=1", "logging.tensorboard=false",
            "optimization.warmup=0", *extra]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def flat(run, prefix=""):
    """The saved weights (``prefix``: those whose name starts with it) as one float64
    vector, BatchNorm running statistics left out."""
    w = load_file(os.path.join(run, "demo-target.safetensors"))
    keys = sorted(k for k in w if k.startswith(prefix) and w[k].is_floating_point()
                  and "running" not in k)
    assert keys, (prefix, sorted(w))
    return torch.cat([w[k].flatten().double() for k in keys])


def relative(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_shards_train_to_the_folders_weights(data, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    base, pattern, bad = data
    runs = {s: str(tmp_path / s) for s in ("folder", "shards")}
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(runs, pool.map(
            lambda s: run_cli(*train_args(base, runs[s], loader, *source_args(s, pattern))),
            runs)))
    assert "data: 12 samples in 3 shards" in procs["shards"].stderr
    # the weights: the target encoder, and everything the run saved
    for prefix in ("target_encoder.", ""):
        a, b = flat(runs["folder"], prefix), flat(runs["shards"], prefix)
        rel = relative(a, b)
        print(f"{loader}: relative L2 of {prefix or 'all saved weights'}: {rel:.3g}")
        assert rel < TOLERANCE, (prefix, rel)
    # the losses, step by step; the truncated JPEG skipped and counted alike
    rows = {s: metrics(run) for s, run in runs.items()}
    assert [r["step"] for r in rows["shards"]] == [r["step"] for r in rows["folder"]] == [1, 2, 3]
    for x, y in zip(rows["folder"], rows["shards"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=TOLERANCE, abs=0), (x, y)
        assert y["bad_images"] == x["bad_images"], (x, y)
    assert rows["shards"][-1]["bad_images"] == 1  # one epoch: every image drawn once
    key = {p: k for k, p in shard_key_to_path(os.path.join(base, "ds", "train"),
                                              pattern).items()}[bad]
    assert key.endswith("train-000001.tar:000000006")
    assert f"skipping unreadable image {key}" in procs["shards"].stderr
    assert f"skipping unreadable image {bad}" in procs["folder"].stderr
