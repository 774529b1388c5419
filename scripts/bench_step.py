"""Time the real MSN training step on synthetic views already on the device.

The step is train.py's: the DeepSpeed engine over the project's encoder and prototypes, the
target encoder and its EMA, the loss, the optimiser and clipping (MSNTrainer.step). Views
are random tensors made once on the device, so the loader is out of the measurement (see
scripts/bench_data.py for it). After ``--warmup`` steps, ``--steps`` steps are timed with
CUDA events (wall clock on the CPU). MFU = achieved model FLOPs / the card's bf16 peak, with
the FLOPs per image of msn_ds/flops.py over the step's actual token counts.

    python scripts/bench_step.py --models vit_small_16 vit_base_16 --batch-sizes 64 256 \\
        --deepspeed_config ds_configs/zero1_bf16.json
    python scripts/bench_step.py --models vit_large_7 --batch-sizes 32 --find-max-batch \\
        --deepspeed_config ds_configs/zero2_bf16.json meta.activation_checkpointing=1
    # CPU smoke run (CI): tiny model, small views
    DS_ACCELERATOR=cpu python scripts/bench_step.py --models vit_pico_4 --batch-sizes 8 \\
        --deepspeed_config ds_configs/zero0_fp32.json data.rand_size=32 data.focal_size=16 \\
        data.focal_views=2

Extra ``section.key=value`` arguments override --config (default: the reference ViT-S/16
recipe, 224 px target and anchor views, 10 focal 96 px views, patch drop 0.15).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msn_ds import distributed as D  # noqa: E402
from msn_ds.config import ConfigError, load_config  # noqa: E402
from msn_ds.engine import (MSNTrainer, build_criterion, build_models, build_schedules,  # noqa: E402
                           init_deepspeed, init_target, read_ds_config, resolve_ds_config)
from msn_ds.flops import StepShape, mfu, peak_flops  # noqa: E402
from msn_ds.monitor import peak_memory_gib  # noqa: E402

OOM = (torch.OutOfMemoryError,)


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
    model, target = build_models(cfg)
    engine = init_deepspeed(model, ds_config)
    target, ema = init_target(target, engine, ds_config)
    trainer = MSNTrainer(engine, target, ema, build_criterion(cfg),
                         build_schedules(cfg, steps_per_epoch=1000), cfg)
    device = engine.device if isinstance(engine.device, torch.device) \
        else torch.device(engine.device)
    batch = cfg["criterion"]["batch_size"]
    views = synthetic_views(cfg, batch, device)
    try:
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
        return {"model": cfg["meta"]["model_name"], "batch_per_device": batch,
                "world_size": D.world_size(), "step_ms": 1e3 * step_s,
                "img_per_s": ips * D.world_size(), "img_per_s_per_device": ips,
                "peak_gib": peak_memory_gib(device), "gflop_per_image": per_image / 1e9,
                "tflops_per_device": ips * per_image / 1e12,
                "mfu": mfu(ips, per_image, peak_flops(device)), "loss": loss,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
                "bf16": bool(ds_config.get("bf16", {}).get("enabled")),
                "activation_checkpointing": cfg["meta"]["activation_checkpointing"]}
    finally:
        del trainer, engine, target, ema, model, views
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fits(cfg_for, ds_path: str, batch: int) -> bool:
    try:
        run_one(cfg_for(batch), ds_path, steps=1, warmup=1)
        return True
    except OOM:
        gc.collect()
        torch.cuda.empty_cache()
        return False


def find_max_batch(cfg_for, ds_path: str, start: int, limit: int = 4096) -> int:
    """Largest batch per device that runs a step: doubling from ``start`` until one does not
    fit, then bisection to a multiple of 8 (any batch below 16); 0 if not even a batch of 1 fits."""
    lo, hi = 0, None
    b = start
    while b <= limit:
        if fits(cfg_for, ds_path, b):
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
        if fits(cfg_for, ds_path, grid[mid]):
            lo, first = grid[mid], mid + 1
        else:
            last = mid
    return lo


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<14}{'batch/dev':>10}{'step ms':>10}{'img/s':>10}{'peak GiB':>10}"
            f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<14}{r['batch_per_device']:>10}  {r['error']}")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"{r['model']:<14}{r['batch_per_device']:>10}{r['step_ms']:>10.1f}"
                     f"{r['img_per_s']:>10.1f}{r['peak_gib']:>10.2f}{r['gflop_per_image']:>11.2f}"
                     f"{r['tflops_per_device']:>9.2f}{m:>7}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_small_16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64], help="per device")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default="ds_configs/zero1_bf16.json")
    p.add_argument("--config", default="configs/pretrain/msn_vits16.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--find-max-batch", action="store_true",
                   help="also search the largest batch per device that fits, per model")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    D.setup_env()

    def cfg_for(model: str):
        def make(batch: int) -> dict:
            return load_config(args.config, [*args.overrides, f"meta.model_name={model}",
                                             f"criterion.batch_size={batch}"], check_paths=False)
        return make

    try:  # every config is checked before the first engine is built
        for model in args.models:
            for b in args.batch_sizes:
                cfg = cfg_for(model)(b)
                resolve_ds_config(read_ds_config(args.deepspeed_config), cfg,
                                  int(os.environ["WORLD_SIZE"]), args.deepspeed_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rows = []
    for model in args.models:
        for b in args.batch_sizes:
            try:
                rows.append(run_one(cfg_for(model)(b), args.deepspeed_config, args.steps,
                                    args.warmup))
            except OOM:
                rows.append({"model": model, "batch_per_device": b, "error": "out of memory"})
        if args.find_max_batch:
            best = find_max_batch(cfg_for(model), args.deepspeed_config, min(args.batch_sizes))
            rows.append({"model": model, "batch_per_device": best,
                         "error": "largest batch per device that fits"})
    if D.is_main():
        cfg0 = cfg_for(args.models[0])(args.batch_sizes[0])
        d = cfg0["data"]
        print(f"\nMSN step: {os.path.basename(args.deepspeed_config)}, {D.world_size()} "
              f"process(es), views {1 + d['rand_views']}x{d['rand_size']} + "
              f"{d['focal_views']}x{d['focal_size']}, patch drop {d['patch_drop']}, "
              f"{args.steps} timed steps after {args.warmup}")
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
