"""Time the real MSN training step on synthetic views already on the device.

The step is train.py's: the DeepSpeed engine over the project's encoder and prototypes, the
target encoder and its EMA, the loss, the optimiser and clipping (MSNTrainer.step). Views
are random tensors made once on the device, so the loader is out of the measurement (see
scripts/bench_data.py for it). After ``--warmup`` steps, ``--steps`` steps are timed with
CUDA events (wall clock on the CPU). MFU = achieved model FLOPs / the card's bf16 peak, with
the FLOPs per image of msn_ds/monitor/flops.py over the step's actual token counts.

    python scripts/bench_step.py --models vit_small_16 vit_base_16 --batch-sizes 64 256 \\
        --deepspeed_config ds_configs/zero1_bf16.json
    python scripts/bench_step.py --models vit_large_7 --batch-sizes 32 --find-max-batch \\
        --nproc 8 --deepspeed_config ds_configs/zero3_bf16.json meta.activation_checkpointing=1
    # with a yardstick: each trial also times a plain PyTorch MSN step (no DeepSpeed)
    python scripts/bench_step.py --models vit_small_16 --batch-sizes 256 --baseline plain \\
        --deepspeed_config ds_configs/zero1_bf16.json
    # CPU smoke run (CI): tiny model, small views
    DS_ACCELERATOR=cpu python scripts/bench_step.py --models vit_pico_4 --batch-sizes 8 \\
        --deepspeed_config ds_configs/zero0_fp32.json data.rand_size=32 data.focal_size=16 \\
        data.focal_views=2

``--baseline plain`` times, beside each (model, batch), a plain PyTorch MSN step of our own
in its own child (:func:`run_plain`): the same encoder and prototypes from msn_ds's builder
(timm's ViT, SDPA attention), the same views, token drop and loss, bf16 autocast when the
DeepSpeed config enables bf16 (fp32 otherwise), ``torch.optim.AdamW`` (fused) with the same
parameter groups and schedules, clipping by ``optimization.clip_grad``, and a foreach EMA
(``torch._foreach_lerp_``) of the fp32 weights into the target; no DeepSpeed, one process.
The table then has a ``step`` column (ours / plain) and **ours/plain**, our images/s over
the plain step's: above 1, our step is faster.

Extra ``section.key=value`` arguments override --config (default: the reference ViT-S/16
recipe, 224 px target and anchor views, 10 focal 96 px views, patch drop 0.15).

Every (model, batch) trial and every ``--find-max-batch`` probe runs in a fresh child process,
because a torn-down engine does not give all its memory back (ZeRO-3 engines outlive
``destroy()`` and ``gc``), so a later trial in the same process would see less of the GPU.
Run this script as one plain process: it checks every config, then starts per trial either
``python scripts/bench_step.py --trial SPEC`` or, with ``--nproc N``,
``python -m torch.distributed.run --standalone --nproc_per_node N scripts/bench_step.py
--trial SPEC`` (one node). The child builds and times the step and writes its row as JSON;
the parent prints the table. Child logs go to the parent's stderr, the table to its stdout.
A trial that runs out of device memory becomes an "out of memory" row (a child process that
hits it exits with code 3); one that fails otherwise, or outlives ``--trial-timeout``, becomes
an error row, the benchmark goes on, and the parent exits 1 at the end (2: a bad config,
before any child starts).
"""
from __future__ import annotations

import argparse
import collections
import gc
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

from msn_ds import distributed as D
from msn_ds.config import ConfigError, load_config
from msn_ds.deepspeed_config import read_ds_config, resolve_ds_config, zero_stage
from msn_ds.engine import build_models, configure_precision, param_groups
from msn_ds.masking import mask_generator
from msn_ds.io.atomic import atomic_write
from msn_ds.monitor.flops import StepShape, mfu, peak_flops
from msn_ds.monitor.progress import peak_memory_gib
from msn_ds.monitor.table import Column, format_row, format_table
from msn_ds.trainer import build, build_criterion, build_schedules, step_options

OOM_EXIT = 3  # a trial child's exit code when it ran out of device memory
OOM_ERROR = "out of memory"
# Test seam: a child whose batch per device equals this variable raises FAKE_OOM_MESSAGE.
FAKE_OOM_ENV = "MSN_BENCH_FAKE_OOM_BATCH"
FAKE_OOM_MESSAGE = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"
# How CUDA, cuBLAS, cuDNN and NCCL word a failed allocation (lower case; matched in the text).
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
               "cudnn_status_not_enough_workspace", "cudaerrormemoryallocation")
# Launcher variables a child must not inherit from an enclosing launcher or job.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from or while handling) is a failed device
    allocation. Only part of them are ``torch.OutOfMemoryError``: cuBLAS/cuDNN handle and
    workspace allocations, NCCL buffers and raw CUDA errors arrive as plain RuntimeErrors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def synthetic_views(cfg: dict, batch: int, device: torch.device) -> list[torch.Tensor]:
    d = cfg["data"]
    g = torch.Generator(device=device).manual_seed(0)
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    return [torch.randn(batch, 3, s, s, generator=g, device=device) for s in sizes]


class Timer:
    """CUDA events on the GPU (no host sync inside the timed region), wall clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def run_one(cfg: dict, ds_path: str, steps: int, warmup: int) -> dict:
    """Build the step for ``cfg``, time it, tear it down. Raises on out-of-memory."""
    ds_config = resolve_ds_config(read_ds_config(ds_path), cfg, D.world_size(), ds_path)
    built = build(cfg, ds_config, steps_per_epoch=1000)
    trainer = built.trainer
    device = built.engine.device if isinstance(built.engine.device, torch.device) \
        else torch.device(built.engine.device)
    configure_precision(device)  # TF32 for fp32 runs on CUDA, as train.py
    micro, accum = cfg["criterion"]["batch_size"], ds_config["gradient_accumulation_steps"]
    batch = micro * accum  # one step's images per process: A micro-batches (gradient cache)
    views = synthetic_views(cfg, batch, device)
    try:
        if os.environ.get(FAKE_OOM_ENV) == str(micro):
            raise RuntimeError(FAKE_OOM_MESSAGE)
        for i in range(warmup):
            trainer.step(views, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with Timer(device) as t:
            for i in range(warmup, warmup + steps):
                out = trainer.step(views, i)
        loss = float(out.loss)
        step_s = t.seconds / steps
        shape = StepShape.from_config(cfg)
        per_image = shape.flops_per_image()
        ips = batch / step_s  # per device
        return {"model": cfg["meta"]["model_name"], "batch_per_device": micro,
                "accumulation": accum, "world_size": D.world_size(), "step_ms": 1e3 * step_s,
                "img_per_s": ips * D.world_size(), "img_per_s_per_device": ips,
                "peak_gib": peak_memory_gib(device), "gflop_per_image": per_image / 1e9,
                "tflops_per_device": ips * per_image / 1e12,
                "mfu": mfu(ips, per_image, peak_flops(device)), "loss": loss,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "zero_stage": zero_stage(ds_config),
                "bf16": bool(ds_config.get("bf16", {}).get("enabled")),
                "activation_checkpointing": cfg["meta"]["activation_checkpointing"]}
    finally:
        del trainer, built, views
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def plain_device() -> torch.device:
    """Where our step would run, found without DeepSpeed: the CPU under
    ``DS_ACCELERATOR=cpu`` or without CUDA, else GPU 0 (the plain step is one process)."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def run_plain(cfg: dict, ds_path: str, steps: int, warmup: int) -> dict:
    """The yardstick: a plain PyTorch MSN step of our own, timed like :func:`run_one`.

    The same models (msn_ds's builder: timm's ViT with SDPA attention, our head and
    prototypes, the fp32 target), views, token drop, loss and schedules as our step; bf16
    autocast when the DeepSpeed config enables bf16, else fp32; fused ``torch.optim.AdamW``
    over the method's parameter groups, ``clip_grad_norm_`` (foreach) by
    ``optimization.clip_grad``, and a foreach EMA of the fp32 weights into the fp32 target.
    No DeepSpeed, no process group, no non-finite gate. Raises on out-of-memory."""
    ds = read_ds_config(ds_path)
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("--baseline plain: fp16 configs are not supported (bf16 or fp32)")
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    device = plain_device()
    configure_precision(device)
    model, target = build_models(cfg)
    model.to(device)
    target.to(device)
    opt = torch.optim.AdamW(param_groups(model), lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=True)
    criterion, schedules = build_criterion(cfg), build_schedules(cfg, steps_per_epoch=1000)
    options, clip = step_options(cfg), float(cfg["optimization"]["clip_grad"])
    trained = [p for p in model.parameters() if p.requires_grad]
    ema_t, ema_o = list(target.parameters()), list(model.encoder.parameters())
    batch = cfg["criterion"]["batch_size"]
    views = synthetic_views(cfg, batch, device)

    def step(i: int) -> torch.Tensor:
        sched = schedules.at(i)
        for group in opt.param_groups:
            group["lr"] = sched["lr"]
            if not group.get("wd_exclude", False):
                group["weight_decay"] = sched["wd"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                target_z = target(views[0])
            anchor_z, prototypes = model(views[1:], masked_views=options["masked_views"],
                                         mask_ratio=options["mask_ratio"],
                                         per_sample_mask=options["per_sample_mask"],
                                         generator=mask_generator(options["seed"], i))
        loss, _ = criterion(anchor_z, target_z, prototypes, sched["T"])  # fp32, as ours
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_t, ema_o, 1.0 - sched["momentum"])
        return loss.detach()

    try:
        if os.environ.get(FAKE_OOM_ENV) == str(batch):
            raise RuntimeError(FAKE_OOM_MESSAGE)
        for i in range(warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with Timer(device) as t:
            for i in range(warmup, warmup + steps):
                loss = step(i)
        step_s = t.seconds / steps
        per_image = StepShape.from_config(cfg).flops_per_image()
        ips = batch / step_s
        return {"model": cfg["meta"]["model_name"], "batch_per_device": batch, "step": "plain",
                "world_size": 1, "step_ms": 1e3 * step_s, "img_per_s": ips,
                "img_per_s_per_device": ips, "peak_gib": peak_memory_gib(device),
                "gflop_per_image": per_image / 1e9, "tflops_per_device": ips * per_image / 1e12,
                "mfu": mfu(ips, per_image, peak_flops(device)), "loss": float(loss),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "bf16": bf16, "activation_checkpointing": cfg["meta"]["activation_checkpointing"]}
    finally:
        del model, target, opt, views
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def trial_config(spec: dict) -> dict:
    """The trial's config: ``batch`` per process, and ``accum`` micro-batches of it per step
    (stated as the global batch, which also overrides a paper config's 1024)."""
    accum, nproc = int(spec.get("accum", 1)), int(spec.get("nproc", 1))
    if spec.get("baseline"):  # the plain step is one process, one pass over the whole batch
        overrides = [f"criterion.batch_size={spec['batch'] * accum}",
                     f"criterion.global_batch_size={spec['batch'] * accum}"]
    else:
        overrides = [f"criterion.batch_size={spec['batch']}",
                     f"criterion.global_batch_size={spec['batch'] * nproc * accum}"]
    return load_config(spec["config"], [*spec["overrides"], f"meta.model_name={spec['model']}",
                                        *overrides], check_paths=False)


def _write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f)
    atomic_write(path, write)  # the parent never reads half a report


def trial_main(spec: dict) -> int:
    """Child side of one trial: run the step, then write a report to ``<out>.rank<R>.json``
    (rank 0: the row, with its pid; any rank that fails: its error). A failing child leaves by ``os._exit``:
    its peers may be stuck in a collective, and tearing down their process group would hang."""
    D.setup_env()
    report = f"{spec['out']}.rank{os.environ['RANK']}.json"
    plain = spec.get("baseline") == "plain"
    try:
        if plain:  # one process, no process group: nothing of DeepSpeed
            row = run_plain(trial_config(spec), spec["ds_path"], spec["steps"], spec["warmup"])
        else:
            D.init_process_group()
            row = run_one(trial_config(spec), spec["ds_path"], spec["steps"], spec["warmup"])
        row["pid"] = os.getpid()
    except Exception as e:  # noqa: BLE001  every failure must reach the parent as a report
        oom = is_oom(e)
        traceback.print_exc()
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        _write_json(report, {"error": OOM_ERROR if oom else line})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(OOM_EXIT if oom else 1)
    if D.is_main():
        _write_json(report, row)
    if not plain:
        D.cleanup()
    return 0


class TrialFailed(RuntimeError):
    """A trial child failed for a reason other than out-of-memory."""


def _child_env(nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONUNBUFFERED"] = "1"  # its log lines reach us in order, as they happen
    if nproc == 1:  # setup_env then makes a world of one on a free port; RANK keeps it from
        env["RANK"] = env["LOCAL_RANK"] = "0"  # taking an enclosing SLURM job's task count
    return env


def _tee(stream, dest, keep: collections.deque) -> None:
    for line in stream:
        keep.append(line)
        try:
            dest.write(line)
            dest.flush()
        except (OSError, ValueError):
            pass


def _stop_group(proc: subprocess.Popen) -> None:
    """End the child and everything it started (torchrun's workers): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _launch(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own session, copying its output to our stderr; return its exit
    code (None if it ran past ``timeout`` and was stopped) and its last stderr lines."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    err_tail: collections.deque = collections.deque(maxlen=50)
    readers = [threading.Thread(target=_tee, args=(stream, sys.stderr, keep), daemon=True)
               for stream, keep in ((proc.stdout, collections.deque(maxlen=1)),
                                    (proc.stderr, err_tail))]
    for t in readers:
        t.start()
    rc = None
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:  # timed out, or we are being interrupted
            _stop_group(proc)
    for t in readers:
        t.join(10)
    return rc, list(err_tail)


def run_trial(spec: dict) -> tuple[str, dict]:
    """One trial in a fresh child: ("ok", row), ("oom", row) or ("error", row), the last two
    rows carrying an ``error``. ``spec`` is the child's (model, batch, config, overrides,
    ds_path, steps, warmup) plus the launch keys ``nproc`` and ``timeout``."""
    nproc, timeout = int(spec.get("nproc", 1)), float(spec.get("timeout", 900))
    head = {"model": spec["model"], "batch_per_device": spec["batch"],
            "accumulation": int(spec.get("accum", 1))}
    if spec.get("baseline"):
        head["step"] = spec["baseline"]
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        out = os.path.join(tmp, "trial")
        arg = json.dumps({**spec, "out": out})
        cmd = [sys.executable, script, "--trial", arg] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={nproc}", script, "--trial", arg]
        rc, err_tail = _launch(cmd, _child_env(nproc), timeout)
        reports = {}
        for path in glob.glob(out + ".rank*.json"):
            with open(path) as f:
                reports[int(path.rsplit(".rank", 1)[1][:-len(".json")])] = json.load(f)
    errors = [reports[r]["error"] for r in sorted(reports) if "error" in reports[r]]
    if rc == OOM_EXIT or OOM_ERROR in errors:  # a peer of the OOM rank may fail differently
        return "oom", {**head, "error": OOM_ERROR}
    if rc == 0 and "step_ms" in reports.get(0, {}):
        return "ok", reports[0]
    if rc is None:
        why = f"timed out after {timeout:g} s"
    elif errors:
        why = errors[0]
    else:
        lines = [ln.strip() for ln in err_tail if ln.strip().strip("=")]
        why = lines[-1] if lines else f"exit code {rc}"
    return "error", {**head, "error": f"failed: {why}"}


def fits(spec_for, ds_path: str, batch: int) -> bool:
    """Whether one warm-up and one timed step at ``batch`` run, in a fresh child. A failure
    other than out-of-memory says nothing about memory, so it raises TrialFailed."""
    status, row = run_trial({**spec_for(batch), "ds_path": ds_path, "steps": 1, "warmup": 1})
    if status == "error":
        raise TrialFailed(f"batch {batch}: {row['error']}")
    return status == "ok"


def find_max_batch(spec_for, ds_path: str, start: int, limit: int = 4096) -> int:
    """Largest batch per device that runs a step: doubling from ``start`` until one does not
    fit, then bisection to a multiple of 8 (any batch below 16); 0 if not even a batch of 1 fits.
    ``spec_for(batch)`` gives the trial spec that ``fits`` runs."""
    lo, hi = 0, None
    b = start
    while b <= limit:
        if fits(spec_for, ds_path, b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo
    grid = [c for c in list(range(1, 16)) + list(range(16, hi, 8)) if lo < c < hi]
    first, last = 0, len(grid)  # bisection over the grid: fitting is monotone in the batch
    while first < last:
        mid = (first + last) // 2
        if fits(spec_for, ds_path, grid[mid]):
            lo, first = grid[mid], mid + 1
        else:
            last = mid
    return lo


COLUMNS = (Column("model", 14, align="<"), Column("batch/dev", 10), Column("step ms", 10, ".1f"),
           Column("img/s", 10, ".1f"), Column("peak GiB", 10, ".2f"),
           Column("GFLOP/img", 11, ".2f"), Column("TFLOP/s", 9, ".2f"), Column("MFU", 7))


BASELINE_COLUMNS = (*COLUMNS[:2], Column("step", 7, align="^"), *COLUMNS[2:],
                    Column("ours/plain", 11))


def ratio(ours: dict, plain: dict) -> float | None:
    """Our images/s over the plain step's (None when either has no timing)."""
    if "img_per_s" in ours and "img_per_s" in plain and plain["img_per_s"] > 0:
        return ours["img_per_s"] / plain["img_per_s"]
    return None


def format_results(rows: list[dict]) -> str:
    """The table; with a baseline (rows carrying ``step``), a ``step`` column and, on our
    rows, ``ours/plain``."""
    baseline = any("step" in r for r in rows)
    columns = BASELINE_COLUMNS if baseline else COLUMNS

    def line(r):
        a = r.get("accumulation", 1)
        batch = f"{r['batch_per_device']} x {a}" if a > 1 else r["batch_per_device"]
        key = (r["model"], batch) + ((r.get("step", "ours"),) if baseline else ())
        if "error" in r:
            return f"{format_row(columns, key)}  {r['error']}"
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        values = (*key, r["step_ms"], r["img_per_s"], r["peak_gib"], r["gflop_per_image"],
                  r["tflops_per_device"], m)
        if baseline:
            x = r.get("ours_over_plain")
            values += (f"{x:.2f}x" if x is not None else "-",)
        return values
    return format_table(columns, [line(r) for r in rows], rule=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_small_16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64], help="per device")
    p.add_argument("--accumulation", nargs="+", type=int, default=[1], metavar="A",
                   help="micro-batches per step (exact gradient accumulation): each batch size\n"
                        "is timed at each A; the batch column shows micro-batch x A")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default="ds_configs/zero1_bf16.json")
    p.add_argument("--config", default="configs/pretrain/msn_vits16.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--find-max-batch", action="store_true",
                   help="also search the largest batch per device that fits, per model")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) per trial, on this node, via torch.distributed.run")
    p.add_argument("--trial-timeout", type=float, default=900.0,
                   help="seconds before a trial's processes are stopped and it counts as failed")
    p.add_argument("--baseline", choices=["plain"], default=None,
                   help="also time a plain PyTorch MSN step (no DeepSpeed) per (model, batch) "
                        "and print ours/plain")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--trial", default=None, help=argparse.SUPPRESS)  # child: a JSON trial spec
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trial is not None:
        return trial_main(json.loads(args.trial))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: run bench_step.py as one process; --nproc N starts N per trial",
              file=sys.stderr)
        return 2
    if args.nproc < 1:
        print(f"error: --nproc {args.nproc}: need at least 1", file=sys.stderr)
        return 2
    if args.baseline and args.nproc != 1:
        print("error: --baseline plain runs one process; use --nproc 1", file=sys.stderr)
        return 2

    def spec_for(model: str):
        def make(batch: int, accum: int = 1) -> dict:
            return {"model": model, "batch": batch, "accum": accum, "config": args.config,
                    "overrides": list(args.overrides), "nproc": args.nproc,
                    "timeout": args.trial_timeout}
        return make

    try:  # every config is checked before the first child starts
        if min(args.accumulation) < 1:
            raise ConfigError(f"--accumulation {min(args.accumulation)}: need at least 1")
        for model in args.models:
            for b in args.batch_sizes:
                for a in args.accumulation:
                    cfg = trial_config(spec_for(model)(b, a))
                    resolve_ds_config(read_ds_config(args.deepspeed_config), cfg, args.nproc,
                                      args.deepspeed_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows, failed = [], False
    try:
        for model in args.models:
            failed |= run_model(args, spec_for(model), model, rows)
    except KeyboardInterrupt:  # e.g. a stage's timeout: report what was measured
        rows.append({"model": "-", "batch_per_device": 0, "error": "interrupted"})
        failed = True
    d = trial_config(spec_for(args.models[0])(args.batch_sizes[0]))["data"]
    print(f"\nMSN step: {os.path.basename(args.deepspeed_config)}, {args.nproc} "
          f"process(es), views {1 + d['rand_views']}x{d['rand_size']} + "
          f"{d['focal_views']}x{d['focal_size']}, patch drop {d['patch_drop']}, "
          f"{args.steps} timed steps after {args.warmup}"
          + (", beside a plain PyTorch step (ours/plain: images/s ratio)" if args.baseline
             else ""))
    print(format_results(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


def run_model(args, spec_for, model: str, rows: list[dict]) -> bool:
    """The trials of one model (and its plain baselines, its max-batch search), appended to
    ``rows``; whether any failed."""
    failed = False
    for b, a in ((b, a) for b in args.batch_sizes for a in args.accumulation):
        spec = {**spec_for(b, a), "ds_path": args.deepspeed_config, "steps": args.steps,
                "warmup": args.warmup}
        status, row = run_trial(spec)
        failed |= status == "error"
        if args.baseline:
            row.setdefault("step", "ours")
            rows.append(row)
            status, plain = run_trial({**spec, "baseline": args.baseline})
            failed |= status == "error"
            x = ratio(row, plain)
            if x is not None:
                row["plain_img_per_s"], row["ours_over_plain"] = plain["img_per_s"], x
            rows.append(plain)
        else:
            rows.append(row)
    if args.find_max_batch:
        try:
            best = find_max_batch(spec_for, args.deepspeed_config, min(args.batch_sizes))
            rows.append({"model": model, "batch_per_device": best,
                         "error": "largest batch per device that fits"})
        except TrialFailed as e:
            rows.append({"model": model, "batch_per_device": 0,
                         "error": f"max-batch search {e}"})
            failed = True
    return failed


if __name__ == "__main__":
    sys.exit(main())
