"""The GPU path on the CPU: the step's outputs live on the step's device, the step reads
nothing back to the host outside logging steps, and device/backend/precision selection.

The step runs on the ``meta`` device (a device that is not the CPU, where any read of a
value, ``.item()``, ``bool(t)``, ``bincount``..., raises), through a stand-in for the
DeepSpeed engine (DeepSpeed cannot build on ``meta``). The real engines are spied on in
tests/spy_step.py."""
import json

import pytest
import torch

from helpers import ROOT, run_cli
from msn_ds import distributed as D
from msn_ds.config import load_config
from msn_ds.ema import PlainEMA
from msn_ds.engine import build_models, configure_precision, param_groups
from msn_ds.monitor.progress import Monitor
from msn_ds.trainer import HostFlags, MSNTrainer, build_criterion, build_schedules, step_options

META = torch.device("meta")


class GatedSGD(torch.optim.Optimizer):
    """What fused AdamW does with ``found_inf`` (it refuses ``meta`` tensors): skip on the
    device when ``found_inf`` is 1."""

    def __init__(self, groups):
        super().__init__(groups, {"lr": 0.1, "weight_decay": 0.0, "fused": True})

    @torch.no_grad()
    def step(self):
        keep = 1.0 - self.found_inf
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad * keep, alpha=-group["lr"])


class MetaEngine:
    """The parts of DeepSpeed's engine the trainer uses. ``get_global_grad_norm`` returns a
    Python float, as DeepSpeed's ZeRO optimisers may."""

    def __init__(self, model):
        self.module, self.device = model, META
        self.optimizer = self.basic_optimizer = GatedSGD(param_groups(model))

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def zero_optimization_stage(self):
        return 1

    def get_global_grad_norm(self):
        return 1.5


def demo_cfg():
    return load_config(f"{ROOT}/configs/demo_cpu.yaml", ["data.root_path=/nonexistent"],
                       check_paths=False)


def views(cfg, batch=4):
    d = cfg["data"]
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    return [torch.randn(batch, 3, s, s) for s in sizes]  # on the CPU, as the loader gives them


def meta_trainer(cfg):
    with torch.device("meta"):
        model, target = build_models(cfg)
    engine = MetaEngine(model)
    return MSNTrainer(engine, target, PlainEMA(target, model.encoder), build_criterion(cfg),
                      build_schedules(cfg, steps_per_epoch=10), **step_options(cfg))


def test_step_outputs_live_on_the_step_device(tmp_path):
    cfg = demo_cfg()
    trainer = meta_trainer(cfg)
    monitor = Monitor(str(tmp_path), 10, 4, log_every=2, tensorboard=False, device=META)
    for step, log in [(0, False), (1, True)]:  # a plain step and a logging step
        out = trainer.step(views(cfg), step, log=log)
        tensors = dict(out.stats, loss=out.loss, skipped=out.skipped)
        assert {k: v.device for k, v in tensors.items()} == {k: META for k in tensors}
        assert ("grad_norm" in out.stats) == log  # the float from DeepSpeed, moved over
        monitor.update(tensors)  # checks every tensor's device
    assert monitor._means().device == META  # what log() stacks and reduces


def test_monitor_names_a_tensor_on_another_device(tmp_path):
    monitor = Monitor(str(tmp_path), 10, 4, log_every=2, tensorboard=False, device=META)
    with pytest.raises(ValueError, match="'skipped' is on cpu; the step runs on meta"):
        monitor.update({"loss": torch.zeros((), device=META), "skipped": torch.tensor(0.0)})


def state(*modules):
    """Parameters and buffers (BatchNorm running statistics included), detached copies."""
    return [t.detach().clone() for m in modules for t in (*m.parameters(), *m.buffers())]


@pytest.mark.slow
def test_nonfinite_step_is_skipped_on_the_device():
    """On the CPU, with the real fused AdamW: a NaN loss, or a NaN pixel that reaches the
    heads' BatchNorm statistics, leaves the weights, the target and the BatchNorm running
    statistics bit-identical, with no host read; the host learns of it from ``poll``."""
    cfg = demo_cfg()
    model, target = build_models(cfg)
    engine = MetaEngine(model)
    engine.device = torch.device("cpu")
    engine.optimizer = engine.basic_optimizer = torch.optim.AdamW(param_groups(model), fused=True)
    trainer = MSNTrainer(engine, target, PlainEMA(target, model.encoder), build_criterion(cfg),
                         build_schedules(cfg, steps_per_epoch=10), **step_options(cfg))
    assert len(trainer.norm_stats) >= 6  # both heads' BatchNorm: mean, var, count each
    trainer.step(views(cfg), 0)
    before = state(model, target)
    real = trainer.criterion.forward
    trainer.criterion.forward = lambda *a: (lambda loss, stats: (loss * float("nan"), stats))(
        *real(*a))
    out = trainer.step(views(cfg), 1)
    assert out.skipped.item() == 1.0
    assert all(torch.equal(b, a) for b, a in zip(before, state(model, target)))
    assert trainer.poll() == [(1, 1)] and trainer.nonfinite_run == 1
    trainer.criterion.forward = real
    bad = views(cfg)
    for v in bad:
        v[0, 0, 0, 0] = float("nan")
    out = trainer.step(bad, 2)
    assert out.skipped.item() == 1.0
    assert all(torch.equal(b, a) for b, a in zip(before, state(model, target)))
    assert trainer.poll() == [(2, 2)] and trainer.nonfinite_run == 2
    out = trainer.step(views(cfg), 3)
    assert out.skipped.item() == 0.0 and trainer.poll() == [] and trainer.nonfinite_run == 0
    after = state(model, target)
    assert not all(torch.equal(b, a) for b, a in zip(before, after))
    assert all(torch.isfinite(t.float()).all() for t in after)


def test_patience_and_stop_flags_are_read_a_step_behind():
    flags = HostFlags(torch.device("cpu"))
    for step in range(4):
        flags.push(step, torch.tensor([float(step != 2), -1.0 if step == 3 else 0.0]))
    assert [s for s, _ in flags.ready(upto=1)] == [0, 1]
    assert flags.ready(upto=2) == [(2, [0.0, 0.0])]
    assert flags.ready() == [(3, [1.0, -1.0])] and flags.ready() == []


@pytest.mark.slow
def test_spy_counts_no_host_sync_outside_logging_steps(tmp_path):
    """Real DeepSpeed engines (ZeRO-0 fp32 and ZeRO-1 bf16, one process): the step calls no
    .item(), .cpu(), .tolist(), .numpy(), bool/float/int(tensor) from msn_ds's code except
    at logging steps; ``poll`` reads only the host copies. The spy itself is checked by the
    monitor's read at a logging step."""
    out = tmp_path / "spy.json"
    run_cli("tests/spy_step.py", out, "zero0_fp32_clip", "zero1_bf16_clip")
    res = json.loads(out.read_text())
    for ds, counts in res.items():
        assert counts["step_calls"] == {}, (ds, counts)  # 5 steps, 1 of them a logging step
        # poll reads host copies only (pinned memory on CUDA, after the copy's event)
        assert [k.split(":")[0] for k in counts["poll_calls"]] == ["numpy at trainer.py"], counts
        assert counts["monitor_log_calls"], (ds, counts)  # the spy sees a real read


def test_precision_tf32_only_for_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        configure_precision(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        configure_precision(torch.device("cuda", 0))  # sets a flag only: no GPU needed
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


class FakeAccelerator:
    def __init__(self, name, backend):
        self.name, self.backend = name, backend

    def device_name(self, index=None):
        return self.name

    def communication_backend_name(self):
        return self.backend


@pytest.mark.parametrize("name,backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_backend_from_the_accelerator_and_gpu_pinned_first(monkeypatch, name, backend):
    """The backend is the accelerator's (so DS_ACCELERATOR=cpu on a GPU host gives gloo),
    and a CUDA process is pinned to its local GPU before the process group exists."""
    import deepspeed
    import deepspeed.accelerator

    calls = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator",
                        lambda: FakeAccelerator(name, backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda dist_backend, **kw: calls.append(("init", dist_backend)))
    monkeypatch.setenv("LOCAL_RANK", "3")
    D.init_process_group()
    assert calls == ([("set_device", 3), ("init", "nccl")] if name == "cuda" else
                     [("init", "gloo")])
    assert D.step_device() == (torch.device("cuda", 3) if name == "cuda" else torch.device("cpu"))


@pytest.mark.slow
def test_cpu_accelerator_gives_gloo_in_a_real_process():
    code = ("from msn_ds import distributed as D; import torch.distributed as dist; "
            "D.setup_env(); D.init_process_group(); print(dist.get_backend(), D.step_device()); "
            "D.cleanup()")
    r = run_cli("-c", code, timeout=120)
    assert r.stdout.split()[-2:] == ["gloo", "cpu"]
