"""Count the host reads and device waits of real training steps (tests/test_step_device.py,
tests/test_device_waits.py).

    python tests/spy_step.py OUT.json [NAME ...]

One process, DeepSpeed on the CPU accelerator. ``NAME``: ``zero{0,1,2,3}_{fp32,bf16}_{clip,
noclip}`` (all 16 when none is given; a suffix ``_a2`` accumulates 2 micro-batches per step),
or ``clip_check`` (:func:`clip_check`). Each config runs the loop of train.py on synthetic
views: 8 steps, ``logging.log_every=100`` (so only the last step logs), ``poll`` a step behind.

Counted, per step (the step, ``monitor.update``, ``poll`` and, at the last step, the log):

* ``reads``: every ``Tensor.item/cpu/tolist/numpy`` and ``bool/float/int(tensor)``, keyed by
  the calling file (``msn_ds/...``, ``deepspeed/...``, ``torch/...``): on CUDA each one
  waits for the device.
* ``sync``: ``get_accelerator().synchronize()`` (a whole-device wait on CUDA).
* ``guarded_sync``: a branch DeepSpeed takes only on a device with streams (``if not
  get_accelerator().resolves_data_dependency(): <stream>.synchronize()`` and the like): on
  the CPU the branch is skipped, so the spy records the guard whose next line synchronises
  a stream, i.e. the wait CUDA would make there.
* ``fp32_accessor``: DeepSpeed's public fp32 accessors (``safe_get_local_fp32_param``,
  ``safe_get_full_fp32_param``...) and ZeRO-3's partition lookup behind them
  (``_get_fp32_opt_state_partition``, which synchronises ``reduce_and_partition_stream``).
* ``memory_stats``: ``get_accelerator().memory_stats()`` (no device wait, a host query).

``step_calls``/``poll_calls``/``monitor_log_calls``: the host reads made by msn_ds's own
code, in the step (non-logging steps), in ``poll`` and in the monitor's log.
"""
import json
import linecache
import os
import sys
from collections import Counter, defaultdict

import torch

from msn_ds import distributed as D
from msn_ds.config import load_config
from msn_ds.deepspeed_config import resolve_ds_config
from msn_ds.monitor.progress import Monitor
from msn_ds.trainer import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "msn_ds")
SPIED = ["item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"]
STEPS = 8
GUARDS = ["resolves_data_dependency", "is_synchronized_device", "handles_memory_backpressure",
          "use_host_timers"]


def _site(frame) -> str:
    """``package/relative/path.py:function:line`` for a frame (msn_ds, deepspeed, torch)."""
    path = frame.f_code.co_filename
    for pkg in ("msn_ds", "deepspeed", "torch"):
        mark = os.sep + pkg + os.sep
        if mark in path:
            path = pkg + os.sep + path.rsplit(mark, 1)[1]
            break
    return f"{path}:{frame.f_code.co_name}:{frame.f_lineno}"


class Spy:
    """While active, records into ``self.now`` (a dict: kind -> Counter of call sites)."""

    def __init__(self):
        self.now = None
        self.saved = []

    def record(self, kind: str, site: str) -> None:
        if self.now is not None:
            self.now[kind][site] += 1

    def patch(self, owner, name, make):
        real = getattr(owner, name)
        self.saved.append((owner, name, real))
        setattr(owner, name, make(real))

    def __enter__(self):
        import deepspeed.utils
        import deepspeed.utils.tensor_fragment as tf
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        spy = self

        for name in SPIED:
            def tensor_read(real, _name=name):
                def f(t, *a, **k):
                    caller = sys._getframe(1)
                    site = _site(caller)
                    if caller.f_code.co_filename != __file__:
                        spy.record("reads", f"{_name} at {site}")
                        if caller.f_code.co_filename.startswith(PACKAGE):
                            spy.record("msn_reads", f"{_name} at "
                                       f"{os.path.relpath(caller.f_code.co_filename, PACKAGE)}:"
                                       f"{caller.f_lineno}")
                    return real(t, *a, **k)
                return f
            self.patch(torch.Tensor, name, tensor_read)

        acc = type(get_accelerator())

        def counted(kind):
            def make(real):
                def f(*a, **k):
                    spy.record(kind, _site(sys._getframe(1)))
                    return real(*a, **k)
                return f
            return make
        self.patch(acc, "synchronize", counted("sync"))
        self.patch(acc, "memory_stats", counted("memory_stats"))

        def guard(real):
            def f(*a, **k):
                caller = sys._getframe(1)
                path, line = caller.f_code.co_filename, caller.f_lineno
                if "synchronize()" in linecache.getline(path, line + 1):
                    spy.record("guarded_sync", _site(caller))
                return real(*a, **k)
            return f
        for name in GUARDS:
            if hasattr(acc, name):
                self.patch(acc, name, guard)

        for module in (deepspeed.utils, tf):
            for name in dir(module):
                if name.startswith(("safe_get_", "safe_set_")) and "fp32" in name or \
                        name.startswith(("safe_get_full_optimizer", "safe_get_local_optimizer")):
                    self.patch(module, name, counted("fp32_accessor"))
        z3 = DeepSpeedZeroOptimizer_Stage3
        for name in ("_get_fp32_opt_state_partition", "_get_fp32_grad_state_partition"):
            self.patch(z3, name, counted("fp32_accessor"))
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self.saved):
            setattr(owner, name, real)


def synthetic_views(cfg, batch):
    d = cfg["data"]
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def ds_for(name: str) -> tuple[dict, float]:
    stage, dtype, clip, *accum = name.split("_")  # ..._a2: gradient_accumulation_steps 2
    ds = {"zero_optimization": {"stage": int(stage[len("zero"):])}}
    if accum:
        ds["gradient_accumulation_steps"] = int(accum[0][1:])
    if stage == "zero3":
        ds["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True)
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds, {"clip": 3.0, "noclip": 0.0}[clip]


NAMES = [f"zero{s}_{d}_{c}" for s in range(4) for d in ("fp32", "bf16") for c in ("clip", "noclip")]


def run(name: str, tmp: str) -> dict:
    ds_config, clip = ds_for(name)
    cfg = load_config(f"{ROOT}/configs/demo_cpu.yaml",
                      ["data.root_path=/nonexistent", "criterion.batch_size=4",
                       "data.num_workers=0", "logging.log_every=100",
                       f"optimization.clip_grad={clip}"], check_paths=False)
    ds = resolve_ds_config(ds_config, cfg, 1)
    built = build(cfg, ds, steps_per_epoch=100)
    trainer = built.trainer
    monitor = Monitor(tmp, STEPS, 4, log_every=cfg["logging"]["log_every"], tensorboard=False,
                      device=torch.device(built.engine.device))
    views = synthetic_views(cfg, 4)
    per_step = []
    step_calls, poll_calls, log_calls = Counter(), Counter(), Counter()
    with Spy() as spy:
        for step in range(STEPS):  # train.py's loop body
            spy.now = defaultdict(Counter)
            log = monitor.due(step + 1)
            out = trainer.step(views, step, log=log)
            monitor.update(dict(out.stats, loss=out.loss, skipped=out.skipped))
            reads = spy.now.pop("msn_reads", {})
            if not log:
                step_calls.update(reads)
            due = monitor.due(step + 1)
            trainer.poll(None if due or step + 1 >= STEPS else step - 1)
            poll_calls.update(spy.now.pop("msn_reads", {}))
            if due:
                monitor.log(step + 1, 0, out.sched)
                log_calls.update(spy.now.pop("msn_reads", {}))
            per_step.append({k: dict(v) for k, v in spy.now.items() if v})
            spy.now = None
    bn = [(n, str(b.dtype)) for module in (trainer.model, trainer.target)
          for n, b in module.named_buffers() if "running" in n]
    return {"step_calls": dict(step_calls), "poll_calls": dict(poll_calls),
            "monitor_log_calls": dict(log_calls), "per_step": per_step,
            "bn_running_dtypes": sorted({d for _, d in bn}), "bn_buffers": len(bn),
            "engine_dtype": str(trainer.dtype),
            "optimizer": type(built.engine.optimizer).__name__,
            "ds_gradient_clipping": built.engine.gradient_clipping(),
            "timers": ds.get("timers")}


def clip_check() -> dict:
    """ZeRO-0 fp32: the trainer's clipping (torch's foreach ``clip_grad_norm_``) against the
    DeepSpeed function it replaces (``engine.clip_fp32_gradients``), on the same gradients,
    one clipped and one not (norm below the limit)."""
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    worst = 0.0
    for scale in (10.0, 1e-3):
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ((64, 32), (32,), (8, 3, 4, 4))]
        grads = [torch.randn(p.shape, generator=g) * scale for p in params]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q, gr in zip(params, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
        ds_clip(theirs, max_norm=3.0)
        worst = max(worst, max((p.grad - q.grad).abs().max().item()
                               for p, q in zip(params, theirs)))
    return {"max_abs_diff": worst}


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or NAMES
    D.setup_env()
    D.init_process_group()
    results = {}
    for name in names:
        results[name] = (clip_check() if name == "clip_check" else
                         run(name, os.path.dirname(os.path.abspath(out))))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    D.cleanup()


if __name__ == "__main__":
    main()
