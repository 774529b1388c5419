"""End-to-end train.py runs on the bundled demo data: one process, two processes
(torchrun, gloo), bf16, and the reference's own ViT-S/16 config."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from msn_ds.config import load_config
from msn_ds.io.weights import load_encoder
from msn_ds.monitor.flops import StepShape
from helpers import run_cli
from test_checkpoint import args

pytestmark = pytest.mark.slow  # launches processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed's own launcher, as users run it (torchrun otherwise)
DEEPSPEED = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus=2",
             "--master_port=29611"]

# vit_pico_4 with the demo's views (2 x 32 px, 4 x 16 px), K=256: msn_ds.monitor.flops formula
FLOPS_PER_IMAGE = StepShape.from_config(load_config(os.path.join(ROOT, "configs/demo_cpu.yaml"),
                                                    check_paths=False)).flops_per_image()


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss(demo_root, tmp_path):
    run = str(tmp_path / "run")
    run_cli("train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
            "ds_configs/zero0_fp32.json", "--max-steps", "30", f"data.root_path={demo_root}",
            f"logging.folder={run}", "logging.log_every=5", "criterion.batch_size=32",
            "data.num_workers=1", "logging.peak_tflops=0.5")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.05, (first, last)
    assert all(r["skipped"] == 0 for r in rows)
    for r in rows:  # performance scalars, MFU against the stated 0.5 TFLOP/s peak
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["peak_mem_gib"] > 0.1
        assert r["bad_images"] == 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
        assert r["tflops_per_device"] == pytest.approx(r["img_per_s"] * FLOPS_PER_IMAGE / 1e12,
                                                       rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(os.path.join(run, "tb"))
    tb.Reload()
    for tag in ("perf/img_per_s", "perf/mfu", "perf/peak_mem_gib", "data/data_wait_frac",
                "data/bad_images", "train/loss"):
        assert [e.step for e in tb.Scalars(tag)] == [5, 10, 15, 20, 25, 30], tag
    assert os.path.isdir(os.path.join(run, "global_step30"))
    enc, meta = load_encoder(os.path.join(run, "demo-target.safetensors"))
    assert meta["step"] == "30" and meta["arch"] == "vit_pico_4"
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 128)


@pytest.mark.parametrize("ds_config,launcher,extra", [
    ("zero1_fp32.json", "torchrun", []),
    ("zero1_bf16.json", "torchrun", []),
    ("zero2_bf16.json", "torchrun", []),
    ("zero3_bf16.json", "torchrun", ["meta.activation_checkpointing=1"]),
    ("zero3_offload_bf16.json", "torchrun", ["meta.activation_checkpointing=2"]),
    ("zero0_fp32.json", "deepspeed", []),
])
def test_two_processes_lower_the_loss(demo_root, tmp_path, ds_config, launcher, extra):
    """Every ZeRO stage and precision that runs on the CPU, 2 processes: training lowers the
    loss (ZeRO-3 with activation checkpointing and token dropping; ZeRO-3 with optimiser and
    parameters offloaded, which uses DeepSpeedCPUAdam)."""
    run = str(tmp_path / "run")
    r = run_cli("train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
                f"ds_configs/{ds_config}", "--max-steps", "6", f"data.root_path={demo_root}",
                f"logging.folder={run}", "logging.log_every=2", "criterion.batch_size=8",
                "data.num_workers=0", *extra, nproc=2,
                launcher=DEEPSPEED if launcher == "deepspeed" else None)
    rows = metrics(run)
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [row["loss"] for row in rows]
    assert "global batch 16 on 2 processes" in r.stdout + r.stderr
    assert os.path.isdir(os.path.join(run, "global_step6"))


def test_reference_vits16_config_trains(demo_root, tmp_path):
    """The reference's msn_vits16.yaml with only paths, folder, workers, epochs, batch size
    overridden: ViT-S/16, 224/96 views, 10 focal views, 1024 prototypes."""
    run = str(tmp_path / "run")
    run_cli("train.py", "--config", "configs/pretrain/msn_vits16.yaml", "--deepspeed_config",
            "ds_configs/zero0_fp32.json", "--max-steps", "2", f"data.root_path={demo_root}",
            "data.image_folder=mnist_demo", f"logging.folder={run}", "data.num_workers=0",
            "optimization.epochs=1", "criterion.batch_size=2", "logging.log_every=1")
    rows = metrics(run)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["np"] >= 1


def test_flat_unlabelled_folder_trains(tmp_path):
    """32 JPEGs directly in train/, no class folder: training runs (label 0 for all)."""
    train = tmp_path / "flat" / "train"
    train.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            train / f"photo{i:02d}.jpg")
    folder = str(tmp_path / "run")
    r = run_cli("train.py", *args(str(tmp_path), folder, 2), "data.image_folder=flat")
    assert "32 images (sub-folders included) as one unlabelled set" in r.stderr
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert all(1.0 <= row["rankme"] <= 8 for row in rows)  # log_every=1; batch 8: rank <= 8
    assert all(0.0 <= row["target_ent"] <= math.log(64) + 1e-6 for row in rows)
    assert os.path.isfile(os.path.join(folder, "demo-target.safetensors"))
