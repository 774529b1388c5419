"""Run under torchrun (gloo, CPU) by tests/test_ema_master.py, one ZeRO stage per run:
train a few bf16 steps through msn_ds's own engine and target builders, and compare the
target's EMA with a float64 EMA of the anchor's fp32 master weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_ema_master.py STAGE OUT [DTYPE]

``DTYPE``: the target's, as ``meta.target_dtype``: ``model`` (the default: the target computes
in bf16) or ``fp32``. The target's output on a fixed batch is compared with an fp32 and a
bf16 encoder holding the same fp32 EMA, and so are the sharpened targets it gives the loss.
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from msn_ds import distributed as D
from msn_ds.ema import make_target
from msn_ds.engine import init_deepspeed, init_target
from msn_ds.models import MSNEncoder, MSNModel

COLLECTIVES = ["all_gather", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced",
               "broadcast", "all_reduce", "reduce_scatter_tensor", "reduce_scatter_fn",
               "all_to_all_single"]


def count_collectives(calls):
    """Patch torch.distributed and deepspeed.comm so that every collective is recorded."""
    saved = {}
    for mod in (dist, deepspeed.comm):
        for name in COLLECTIVES:
            if hasattr(mod, name):
                fn = getattr(mod, name)
                saved[(mod, name)] = fn

                def spy(*a, _fn=fn, _name=name, **k):
                    calls.append(_name)
                    return _fn(*a, **k)
                setattr(mod, name, spy)
    return saved


def fp32_masters(engine):
    """param -> its whole fp32 master: DeepSpeed's own accessor at ZeRO-1..3; at ZeRO-0 in
    bf16 (no accessor) the mixed-precision optimiser's fp32 copies."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() > 0:
        return safe_get_full_fp32_param
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 copy per parameter
        pairs = {id(p): m for ps, ms in zip(opt.fp16_groups, opt.fp32_groups)
                 for p, m in zip(ps, ms)}
        return lambda p: pairs[id(p)].view_as(p)
    from torch._utils import _unflatten_dense_tensors  # FP16_Optimizer: flat fp32 copies

    pairs = {}
    for ps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        pairs.update({id(p): m for p, m in zip(ps, _unflatten_dense_tensors(flat, ps))})
    return lambda p: pairs[id(p)]


@torch.no_grad()
def compare_outputs(target, state) -> dict:
    """The target's head output on a fixed batch against an fp32 and a bf16 encoder holding
    the same fp32 EMA (``state``), and the sharpened targets the loss makes from them
    (prototypes fixed at random). Collective under ZeRO-3 (the target engine gathers)."""
    from msn_ds.loss import MSNLoss, sharpen_log

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    work = next(target.parameters()).dtype
    z = target(x.to(work)).float()
    ref = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=64, output_dim=32)
    ref.load_state_dict(state)
    ref.train(target.training)
    z32 = ref(x)
    z16 = ref.bfloat16()(x.bfloat16()).float()
    protos = torch.randn(16, 32, generator=torch.Generator().manual_seed(8))
    crit = MSNLoss()

    def targets(v):
        return sharpen_log(crit.soft_nn(v, protos)[1], 0.25)

    t, t32, t16 = targets(z), targets(z32), targets(z16)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {"out_dtype": str(target(x.to(work)).dtype), "out_rel_fp32": rel(z, z32),
            "out_rel_bf16": rel(z, z16), "bf16_rel_fp32": rel(z16, z32),
            "targets_rel_fp32": rel(t, t32), "targets_rel_bf16": rel(t, t16)}


def main():
    stage, out = int(sys.argv[1]), sys.argv[2]
    target_dtype = sys.argv[3] if len(sys.argv) > 3 else "model"
    D.setup_env()
    D.init_process_group()
    rank = dist.get_rank()
    torch.manual_seed(0)
    encoder = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=64, output_dim=32)
    model = MSNModel(encoder, 16, 32)
    target = make_target(encoder)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "overlap_comm": stage == 3},
                 "bf16": {"enabled": True}, "gradient_clipping": 3.0,
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine = init_deepspeed(model, ds_config)
    target, ema = init_target(target, engine, ds_config, target_dtype)
    anchor = engine.module.encoder
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-2
    masters = fp32_masters(engine)
    reference = [masters(p).double() for p in anchor.parameters()]

    g = torch.Generator().manual_seed(rank)
    calls, worst, per_update = [], 0.0, []
    gates = [1.0, 1.0, 0.0, 1.0]  # the third update is a skipped (non-finite) step
    for step, gate in enumerate(gates):
        x = torch.randn(4, 3, 16, 16, generator=g).bfloat16()
        z, proto = engine([x])
        engine.backward((z.float() @ proto.float().t()).square().mean())
        engine.step()
        m = 0.9 - 0.1 * step
        full = [masters(p).double() for p in anchor.parameters()]
        if gate:
            for r, f in zip(reference, full):
                r.mul_(m).add_((1 - m) * f)
        saved = count_collectives(calls)
        try:
            calls.clear()
            ema.update(m, gate=torch.tensor(gate))
            per_update.append(list(calls))
        finally:
            for (mod, name), fn in saved.items():
                setattr(mod, name, fn)

    if stage == 3:
        from msn_ds.ema import assemble_slices

        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, ema.state_dict())
        state = assemble_slices(states)
        module_params = None
    else:
        state = ema.state_dict()  # collective: the whole fp32 EMA
        module_params = {n: p.detach() for n, p in target.named_parameters()}
    names = [n for n, _ in anchor.named_parameters()]
    for name, r in zip(names, reference):
        worst = max(worst, (state[name].double() - r).abs().max().item())
    # the target computes in its dtype with the EMA rounded once (bf16) or exact (fp32), and
    # everywhere the same
    dtypes = sorted({str(p.dtype) for p in target.parameters()} if stage != 3 else
                    {str(p.ds_tensor.dtype) for p in target.parameters()})
    if module_params is None:  # ZeRO-3: the working slices against the fp32 EMA slices
        rounding = max((p.ds_tensor.float() - s.to(p.ds_tensor.dtype).float()).abs().max().item()
                       for p, s in zip(target.parameters(), ema.slices))
    else:
        rounding = max((module_params[n].float() - state[n].to(module_params[n].dtype).float())
                       .abs().max().item() for n in names)
    outputs = compare_outputs(target, state)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"worst": worst, "rounding": rounding, "per_update": per_update,
                   "dtypes": dtypes, "ema": type(ema).__name__,
                   "optimizer": type(engine.optimizer).__name__, **outputs,
                   "target_overlap_comm": getattr(getattr(target, "_config", None),
                                                  "zero_config", None) and
                   target._config.zero_config.overlap_comm}, f)
    D.cleanup()


if __name__ == "__main__":
    main()
