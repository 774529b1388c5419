"""No device waits between logging steps, at every ZeRO stage (counted on the CPU
accelerator by tests/spy_step.py), and the pieces that make it so: DeepSpeed's throughput
timer off in the resolved config, the ZeRO-3 EMA's fp32 slices looked up once, the
trainer's own clipping at ZeRO-0 fp32, and fp32 BatchNorm statistics in bf16 runs."""
import json
import logging

import pytest
import torch

from helpers import ROOT, run_cli
from msn_ds.config import load_config
from msn_ds.deepspeed_config import resolve_ds_config, trainer_clips
from msn_ds.ema import ShardedEMA


def demo_cfg(*overrides):
    return load_config(f"{ROOT}/configs/demo_cpu.yaml",
                       ["data.root_path=/nonexistent", *overrides], check_paths=False)


def test_throughput_timer_off_unless_asked(caplog):
    cfg = demo_cfg()
    ds = resolve_ds_config({"zero_optimization": {"stage": 1}}, cfg, 1)
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    from deepspeed.runtime.config import DeepSpeedConfig
    assert not DeepSpeedConfig(ds).timers_config.enabled  # the key DeepSpeed reads
    with caplog.at_level(logging.WARNING, logger="msn_ds.deepspeed_config"):
        quiet = resolve_ds_config({"timers": {"throughput": {"enabled": True,
                                                             "synchronized": False}}}, cfg, 1)
        assert not caplog.records  # a host timer only: no wait, no warning
        loud = resolve_ds_config({"timers": {"throughput": {"enabled": True}}}, cfg, 1, "t.json")
    assert quiet["timers"]["throughput"] == {"enabled": True, "synchronized": False}
    assert loud["timers"]["throughput"] == {"enabled": True}  # the user's choice is kept...
    assert any("t.json: timers.throughput is enabled and synchronized" in r.getMessage()
               for r in caplog.records)  # ...with what it costs


def test_clipping_moves_to_the_trainer_only_at_zero0_fp32(caplog):
    cfg = demo_cfg()  # clip_grad 3.0
    z0 = resolve_ds_config({"zero_optimization": {"stage": 0}}, cfg, 2)
    assert z0["gradient_clipping"] == 0.0 and not trainer_clips(z0)  # done: DeepSpeed is off
    assert trainer_clips({"zero_optimization": {"stage": 0}, "gradient_clipping": 3.0})
    for ds in ({"zero_optimization": {"stage": 1}}, {"zero_optimization": {"stage": 3}},
               {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}):
        assert resolve_ds_config(ds, cfg, 2)["gradient_clipping"] == 3.0
    with caplog.at_level(logging.WARNING, logger="msn_ds.deepspeed_config"):
        bf = resolve_ds_config({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
                               cfg, 1)
    assert bf["gradient_clipping"] == 3.0  # FP16_UnfusedOptimizer clips the fp32 masters
    assert any("FP16_UnfusedOptimizer" in r.getMessage() for r in caplog.records)
    off = resolve_ds_config({"zero_optimization": {"stage": 0}},
                            demo_cfg("optimization.clip_grad=0"), 1)
    assert off["gradient_clipping"] == 0.0


class FakeZ3Optimizer:
    """What ShardedEMA reads of DeepSpeed's ZeRO-3 optimiser: persistent flat fp32
    partitions, and the accessor (counted) that returns a view of one (or, ``copies``, a
    copy: optimiser offload on a GPU)."""

    def __init__(self, sizes, copies=False):
        g = torch.Generator().manual_seed(0)
        self.fp32_partitioned_groups_flat = [torch.randn(sum(sizes), generator=g)]
        self.where, offset = [], 0
        for n in sizes:
            self.where.append((0, offset, n))
            offset += n
        self.copies, self.calls = copies, 0

    def get_local_fp32_param(self, param):
        self.calls += 1
        g, offset, n = self.where[param.ds_id]
        view = self.fp32_partitioned_groups_flat[g].narrow(0, offset, n)
        return view.clone() if self.copies else view


def fake_z3(sizes, copies=False):
    opt = FakeZ3Optimizer(sizes, copies)
    anchor, target = torch.nn.Module(), torch.nn.Module()
    for i, n in enumerate(sizes):
        a = torch.nn.Parameter(torch.empty(0))
        a.ds_id, a._z3_optimizer = i, opt
        t = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        t.ds_tensor, t.ds_shape = torch.zeros(n, dtype=torch.bfloat16), (n,)
        anchor.register_parameter(f"p{i}", a)
        target.register_parameter(f"p{i}", t)
    return opt, anchor, target


def reference_lerp(slices, online, m):
    out = [s.clone() for s in slices]
    torch._foreach_lerp_(out, [o.clone() for o in online], [torch.tensor(1.0 - m)] * len(out))
    return out


def test_sharded_ema_looks_up_the_fp32_slices_once():
    """After construction, updates ask DeepSpeed for nothing (each ask is a stream sync on
    CUDA), follow the optimiser's in-place steps bit for bit, and look up again only when
    the optimiser has rebuilt its partitions (a checkpoint load)."""
    opt, anchor, target = fake_z3([5, 7, 3])
    ema = ShardedEMA(target, anchor)
    assert opt.calls == 3
    flat = opt.fp32_partitioned_groups_flat[0]
    for step in range(3):
        flat.add_(torch.randn_like(flat))  # the optimiser's step, in place
        online = [flat.narrow(0, o, n) for _, o, n in opt.where]
        want = reference_lerp(ema.slices, online, 0.9)
        ema.update(0.9, gate=torch.tensor(1.0))
        assert all(torch.equal(s, w) for s, w in zip(ema.slices, want))
    assert opt.calls == 3
    assert torch.equal(target.p1.ds_tensor, ema.slices[1].bfloat16())
    # a rebuilt partition (new storage) is found again, and its values are used
    opt.fp32_partitioned_groups_flat[0] = torch.full_like(flat, 2.0)
    ema.update(0.5)
    assert opt.calls == 6 and all(torch.equal(s, w) for s, w in zip(
        ema.slices, reference_lerp(want, [torch.full((n,), 2.0) for _, _, n in opt.where], 0.5)))
    ema.update(0.5)
    assert opt.calls == 6
    flat2 = opt.fp32_partitioned_groups_flat[0]
    flat2.data = torch.zeros_like(flat2)  # same tensor, new storage
    ema.update(0.5)
    assert opt.calls == 9


def test_sharded_ema_asks_every_step_when_the_accessor_copies():
    opt, anchor, target = fake_z3([4, 4], copies=True)
    ema = ShardedEMA(target, anchor)
    ema.update(0.9)
    ema.update(0.9)
    assert opt.calls == 2 + 2 * 2


def test_batchnorm_statistics_back_to_fp32_after_a_cast():
    from msn_ds.engine import norm_stats_fp32_
    from msn_ds.models import MSNEncoder

    enc = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=32, output_dim=16).to(torch.bfloat16)
    norm_stats_fp32_(enc)
    bn = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in bn)
    assert all(m.weight.dtype == torch.bfloat16 for m in bn)  # trained: the engine's dtype
    enc.train()(torch.randn(4, 3, 16, 16).bfloat16())  # the forward updates them in fp32
    assert all(m.running_mean.dtype == torch.float32 for m in bn)


SPY = ["zero0_fp32_clip", "zero0_bf16_noclip", "zero1_bf16_clip", "zero2_fp32_clip",
       "zero2_bf16_noclip", "zero3_bf16_clip", "zero3_fp32_noclip"]


@pytest.mark.slow
def test_no_device_waits_between_logging_steps(tmp_path):
    """The loop of train.py, 8 steps, log_every=100, on the CPU accelerator: on steps 3-6 no
    ``get_accelerator().synchronize()`` and no fp32-accessor call, at ZeRO-0, 1, 2 and 3, in
    fp32 and bf16, with and without clipping; msn_ds's own code reads nothing back; the
    BatchNorm running statistics stay fp32; at ZeRO-0 fp32 the trainer's clipping equals
    DeepSpeed's."""
    out = tmp_path / "spy.json"
    run_cli("tests/spy_step.py", out, *SPY, "clip_check", timeout=900)
    res = json.loads(out.read_text())
    assert sorted(res) == sorted(SPY + ["clip_check"])
    assert res.pop("clip_check")["max_abs_diff"] < 1e-6
    for name, counts in res.items():
        for step in range(3, 7):
            waits = counts["per_step"][step]
            assert "sync" not in waits and "fp32_accessor" not in waits, (name, step, waits)
            assert not [k for k in waits.get("reads", {}) if "msn_ds/" in k and
                        "trainer.py:ready" not in k], (name, step, waits)  # poll: host copies
        assert counts["step_calls"] == {}, (name, counts["step_calls"])
        assert counts["bn_running_dtypes"] == ["torch.float32"], (name, counts)
        assert counts["bn_buffers"] == 8
        assert counts["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
        want_clip = 3.0 if name.endswith("_clip") and not name.startswith("zero0_fp32") else 0.0
        assert counts["ds_gradient_clipping"] == want_clip, (name, counts)
    # the spy sees what it counts: the ZeRO-3 EMA's lookups at construction happened before
    # step 0, the timer's syncs would show (tests/test_device_waits.py checks the config)
    assert "sync" not in res["zero3_bf16_clip"]["per_step"][0]
    assert res["zero3_bf16_clip"]["per_step"][4].get("guarded_sync")  # DeepSpeed's own
