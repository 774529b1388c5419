"""scripts/bench_step.py: the real step on the CPU with a tiny model prints its table; the
max-batch search finds the boundary."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_step  # noqa: E402
from msn_ds.config import load_config  # noqa: E402
from msn_ds.flops import StepShape  # noqa: E402

TINY = ["data.rand_size=32", "data.focal_size=16", "data.focal_views=2", "meta.hidden_dim=64",
        "meta.output_dim=32", "criterion.num_proto=64"]


def test_bench_step_cpu_table(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "scripts/bench_step.py", "--models", "vit_pico_4",
                        "--batch-sizes", "8", "--deepspeed_config", "ds_configs/zero0_fp32.json",
                        "--steps", "2", "--warmup", "1", "--json", str(out), *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "img/s" in r.stdout and "MFU" in r.stdout and "vit_pico_4" in r.stdout
    (row,) = json.loads(out.read_text())
    cfg = load_config("configs/pretrain/msn_vits16.yaml", TINY + ["meta.model_name=vit_pico_4"],
                      check_paths=False)
    assert row["gflop_per_image"] * 1e9 == pytest.approx(StepShape.from_config(cfg).flops_per_image())
    assert row["step_ms"] > 0 and row["img_per_s"] == pytest.approx(8e3 / row["step_ms"])
    assert row["mfu"] is None and row["device"] == "cpu"  # no known peak for a CPU
    assert row["loss"] == row["loss"]  # finite


def test_bench_step_rejects_bad_config_before_building():
    r = subprocess.run([sys.executable, "scripts/bench_step.py", "--models", "vit_pico_4",
                        "--deepspeed_config", "ds_configs/zero0_fp32.json", "data.rand_sise=32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 2 and "rand_sise" in r.stderr


@pytest.mark.parametrize("largest,start", [(200, 8), (37, 8), (5, 1), (8, 8), (4096, 64)])
def test_find_max_batch_search(monkeypatch, largest, start):
    tried = []

    def fake_fits(cfg_for, ds_path, batch):
        tried.append(batch)
        return batch <= largest
    monkeypatch.setattr(bench_step, "fits", fake_fits)
    found = bench_step.find_max_batch(lambda b: b, "x", start)
    step = 8 if found >= 16 else 1
    assert found <= largest < found + step or found == 4096
    assert len(tried) <= 16
    tried.clear()  # starting above the limit searches below it
    again = bench_step.find_max_batch(lambda b: b, "x", largest + 1)
    assert again <= largest < again + (8 if again >= 16 else 1) or largest >= 4096
