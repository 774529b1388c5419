"""The GPU path on a CUDA GPU: train.py at every ZeRO stage, resume, the DALI loader,
inductor, fused AdamW, flash attention and the step statistics' device.

Every test is marked ``gpu`` and skipped where ``torch.cuda.is_available()`` is False (the
CPU machines, CI); scripts/device_check.sh runs them on a lent H100/H200 with
``pytest -m gpu -k "not dali" tests/test_gpu.py`` (``--core``) and ``-k dali`` (``--dali``).
The training runs are real ``python train.py`` processes on the demo data
(configs/demo_cpu.yaml: vit_pico_4, batch 64), DeepSpeed's CUDA accelerator. They are
independent, so they are started together, once, and run side by side on the one GPU (a
4-block ViT at batch 64: each needs little of it), so the file takes about as long as its
slowest run rather than the sum. Only the runs of the selected tests start (:data:`NEEDS`).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False "
                                        "(run on a GPU node by scripts/device_check.sh)"),
]

# A launcher's variables would make a child join a world it is not part of.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV},
       "DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT = 120  # s, one run, however many run beside it (device_check.sh gives the file 150)

STAGES = {0: "zero0_fp32.json", 1: "zero1_bf16.json", 2: "zero2_bf16.json", 3: "zero3_bf16.json"}


def dali_importable() -> bool:
    from msn_ds.data.dali import dali_available

    return dali_available()


def train_args(demo_root, folder, ds, steps, *extra):
    return ["--config", "configs/demo_cpu.yaml", "--deepspeed_config", f"ds_configs/{ds}",
            "--max-steps", str(steps), f"data.root_path={demo_root}", f"logging.folder={folder}",
            "data.num_workers=2", "logging.log_every=5", *extra]


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    from safetensors.torch import load_file

    w = load_file(path)
    keys = sorted(k for k in w if w[k].is_floating_point() and "running" not in k)
    return torch.cat([w[k].flatten().double() for k in keys])


class Run:
    """One ``python train.py`` child writing to ``folder``, its output in ``log``. It stays
    in our process group, so a ``timeout`` around pytest stops it too."""

    def __init__(self, folder, args, log=None):
        self.folder, self.log_path = folder, log or folder + ".log"
        self.started = time.time()
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait(self):
        """Exit code and the log's tail; the run counts as failed past RUN_TIMEOUT."""
        try:
            rc = self.proc.wait(max(1.0, RUN_TIMEOUT - (time.time() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            rc = f"timed out after {RUN_TIMEOUT} s"
        with open(self.log_path, errors="replace") as f:
            return rc, f.read()[-6000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()  # its loader workers follow their parent
            self.proc.wait()

    def check(self):
        rc, tail = self.wait()
        assert rc == 0, f"train.py exited {rc}:\n{tail}"
        return tail


# The training runs each test reads: the fixture starts only those of the selected tests
# (``-k dali`` starts the DALI run alone).
NEEDS = {"test_zero_stage_trains": [f"zero{s}" for s in STAGES],
         "test_step_statistics_reach_the_monitor": ["zero1"],
         "test_resume_matches_a_straight_run": ["straight", "first"],
         "test_dali_loader_trains": ["dali"],
         "test_compiled_blocks_train": ["compile", "zero1"]}


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory, request):
    """The training runs of the selected tests of this file, started together."""
    tmp = tmp_path_factory.mktemp("gpu_runs")
    wanted = {name for item in request.session.items
              if getattr(item, "path", None) == request.path
              for name in NEEDS.get(getattr(item, "originalname", item.name), [])}
    started = {}

    def start(name, ds, steps, *extra):
        if name in wanted:
            folder = str(tmp / name)
            started[name] = Run(folder, train_args(demo_root, folder, ds, steps, *extra))

    for stage, ds in STAGES.items():
        start(f"zero{stage}", ds, 20)
    start("straight", "zero1_bf16.json", 10)
    start("first", "zero1_bf16.json", 5)
    start("compile", "zero1_bf16.json", 5, "meta.compile=inductor")
    if dali_importable():
        start("dali", "zero1_bf16.json", 10, "data.loader=dali")
    # the resumed half continues "first" in its folder; its 5-step weights are kept aside
    # (the resumed run overwrites the weights file)
    first = started.get("first")
    if first is not None and first.wait()[0] == 0:
        shutil.copy(os.path.join(first.folder, "demo-target.safetensors"),
                    os.path.join(str(tmp), "first5.safetensors"))
        started["resumed"] = Run(first.folder, train_args(demo_root, first.folder,
                                                          "zero1_bf16.json", 10, "--resume"),
                                 log=first.folder + "_resumed.log")
    yield started
    for run in started.values():
        run.stop()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_stage_trains(runs, stage):
    """20 steps at ZeRO-0 (fp32) and ZeRO-1/2/3 (bf16): 4 logged rows, finite, no skipped
    step, and the loss falls by more than 0.05 (these runs on the CPU gave 5.78, 5.61, 5.58,
    5.54 at steps 5-20 at every stage: most of the fall is the me-max term's, early)."""
    run = runs[f"zero{stage}"]
    run.check()
    rows = metrics(run.folder)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses), losses
    assert all(r["skipped"] == 0 for r in rows), rows
    assert losses[-1] < losses[0] - 0.05, losses
    assert rows[-1]["peak_mem_gib"] > 0  # torch.cuda.max_memory_allocated: the GPU was used
    w = weights(os.path.join(run.folder, "demo-target.safetensors"))
    assert torch.isfinite(w).all()
    print(f"ZeRO-{stage} {STAGES[stage]}: losses {[round(x, 4) for x in losses]}, "
          f"{rows[-1]['img_per_s']:.0f} img/s")


def test_step_statistics_reach_the_monitor(runs):
    """ZeRO-1 bf16: every logged row carries the gradient norm (DeepSpeed's, read at the
    logging step) and the skip count, both on the step's device (Monitor.update raises on a
    stray CPU tensor, which would end the run at its first log)."""
    run = runs["zero1"]
    run.check()
    rows = metrics(run.folder)
    assert rows and all("grad_norm" in r and "skipped" in r for r in rows), rows
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows), rows


def test_resume_matches_a_straight_run(runs):
    """ZeRO-1 bf16: 10 steps straight vs 5, then ``--resume`` for 5 more. The target
    weights must agree to far less than what the last 5 steps moved them (a lost optimiser
    state or a replayed batch moves them by about that much); GPU kernels may reduce in
    another order from run to run, so bit-identity is reported, not required."""
    straight = runs["straight"]
    straight.check()
    assert "resumed" in runs, "the first half failed: " + runs["first"].wait()[1]
    tail = runs["resumed"].check()
    assert "resumed at step 5" in tail, tail
    folder = runs["first"].folder
    a = weights(os.path.join(straight.folder, "demo-target.safetensors"))
    b = weights(os.path.join(folder, "demo-target.safetensors"))
    w5 = weights(os.path.join(os.path.dirname(folder), "first5.safetensors"))
    diff, moved = (a - b).norm().item(), (a - w5).norm().item()
    identical = torch.equal(a, b)
    print(f"resume: bit-identical={identical}, |straight - resumed| = {diff:.3e} "
          f"({diff / a.norm().item():.2e} relative), "
          f"max |diff| = {(a - b).abs().max().item():.3e}, |step 10 - step 5| = {moved:.3e}")
    assert moved > 0
    assert diff < 0.05 * moved, (diff, moved)
    rows_a = {r["step"]: r for r in metrics(straight.folder)}
    rows_b = {r["step"]: r for r in metrics(folder)}
    assert rows_b[10]["loss"] == pytest.approx(rows_a[10]["loss"], rel=1e-2)


def test_dali_loader_trains(runs):
    """data.loader=dali: DALI decodes and augments on the GPU, 10 steps."""
    if "dali" not in runs:
        pytest.skip("NVIDIA DALI is not importable (nvidia-dali-cuda130 not installed)")
    run = runs["dali"]
    tail = run.check()
    assert "data: DALI loader (GPU 0" in tail, tail
    rows = metrics(run.folder)
    assert [r["step"] for r in rows] == [5, 10]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows), rows
    print(f"DALI: losses {[round(r['loss'], 4) for r in rows]}, "
          f"data wait {rows[-1]['data_wait_frac']:.2f}")


def test_compiled_blocks_train(runs):
    """meta.compile=inductor, 5 steps: runs, and its loss is eager's (the same images and
    masks; compiled kernels only round differently)."""
    run = runs["compile"]
    run.check()
    rows = metrics(run.folder)
    assert [r["step"] for r in rows] == [5] and math.isfinite(rows[0]["loss"])
    eager = runs["zero1"]
    eager.check()
    assert rows[0]["loss"] == pytest.approx(metrics(eager.folder)[0]["loss"], rel=2e-2)


def test_fused_adamw_on_cuda():
    """build_optimizer gives torch's fused AdamW on CUDA, and its device-side skip works:
    ``found_inf`` = 1 leaves the parameters alone, 0 updates them."""
    from msn_ds.config import load_config
    from msn_ds.deepspeed_config import read_ds_config
    from msn_ds.engine import build_models, build_optimizer, param_groups

    cfg = load_config(os.path.join(ROOT, "configs/demo_cpu.yaml"), check_paths=False)
    model, _ = build_models(cfg)
    model.cuda()
    opt = build_optimizer(param_groups(model),
                          read_ds_config(os.path.join(ROOT, "ds_configs/zero1_bf16.json")))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    for group in opt.param_groups:
        group["lr"] = 1e-3
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones((), device="cuda")
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.found_inf = torch.zeros((), device="cuda")
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


def test_attention_is_flash_in_bf16(monkeypatch):
    """ViT-S/16 in bf16, forward and backward of one multi-view batch with only the flash
    SDPA backend allowed (any fallback raises): timm's blocks use
    F.scaled_dot_product_attention (``fused_attn``), once per block and view group."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from msn_ds.models import MSNEncoder

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    enc = MSNEncoder("vit_small_16").cuda().to(torch.bfloat16)
    blocks = enc.backbone.blocks
    assert all(b.attn.fused_attn for b in blocks), "timm's attention is not the fused path"
    g = torch.Generator(device="cuda").manual_seed(0)
    views = [torch.randn(16, 3, s, s, device="cuda", dtype=torch.bfloat16, generator=g)
             for s in (224, 96, 96)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        z = enc(views, masked_views=1, mask_ratio=0.15)
        z.float().square().mean().backward()
    assert len(calls) == 2 * len(blocks)  # two view groups: 224 px (masked), 96 px
    assert calls[0][2] == 1 + int(196 * 0.85) and calls[-1][2] == 1 + 36, calls
    assert torch.isfinite(z).all()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
