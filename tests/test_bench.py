"""scripts/bench_step.py: the real step on the CPU with a tiny model prints its table; each
trial runs in its own child process, and a child's out-of-memory, failure or hang becomes a row;
the max-batch search finds the boundary."""
import json
import os
import re
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
                        "--accumulation", "1", "2",
                        "--steps", "2", "--warmup", "1", "--json", str(out), *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "img/s" in r.stdout and "MFU" in r.stdout and "vit_pico_4" in r.stdout
    row, accumulated = json.loads(out.read_text())
    assert (row["accumulation"], accumulated["accumulation"]) == (1, 2)
    assert re.search(r"vit_pico_4\s+8 x 2\s", r.stdout)  # micro-batch x A
    assert accumulated["img_per_s"] == pytest.approx(16e3 / accumulated["step_ms"])
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
    assert rows[0] == {"model": "vit_pico_4", "batch_per_device": 4, "accumulation": 1,
                       "error": "out of memory"}
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


@pytest.mark.slow
def test_baseline_plain_prints_the_ratio_column(tmp_path):
    """``--baseline plain``: beside our step, a plain PyTorch step in its own child; the table
    has the step column and ours/plain on our row, equal to the two rows' images/s ratio. In
    fp32 on the CPU the plain step computes our step's function: after one update each, the
    losses agree (same weights, views, mask, schedules, clipping and AdamW)."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "scripts/bench_step.py", "--models", "vit_pico_4",
                        "--batch-sizes", "4", "--deepspeed_config", "ds_configs/zero0_fp32.json",
                        "--steps", "1", "--warmup", "1", "--baseline", "plain", "--json",
                        str(out), *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=CPU_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    header = next(line for line in r.stdout.splitlines() if line.startswith("model"))
    assert header.split()[-1] == "ours/plain" and " step " in header
    ours, plain = json.loads(out.read_text())
    assert (ours["step"], plain["step"]) == ("ours", "plain")
    assert plain["pid"] != ours["pid"] and plain["step_ms"] > 0 and plain["loss"] == plain["loss"]
    assert ours["ours_over_plain"] == pytest.approx(ours["img_per_s"] / plain["img_per_s"])
    assert ours["gflop_per_image"] == pytest.approx(plain["gflop_per_image"])
    assert plain["loss"] == pytest.approx(ours["loss"], rel=1e-4)
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("vit_pico_4")]
    assert [row[2] for row in rows] == ["ours", "plain"]
    assert rows[0][-1] == f"{ours['ours_over_plain']:.2f}x" and rows[1][-1] == "-"


def test_plain_step_in_process():
    """The plain step needs no DeepSpeed and no process group: it runs in this process, in
    fp32 from an fp32 config, and refuses fp16 (no loss scaler)."""
    cfg = load_config("configs/pretrain/msn_vits16.yaml", TINY + ["meta.model_name=vit_pico_4",
                                                                  "criterion.batch_size=4"],
                      check_paths=False)
    row = bench_step.run_plain(cfg, os.path.join(ROOT, "ds_configs/zero0_fp32.json"), 1, 0)
    assert row["step"] == "plain" and row["device"] == "cpu" and row["bf16"] is False
    assert row["loss"] == row["loss"] and row["step_ms"] > 0
    with pytest.raises(ValueError, match="fp16"):
        bench_step.run_plain(cfg, os.path.join(ROOT, "ds_configs/zero2_fp16.json"), 1, 0)


def test_ratio_column_only_with_a_baseline():
    row = {"model": "m", "batch_per_device": 8, "step_ms": 1.0, "img_per_s": 8e3,
           "peak_gib": 0.1, "gflop_per_image": 1.0, "tflops_per_device": 8.0, "mfu": None}
    assert "ours/plain" not in bench_step.format_results([row])
    plain = {**row, "step": "plain", "img_per_s": 4e3}
    ours = {**row, "step": "ours", "ours_over_plain": bench_step.ratio(row, plain)}
    table = bench_step.format_results([ours, plain, {"model": "m", "batch_per_device": 16,
                                                     "step": "plain", "error": "out of memory"}])
    lines = table.splitlines()
    assert lines[0].split()[-1] == "ours/plain" and lines[2].endswith("2.00x")
    assert lines[3].endswith("-") and "out of memory" in lines[4]
    assert bench_step.ratio(ours, {"error": "out of memory"}) is None


@pytest.mark.slow
@pytest.mark.parametrize("fetched", [True, False])
def test_device_check_core_dry_run_fits(tmp_path, fetched):
    """``device_check.sh --core --dry-run`` lists its stages and their budgets, which sum to 6
    minutes or less, and the files the call carries with their sizes, 20 MiB or less in all
    (as fetched, or as fetch_device_wheels.sh would fetch them); it runs nothing."""
    wheels = tmp_path / "wheels"
    if fetched:  # stand-ins of the fetched set, with the sizes fetch_device_wheels.sh expects
        listed = subprocess.run(["bash", "scripts/fetch_device_wheels.sh", "--list"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        (wheels / "base").mkdir(parents=True)
        for name, size in zip(listed[::2], listed[1::2]):
            with open(wheels / "base" / name, "wb") as f:
                f.truncate(int(size))
    env = {**os.environ, "DEVICE_WHEELS": str(wheels), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "scripts/device_check.sh", "--core", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lines = r.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.split()[:1] == ["stage"])) + 1:]
    stages = {}
    for line in table:
        m = re.match(r"  (\S.*?)\s{2,}(\d+)(\s|$)", line)
        if not m:
            break
        stages[m.group(1)] = int(m.group(2))
    total = stages.pop("total")
    assert {"install", "versions", "gpu tests", "step S/16,B/16 b256", "step L/7 b32",
            "train 20 steps"} <= set(stages)
    assert sum(stages.values()) == total <= 360
    sizes = [int(x.split()[0]) for x in lines if x.strip().endswith(".whl")]
    assert any("deepspeed-0.19.8" in x for x in lines) and not any("dali" in x.lower()
                                                                   for x in lines if ".whl" in x)
    assert not any("optree" in x for x in lines)
    carried = next(x for x in lines if "carried files:" in x)
    assert int(carried.split("carried files:")[1].split()[0]) == sum(sizes) <= 20 * 2**20
    assert ("not fetched yet" in r.stdout) != fetched
    assert "timeout_s 420" in r.stdout and not (tmp_path / "out").exists()


STUB_PYTHON = r"""#!/bin/bash
# the device's python3, stubbed: pip installs, the versions print, pytest hangs, bench_step
# writes its rows, train.py its metrics; anything else (the summary's scripts) is real Python
case "$*" in
  *"-m pip install"*) prev=; for a in "$@"; do [[ $prev == --target ]] && mkdir -p "$a"; prev=$a; done ;;
  *"-m pytest"*) sleep 60 ;;
  *bench_step.py*) prev=; for a in "$@"; do [[ $prev == --json ]] && j=$a; prev=$a; done
    echo '[{"model": "m", "batch_per_device": 8, "step": "ours", "img_per_s": 30.0, "mfu": null,
      "peak_gib": 1.0, "ours_over_plain": 1.5}, {"model": "m", "batch_per_device": 8,
      "step": "plain", "img_per_s": 20.0, "mfu": null, "peak_gib": 1.0}]' > "$j" ;;
  *train.py*) for a in "$@"; do [[ $a == logging.folder=* ]] && d=${a#*=}; done; mkdir -p "$d"
    echo '{"step": 20, "loss": 5.5, "img_per_s": 900.0, "data_wait_frac": 0.1, "skipped": 0.0}' \
      > "$d/metrics.jsonl" ;;
  -c*) if [[ $2 == *deepspeed* ]]; then printf 'python 3.12\ndeepspeed 0.19.8\n'; fi ;;
  *) exec PYTHON "$@" ;;
esac
"""


@pytest.mark.slow
def test_device_check_reports_a_stage_that_runs_out(tmp_path):
    """``device_check.sh --core`` on stubs (python3, nvidia-smi), every stage's limit capped
    at 3 s: the GPU tests hang and are reported TIMEOUT, the stages after them still run,
    and $OUT/summary.md holds the stage table and the ours/plain table; exit code 1."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text(STUB_PYTHON.replace("PYTHON", sys.executable))
    (stubs / "nvidia-smi").write_text("#!/bin/bash\necho 'NVIDIA H200, 143771 MiB'\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    wheels = tmp_path / "wheels" / "base"
    wheels.mkdir(parents=True)
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"stand-in")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out),
           "DEVICE_WHEELS": str(tmp_path / "wheels"), "DEVICE_SITE": str(tmp_path / "site"),
           "DEVICE_CHECK_CAP": "3"}
    r = subprocess.run(["bash", "scripts/device_check.sh", "--core"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 1
    summary = (out / "summary.md").read_text()
    status = {cells[1].strip(): cells[2].strip() for cells in
              (line.split("|") for line in summary.splitlines()) if len(cells) > 5}
    assert status["gpu tests"] == "TIMEOUT", summary
    assert all(status[s] == "PASS" for s in ("install", "versions", "step S/16,B/16 b256",
                                             "step L/7 b32", "train 20 steps")), summary
    assert "| m | 8 | 30 | 20 | 1.50 |" in summary and "900 img/s" in summary
    assert len(list(out.iterdir())) <= 8  # at most 8 files come back from a call
