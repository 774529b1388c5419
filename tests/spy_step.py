"""Count host reads made by msn_ds's code during real training steps (tests/test_step_device.py).

    python tests/spy_step.py OUT.json

One process, DeepSpeed on the CPU: for ZeRO-0 fp32 and ZeRO-1 bf16, 5 steps (the 4th a
logging step) on synthetic views. Every call of ``Tensor.item/cpu/tolist/numpy`` and
``bool/float/int(tensor)`` whose caller is a file of msn_ds is recorded with the step it
happened in. (On CUDA each one is a device sync; DeepSpeed's own internals are not ours.)
"""
import json
import os
import sys
from collections import Counter

import torch

from msn_ds import distributed as D
from msn_ds.config import load_config
from msn_ds.deepspeed_config import resolve_ds_config
from msn_ds.monitor.progress import Monitor
from msn_ds.trainer import build

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "msn_ds")
SPIED = ["item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"]


class Spy:
    def __init__(self):
        self.calls = Counter()
        self.saved = {}

    def __enter__(self):
        for name in SPIED:
            real = getattr(torch.Tensor, name)
            self.saved[name] = real

            def spy(t, *a, _real=real, _name=name, **k):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PACKAGE):
                    self.calls[f"{_name} at {os.path.relpath(caller, PACKAGE)}:"
                               f"{sys._getframe(1).f_lineno}"] += 1
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def synthetic_views(cfg, batch):
    d = cfg["data"]
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def run(ds_config, tmp):
    cfg = load_config("configs/demo_cpu.yaml", ["data.root_path=/nonexistent",
                                                "criterion.batch_size=4"], check_paths=False)
    ds = resolve_ds_config(ds_config, cfg, 1)
    built = build(cfg, ds, steps_per_epoch=100)
    trainer = built.trainer
    monitor = Monitor(tmp, 5, 4, log_every=4, tensorboard=False,
                      device=torch.device(built.engine.device))
    views = synthetic_views(cfg, 4)
    step_calls, poll_calls, log_calls = Counter(), Counter(), Counter()
    for step in range(5):
        log = monitor.due(step + 1)
        with Spy() as spy:
            out = trainer.step(views, step, log=log)
            monitor.update(dict(out.stats, loss=out.loss, skipped=out.skipped))
        if not log:
            step_calls.update(spy.calls)
        with Spy() as spy:
            trainer.poll(step - 1)
        poll_calls.update(spy.calls)
        if monitor.due(step + 1):
            with Spy() as spy:
                monitor.log(step + 1, 0, out.sched)
            log_calls.update(spy.calls)
    return {"step_calls": dict(step_calls), "poll_calls": dict(poll_calls),
            "monitor_log_calls": dict(log_calls)}


def main():
    out = sys.argv[1]
    D.setup_env()
    D.init_process_group()
    results = {}
    for name, ds in {"zero0_fp32": {"zero_optimization": {"stage": 0}},
                     "zero1_bf16": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
                     }.items():
        results[name] = run(ds, os.path.dirname(os.path.abspath(out)))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    D.cleanup()


if __name__ == "__main__":
    main()
