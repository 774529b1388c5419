"""scripts/bench_step.py: the real step on the CPU with a tiny model prints its table; each
trial runs in its own child process, and a child's out-of-memory, failure or hang becomes a row;
the max-batch search finds the boundary."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import load_script
from msn_ds.config import load_config
from msn_ds.monitor.flops import StepShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bench_step = load_script("scripts/bench_step.py")
CPU_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
TINY = ["data.rand_size=32", "data.focal_size=16", "data.focal_views=2", "meta.hidden_dim=64",
        "meta.output_dim=32", "criterion.num_proto=64"]


@pytest.mark.slow
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


@pytest.mark.slow
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


def run_bench(tmp_path, batch_sizes, env=CPU_ENV):
    """The benchmark as a user runs it; returns (exit code, stdout, stderr, rows, parent pid)."""
    out = tmp_path / "rows.json"
    proc = subprocess.Popen([sys.executable, "scripts/bench_step.py", "--models", "vit_pico_4",
                             "--batch-sizes", *map(str, batch_sizes), "--deepspeed_config",
                             "ds_configs/zero0_fp32.json", "--steps", "1", "--warmup", "1",
                             "--json", str(out), *TINY],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    stdout, stderr = proc.communicate(timeout=600)
    rows = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, stdout, stderr, rows, proc.pid


@pytest.mark.slow
def test_each_trial_runs_in_its_own_child(tmp_path):
    rc, stdout, stderr, rows, parent = run_bench(tmp_path, [4, 8])
    assert rc == 0, stderr[-3000:]
    assert [r["batch_per_device"] for r in rows] == [4, 8]
    assert all(r["step_ms"] > 0 for r in rows)
    pids = {r["pid"] for r in rows}
    assert len(pids) == 2 and parent not in pids


@pytest.mark.slow
def test_oom_in_a_child_is_a_row_and_the_next_trial_runs(tmp_path):
    env = {**CPU_ENV, bench_step.FAKE_OOM_ENV: "4"}
    rc, stdout, stderr, rows, _ = run_bench(tmp_path, [4, 8], env)
    assert rc == 0, stderr[-3000:]  # out-of-memory is a result, not a failure
    assert rows[0] == {"model": "vit_pico_4", "batch_per_device": 4, "error": "out of memory"}
    assert rows[1]["batch_per_device"] == 8 and rows[1]["step_ms"] > 0
    assert "out of memory" in stdout and "CUBLAS_STATUS_ALLOC_FAILED" in stderr


def trial_spec(**kw):
    return {"model": "vit_pico_4", "batch": 4, "config": "configs/pretrain/msn_vits16.yaml",
            "overrides": TINY, "ds_path": "ds_configs/zero0_fp32.json", "steps": 1,
            "warmup": 1, **kw}


@pytest.mark.slow
def test_failed_or_hung_child_is_an_error_row(monkeypatch):
    for k, v in CPU_ENV.items():
        monkeypatch.setenv(k, v)
    status, row = bench_step.run_trial(trial_spec(model="vit_nope"))  # only the child checks
    assert status == "error" and "ConfigError" in row["error"] and "vit_nope" in row["error"]
    status, row = bench_step.run_trial(trial_spec(timeout=1))  # still importing after 1 s
    assert (status, row["error"]) == ("error", "failed: timed out after 1 s")


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDA driver error: cudaErrorMemoryAllocation",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO "
    "for details), NCCL version 2.21.5\nncclUnhandledCudaError: Call to CUDA function failed."
    "\nLast error:\nCuda failure 2 'out of memory'",
])
def test_is_oom(message):
    assert bench_step.is_oom(RuntimeError(message))
    try:  # a wrapper raised from (or while handling) the allocation failure is one too
        try:
            raise RuntimeError(message)
        except RuntimeError as e:
            raise RuntimeError("step failed") from e
    except RuntimeError as wrapped:
        assert bench_step.is_oom(wrapped)


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("NCCL error: unhandled system error, NCCL version 2.21.5"),
    RuntimeError("Connection closed by peer [127.0.0.1]:29500"),
    ValueError("shape mismatch"), MemoryError()])
def test_is_not_oom(exc):
    assert not bench_step.is_oom(exc)


def test_is_oom_by_type():
    assert bench_step.is_oom(torch.OutOfMemoryError())


def test_parent_exit_code_and_fits(monkeypatch, tmp_path, capsys):
    """Out-of-memory is an answer (exit 0, fits() False); any other failure is an error row,
    exit 1, and stops that model's max-batch search."""
    outcome = {4: "ok", 8: "oom", 16: "error"}

    def fake_run_trial(spec):
        b = spec["batch"]
        row = {"model": spec["model"], "batch_per_device": b}
        if outcome[b] == "ok":
            return "ok", {**row, "step_ms": 1.0, "img_per_s": 4e3, "peak_gib": 0.1,
                          "gflop_per_image": 1.0, "tflops_per_device": 4.0, "mfu": None}
        return outcome[b], {**row, "error": "out of memory" if outcome[b] == "oom" else "failed: x"}
    monkeypatch.setattr(bench_step, "run_trial", fake_run_trial)
    spec_for = lambda b: trial_spec(batch=b)  # noqa: E731
    assert bench_step.fits(spec_for, "x", 4) and not bench_step.fits(spec_for, "x", 8)
    with pytest.raises(bench_step.TrialFailed, match="batch 16: failed: x"):
        bench_step.fits(spec_for, "x", 16)
    base = ["--models", "vit_pico_4", "--deepspeed_config", "ds_configs/zero0_fp32.json",
            "--json", str(tmp_path / "rows.json"), *TINY]
    monkeypatch.chdir(ROOT)
    assert bench_step.main([*base, "--batch-sizes", "4", "8"]) == 0
    assert bench_step.main([*base, "--batch-sizes", "4", "16"]) == 1
    assert json.loads((tmp_path / "rows.json").read_text())[1]["error"] == "failed: x"
    outcome[8] = "error"  # a probe that crashes ends the search with an error row
    assert bench_step.main([*base, "--batch-sizes", "4", "--find-max-batch"]) == 1
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[-1]["error"] == "max-batch search batch 8: failed: x"
    assert "largest batch" not in capsys.readouterr().out
