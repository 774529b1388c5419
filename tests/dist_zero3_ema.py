"""Run under torchrun (2 processes, gloo) by tests/test_zero3_ema.py: the EMA on ZeRO-3
slices equals an unsharded fp32 EMA, and performs no collective at all."""
import copy
import json
import os
import sys

import torch

import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from msn_ds.ema import ShardedEMA
from msn_ds.models import MSNEncoder


def main():
    dtype, out = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    anchor = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=64, output_dim=32)
    target = copy.deepcopy(anchor)
    for p in target.parameters():
        p.requires_grad_(False)

    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == "bf16"},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(anchor.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=anchor, optimizer=opt, config=base)
    target_cfg = copy.deepcopy(base)
    target_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    target_engine, *_ = deepspeed.initialize(model=target, config=target_cfg)
    ema = ShardedEMA(target_engine.module, engine.module)
    # the unsharded EMA, in float64, from the anchor's full fp32 master weights
    reference = [safe_get_full_fp32_param(p).double() for p in engine.module.parameters()]

    forbidden = ["all_gather", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced",
                 "broadcast", "all_reduce", "reduce_scatter_tensor", "reduce_scatter_fn",
                 "all_to_all_single"]
    saved = {}
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise RuntimeError(f"collective {name} during the EMA update")
        return f

    g = torch.Generator().manual_seed(rank)
    worst, control_caught, update_calls = 0.0, False, []
    for step in range(3):
        x = torch.randn(4, 3, 16, 16, generator=g).to(next(engine.module.parameters()).dtype)
        z = engine([x])
        engine.backward(z.float().square().mean())
        engine.step()
        m = 0.9 - 0.1 * step
        full = [safe_get_full_fp32_param(p).double() for p in engine.module.parameters()]
        for r, f in zip(reference, full):
            r.mul_(m).add_((1 - m) * f)
        for mod in (dist, deepspeed.comm):
            for name in forbidden:
                if hasattr(mod, name):
                    saved[(mod, name)] = getattr(mod, name)
                    setattr(mod, name, refuse(name))
        try:
            calls.clear()
            ema.update(m)
            update_calls.extend(calls)
            if step == 0:  # control: a gather inside the patched region is caught
                try:
                    safe_get_full_fp32_param(next(engine.module.parameters()))
                except RuntimeError:
                    control_caught = True
        finally:
            for (mod, name), fn in saved.items():
                setattr(mod, name, fn)
        for r, s in zip(reference, ema.slices):
            part = s.numel()
            flat = torch.nn.functional.pad(r.flatten(), (0, part * dist.get_world_size() - r.numel()))
            want = flat[rank * part:(rank + 1) * part]
            worst = max(worst, (s.double() - want).abs().max().item())

    # the target engine computes with the averaged weights (no stale persisted copies)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    target_engine.module.eval()
    with torch.no_grad():
        got = target_engine(x.to(next(target_engine.module.parameters()).dtype)).float()
    plain = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=64, output_dim=32).eval()
    with torch.no_grad():
        for p, r in zip(plain.parameters(), reference):
            p.copy_(r.float())
        for b, t in zip(plain.buffers(), target_engine.module.buffers()):
            b.copy_(t)
        want = plain(x)
    out_err = (got - want).abs().max().item() / want.abs().max().item()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"worst": worst, "update_calls": update_calls, "control_caught": control_caught,
                   "out_rel": out_err}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
