"""Training steps with and without gradient accumulation, for tests/test_accumulation.py.

    python tests/dist_accumulation.py OUT.pt CASE [CASE ...]
    torchrun --nproc_per_node 2 tests/dist_accumulation.py OUT.pt CASE [CASE ...]

``CASE``: ``b{B}_a{A}_zero{S}_{fp32|bf16|fp16}[_dp][_psm]`` trains ``STEPS`` steps of the CPU demo
model at ``criterion.batch_size=B`` and ``gradient_accumulation_steps=A`` on synthetic views
(``_dp``: drop path 0.1, ``_psm``: per-sample masks, ``_ac``: activation checkpointing). Step ``s`` sees the global batch of
``GLOBAL`` images drawn from seed ``s``; process ``r`` takes its ``r``-th slice, as the
sampler does. Rank 0 saves, per case: the anchor encoder + prototypes and the target
encoder as flat fp32 vectors, the losses, the anchor's first vector (``init``), ``scales``:
fp16's loss scale after each step (1.0 otherwise), and ``replay``: the largest difference
between a micro-batch's backbone outputs in the first pass and in the second (0.0: replayed
exactly).

``resume_b{B}_a{A}_zero{S}_{dtype}``: the same case trained ``STEPS - 1`` steps, saved,
rebuilt from the checkpoint and trained one more step (the vectors, as above). A suffix
``_nan`` puts a NaN into step 1's batch instead and saves ``skipped`` (per step) and whether
step 1 left every parameter and buffer as step 0 did (``unchanged``) and step 2 did not.
"""
import os
import sys
import tempfile

import torch

from msn_ds import distributed as D
from msn_ds.config import dump, load_config
from msn_ds.deepspeed_config import resolve_ds_config
from msn_ds.trainer import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL = 16


def parse(case: str):
    parts = case.split("_")
    resume = parts[0] == "resume"
    parts = parts[1:] if resume else parts
    batch, accum = int(parts[0][1:]), int(parts[1][1:])
    stage, dtype = int(parts[2][len("zero"):]), parts[3]
    return resume, batch, accum, stage, dtype, "dp" in parts[4:], "psm" in parts[4:], \
        "ac" in parts[4:], "nan" in parts[4:]


def make(case: str, resume_from=None):
    _, batch, accum, stage, dtype, drop_path, psm, checkpointing, _ = parse(case)
    ds = {"gradient_accumulation_steps": accum, "zero_optimization": {"stage": stage}}
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    cfg = load_config(f"{ROOT}/configs/demo_cpu.yaml",
                      ["data.root_path=/nonexistent", f"criterion.batch_size={batch}",
                       "data.num_workers=0", f"meta.drop_path_rate={0.1 if drop_path else 0.0}",
                       f"criterion.per_sample_mask={psm}",
                       f"meta.activation_checkpointing={int(checkpointing)}"], check_paths=False)
    ds = resolve_ds_config(ds, cfg, D.world_size())
    if dtype == "fp16":
        allow_fp16_on_the_cpu()
        ds["fp16"] = {"enabled": True, "initial_scale_power": 10}
    built = build(cfg, ds, steps_per_epoch=100, resume_from=resume_from)
    step = 0
    if built.plan is not None:
        step = built.trainer.resume(built.plan)
    return cfg, built, step


def allow_fp16_on_the_cpu() -> None:
    """DeepSpeed's CPU accelerator says it has no fp16 (and resolve_ds_config refuses fp16
    there, so fp16 is put in after it), but torch computes in fp16 on the CPU, and
    DeepSpeed's ZeRO optimizers and dynamic loss scaler are the GPU's: the fp16 cases test
    their real scaling, unscaling and overflow checks, only their speed is not the GPU's."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def loss_scale(trainer):
    return float(trainer.engine.optimizer.loss_scale) if trainer.engine.fp16_enabled() else 1.0


def views_for(cfg, step: int) -> list[torch.Tensor]:
    """This process's slice of step ``step``'s global batch."""
    d = cfg["data"]
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    g = torch.Generator().manual_seed(1000 + step)
    whole = [torch.randn(GLOBAL, 3, s, s, generator=g) for s in sizes]
    per = GLOBAL // D.world_size()
    return [v[D.rank() * per:(D.rank() + 1) * per] for v in whole]


def spy_replay(trainer) -> list:
    """Record every backbone pass of the anchor: ``(micro-batch shape, outputs)``."""
    seen = []
    encoder = trainer.model.encoder
    real = encoder.features

    def features(*a, **k):
        out = real(*a, **k)
        seen.append([h.detach().clone() for h in out])
        return out
    encoder.features = features
    return seen


def everything(tr) -> torch.Tensor:
    """Parameters and buffers of both encoders and the prototypes, one fp32 vector (under
    ZeRO-3 the parameters consolidated: :func:`flat`)."""
    target = tr.target.module if hasattr(tr.target, "module") else tr.target
    return torch.cat([flat(m) for m in (tr.model, target)] +
                     [b.detach().float().flatten() for m in (tr.model, target)
                      for b in m.buffers()])


def flat(module) -> torch.Tensor:
    """The parameters as one fp32 vector; under ZeRO-3 consolidated (a collective: every
    process calls it)."""
    params = list(module.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().flatten() for p in params])
    return torch.cat([p.detach().float().flatten() for p in params])


def result(built, losses, replay, init) -> dict:
    tr = built.trainer
    target = tr.target.module if hasattr(tr.target, "module") else tr.target
    return {"anchor": flat(tr.model), "target": flat(target), "losses": losses,
            "replay": replay, "init": init}


def train(case: str) -> dict:
    resume, _, accum, *_ = parse(case)
    cfg, built, step = make(case)
    init = flat(built.trainer.model)
    losses = []
    seen = spy_replay(built.trainer)
    last = STEPS - 1 if resume else STEPS
    nan, snaps, skipped, scales = parse(case)[-1], [], [], []
    while step < last:
        views = views_for(cfg, step)
        if nan and step == 1:  # one image's target view: a non-finite loss everywhere
            views[0][0] = float("nan")
        out = built.trainer.step(views, step)
        losses.append(float(out.loss))
        skipped.append(float(out.skipped))
        scales.append(loss_scale(built.trainer))
        snaps.append(everything(built.trainer))
        step += 1
    if nan:  # the skipped step changed nothing: weights, target, BatchNorm statistics
        return {"skipped": skipped, "unchanged": torch.equal(snaps[0], snaps[1]),
                "changed_after": not torch.equal(snaps[1], snaps[2])}
    replay = 0.0
    if accum > 1:  # each step: A first-pass outputs, then the A replays in the same order
        for s in range(0, len(seen), 2 * accum):
            for a, b in zip(seen[s:s + accum], seen[s + accum:s + 2 * accum]):
                replay = max(replay, max((x - y).abs().max().item() for x, y in zip(a, b)))
    if resume:
        folder = tempfile.mkdtemp(prefix="accum-") if D.rank() == 0 else None
        box = [folder]
        if D.world_size() > 1:
            torch.distributed.broadcast_object_list(box)
        folder = box[0]
        path = built.trainer.save(folder, step, dump(cfg), keep_last=3)
        del built
        cfg, built, step = make(case, resume_from=path)
        out = built.trainer.step(views_for(cfg, step), step)
        losses.append(float(out.loss))
    return dict(result(built, losses, replay, init), scales=scales)


def main():
    out, cases = sys.argv[1], sys.argv[2:]
    D.setup_env()
    D.init_process_group()
    results = {case: train(case) for case in cases}
    if D.rank() == 0:
        torch.save(results, out)
    D.cleanup()


if __name__ == "__main__":
    main()
