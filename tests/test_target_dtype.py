"""``meta.target_dtype``: the target (EMA) encoder computing in fp32 under a bf16 engine.

In process, through a stand-in for DeepSpeed's ZeRO-0 mixed-precision optimiser (its flat
bf16 weights and flat fp32 masters, the layout ``msn_ds.ema.PartitionedEMA`` reads): the
default keeps today's bf16 target, ``fp32`` holds the fp32 EMA itself (no second copy) and
computes in fp32, the loss's targets differ from a bf16 target's, and both targets save
and load the same fp32 state. The real engines at ZeRO-0 to 3 (2 processes):
tests/test_ema_master.py. Default bit-identical to the code before the key (6 ZeRO-1 bf16
steps of the demo, weights file and metrics.jsonl): checked by hand, docs/testing.md."""
import pytest
import torch

from helpers import ROOT
from msn_ds.config import ConfigError, load_config
from msn_ds.ema import make_target
from msn_ds.engine import init_target
from msn_ds.loss import MSNLoss, sharpen_log
from msn_ds.models import MSNEncoder, MSNModel
from msn_ds.trainer import MSNTrainer, build_criterion, build_schedules, step_options

BF16 = torch.bfloat16


class FP16_Optimizer:  # noqa: N801 (the name msn_ds.ema._optimizer_layout dispatches on)
    """DeepSpeed's ZeRO-0 bf16 optimiser as the EMA sees it: each group's parameters are
    views of one flat bf16 buffer, its fp32 masters one flat fp32 tensor. ``step`` is SGD on
    the masters, copied back into the bf16 weights (what the real one does, less AdamW)."""

    def __init__(self, params):
        self.fp16_groups = [list(params)]
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.fp16_groups[0]])
        self.fp32_groups_flat = [flat]
        self.fp16_groups_flat = [flat.to(BF16)]
        offset = 0
        for p in self.fp16_groups[0]:
            p.data = self.fp16_groups_flat[0].narrow(0, offset, p.numel()).view_as(p)
            offset += p.numel()
        self.param_groups = [{"params": self.fp16_groups[0], "lr": 0.0, "weight_decay": 0.0}]

    @torch.no_grad()
    def step(self, lr=0.05):
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                           .reshape(-1).float() for p in self.fp16_groups[0]])
        self.fp32_groups_flat[0].add_(grads, alpha=-lr)
        self.fp16_groups_flat[0].copy_(self.fp32_groups_flat[0])
        for p in self.fp16_groups[0]:
            p.grad = None


class Engine:
    """The parts of DeepSpeed's engine that init_target and MSNTrainer use."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")
        self.optimizer = FP16_Optimizer(model.parameters())

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()

    def zero_optimization_stage(self):
        return 0

    def get_global_grad_norm(self):
        return None


def demo_cfg(*overrides):
    return load_config(f"{ROOT}/configs/demo_cpu.yaml",
                       ["data.root_path=/nonexistent", "criterion.num_proto=16",
                        "meta.hidden_dim=64", "meta.output_dim=32", *overrides],
                       check_paths=False)


def built(target_dtype):
    """A bf16 'engine' and the target init_target makes for it, from the same init."""
    torch.manual_seed(0)
    encoder = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=64, output_dim=32)
    model = MSNModel(encoder, 16, 32)
    target = make_target(encoder)
    engine = Engine(model)
    target, ema = init_target(target, engine, {"zero_optimization": {"stage": 0}}, target_dtype)
    return engine, target, ema


def test_config_key():
    assert demo_cfg()["meta"]["target_dtype"] == "model"
    assert demo_cfg("meta.target_dtype=fp32")["meta"]["target_dtype"] == "fp32"
    for bad in ("bf16", "float32", "FP32"):
        with pytest.raises(ConfigError, match=r"meta.target_dtype must be one of model, fp32"):
            demo_cfg(f"meta.target_dtype={bad}")
    with pytest.raises(ConfigError, match=r"meta.target_dtype must be str"):
        demo_cfg("meta.target_dtype=32")


def test_default_target_is_bf16_and_fp32_target_holds_the_ema():
    (e16, t16, ema16), (e32, t32, ema32) = built("model"), built("fp32")
    assert {p.dtype for p in t16.parameters()} == {BF16}
    assert {p.dtype for p in t32.parameters()} == {torch.float32}
    assert {b.dtype for b in t32.buffers() if b.is_floating_point()} == {torch.float32}
    g16, g32 = ema16.groups[0], ema32.groups[0]
    assert not g16.shared and g32.shared  # the fp32 target's weights are the EMA itself
    assert g32.ema.data_ptr() == g32.flat.data_ptr()
    reference = g32.master.clone().double()
    gen = torch.Generator().manual_seed(1)
    for m, gate in ((0.9, 1.0), (0.8, 0.0), (0.7, 1.0)):
        noise = torch.randn(g32.master.shape, generator=gen) * 1e-2
        for e in (e16, e32):
            e.optimizer.fp32_groups_flat[0].add_(noise)
        if gate:
            reference.mul_(m).add_((1 - m) * g32.master.double())
        ema16.update(m, gate=torch.tensor(gate))
        ema32.update(m, gate=torch.tensor(gate))
    assert torch.equal(g16.ema, g32.ema)  # one fp32 EMA, whichever dtype computes
    assert (g32.ema.double() - reference).abs().max() < 1e-6
    for (name, a), b in zip(t32.named_parameters(), t16.parameters()):
        assert torch.equal(b, a.to(BF16)), name  # bf16: the fp32 EMA rounded once
    # the same fp32 state either way: a checkpoint of one loads into the other
    s16, s32 = ema16.state_dict(), ema32.state_dict()
    assert s16.keys() == s32.keys() and all(torch.equal(s16[k], s32[k]) for k in s16)
    fresh = built("fp32")[2]
    fresh.load_state_dict(s16)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), t32.parameters()))


def test_fp32_target_changes_the_loss_targets():
    """Same weights, same batch: the fp32 target's head output and the sharpened targets the
    loss builds from it differ from the bf16 target's by bf16's rounding."""
    (_, t16, _), (_, t32, _) = built("model"), built("fp32")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z16, z32 = t16(x.to(BF16)), t32(x)
    assert z16.dtype == BF16 and z32.dtype == torch.float32
    rel = ((z16.float() - z32).norm() / z32.norm()).item()
    assert 1e-3 < rel < 0.1, rel
    crit, protos = MSNLoss(), torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    t_16, t_32 = (sharpen_log(crit.soft_nn(z.float(), protos)[1], 0.25) for z in (z16, z32))
    assert 1e-3 < ((t_16 - t_32).norm() / t_32.norm()).item() < 0.5


@pytest.mark.parametrize("target_dtype,want", [("model", BF16), ("fp32", torch.float32)])
def test_trainer_feeds_the_target_in_its_dtype(target_dtype, want):
    """MSNTrainer.step: the target's view is cast to the target's dtype and its output
    reaches the loss in it; the step trains and the EMA follows."""
    cfg = demo_cfg(f"meta.target_dtype={target_dtype}")
    engine, target, ema = built(target_dtype)
    seen = []
    crit = build_criterion(cfg)
    real = crit.forward
    crit.forward = lambda a, t, *r: (seen.append(t.dtype), real(a, t, *r))[1]
    trainer = MSNTrainer(engine, target, ema, crit, build_schedules(cfg, steps_per_epoch=10),
                         **step_options(cfg))
    assert trainer.target_dtype == want
    d = cfg["data"]
    sizes = [d["rand_size"]] * (1 + d["rand_views"]) + [d["focal_size"]] * d["focal_views"]
    views = [torch.randn(4, 3, s, s) for s in sizes]
    before = [p.detach().clone() for p in target.parameters()]
    out = trainer.step(views, 0)
    assert seen == [want] and torch.isfinite(out.loss) and out.skipped.item() == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters()))
