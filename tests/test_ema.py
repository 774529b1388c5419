"""The target update: fp32 EMA over every parameter, buffers untouched, no gradients."""
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


def test_fp32_target_absorbs_small_updates_from_bf16():
    """A bf16 online model still moves an fp32 target by (1 - m) * delta as m -> 1."""
    target = [torch.ones(1000)]
    online = [torch.full((1000,), 1.5, dtype=torch.bfloat16)]
    m = 0.9999
    for _ in range(10):
        ema_update_(target, online, m)
    want = 1.5 - 0.5 * m ** 10
    torch.testing.assert_close(target[0], torch.full((1000,), want), atol=1e-6, rtol=0)
    assert target[0].dtype == torch.float32
