"""The target update: fp32 EMA over every parameter, buffers untouched, no gradients."""
import pytest
import torch

from msn_ds.ema import ema_update_, make_target
from msn_ds.models import MSNEncoder


def test_ema_formula_and_buffers():
    torch.manual_seed(0)
    online = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16)
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online.head.bn1.running_mean.fill_(5.0)
    m = 0.9
    ema_update_(target.parameters(), online.parameters(), m)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, m * b + (1 - m) * o, atol=1e-6, rtol=1e-6)
    assert target.head.bn1.running_mean.abs().max() == 0  # buffers are not averaged


def test_fp32_ema_absorbs_small_updates():
    """The EMA state is fp32 (fed by the fp32 masters): it moves by (1 - m) * delta as
    m -> 1, which a bf16 copy could not (0.5 * 1e-4 is below bf16's resolution at 1)."""
    target = [torch.ones(1000)]
    online = [torch.full((1000,), 1.5)]
    m = 0.9999
    for _ in range(10):
        ema_update_(target, online, m)
    want = 1.5 - 0.5 * m ** 10
    torch.testing.assert_close(target[0], torch.full((1000,), want), atol=1e-6, rtol=0)
    assert target[0].dtype == torch.float32
    assert torch.equal(target[0].bfloat16(), torch.ones(1000, dtype=torch.bfloat16))


def test_ema_refuses_a_low_precision_source():
    """The source must be the fp32 masters: a bf16 source would need a cast (a full copy
    every step) and would average rounded weights."""
    with pytest.raises(TypeError, match="fp32 masters"):
        ema_update_([torch.ones(4)], [torch.ones(4, dtype=torch.bfloat16)], 0.9)


def test_gate_skips_on_the_device():
    """gate=0 (a non-finite step) leaves the target bit-identical; gate=1 is the plain update."""
    target, online = [torch.randn(64), torch.randn(3, 5)], [torch.randn(64), torch.randn(3, 5)]
    before = [t.clone() for t in target]
    ema_update_(target, online, 0.9, gate=torch.tensor(0.0))
    assert all(torch.equal(t, b) for t, b in zip(target, before))
    ema_update_(target, online, 0.9, gate=torch.tensor(1.0))
    plain = [b.clone() for b in before]
    ema_update_(plain, online, 0.9)
    assert all(torch.equal(t, p) for t, p in zip(target, plain))
