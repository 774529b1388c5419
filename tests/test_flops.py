"""The MFU numerator: the documented FLOP formula against torch's own FLOP counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from msn_ds.config import load_config
from msn_ds.engine import build_models
from msn_ds.trainer import build_criterion
from msn_ds.models.vit import resolve_arch
from msn_ds.monitor.flops import StepShape, head_forward_flops, mfu, vit_forward_flops


def counted_step_flops(cfg: dict, batch: int) -> int:
    """FLOPs torch counts for one real step's forward and backward (per image)."""
    model, target = build_models(cfg)
    crit = build_criterion(cfg)
    d = cfg["data"]
    views = [torch.randn(batch, 3, d["rand_size"], d["rand_size"])
             for _ in range(1 + d["rand_views"])]
    views += [torch.randn(batch, 3, d["focal_size"], d["focal_size"])
              for _ in range(d["focal_views"])]
    # The math backend: the counter has no formula for the CPU's fused attention kernel.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            target_z = target(views[0])
            target_logits = target_z @ model.prototypes.weight.T  # what the loss adds
        anchor_z, protos = model(views[1:], masked_views=d["rand_views"],
                                 mask_ratio=d["patch_drop"])
        loss, _ = crit(anchor_z, target_z, protos)
        loss.backward()
    # the loss's target logits run under no_grad inside the criterion as well
    return (counter.get_total_flops() - target_logits.numel() * 2 * protos.shape[1]) // batch


@pytest.mark.slow
@pytest.mark.parametrize("arch,rand,focal,drop", [("vit_pico_4", 32, 16, 0.15),
                                                   ("vit_pico_8", 48, 24, 0.3)])
def test_formula_matches_torch_flop_counter(arch, rand, focal, drop):
    cfg = load_config("configs/demo_cpu.yaml", [f"meta.model_name={arch}", f"data.rand_size={rand}",
                                                f"data.focal_size={focal}", f"data.patch_drop={drop}"],
                      check_paths=False)
    formula = StepShape.from_config(cfg).flops_per_image()
    counted = counted_step_flops(cfg, batch=4)
    # The counter also sees the loss's small products; the formula counts the patch-embedding
    # backward twice although its input needs no gradient. Measured: within 1 %.
    assert counted == pytest.approx(formula, rel=0.01), (counted, formula)


def test_formula_by_hand_and_mfu():
    spec = resolve_arch("vit_small_16")  # d 384, 12 blocks; 224 px: 196 patches + cls
    n, d = 197, 384
    assert vit_forward_flops(spec, 224) == 2 * 196 * 768 * d + 12 * (24 * n * d * d + 4 * n * n * d)
    kept = int(196 * 0.85)  # 166
    assert vit_forward_flops(spec, 224, 0.15) == (2 * 196 * 768 * d + 12 * (
        24 * (kept + 1) * d * d + 4 * (kept + 1) ** 2 * d))
    assert head_forward_flops(384, 2048, 256, 1024) == 2 * (384 * 2048 + 2048 ** 2 + 2048 * 256
                                                            + 256 * 1024)
    assert vit_forward_flops(spec, 224) / 1e9 == pytest.approx(9.2, abs=0.05)  # 4.6 GMACs
    per_image = StepShape("vit_small_16").flops_per_image()  # target + 3 x (anchor + 10 focal)
    assert per_image / 1e9 == pytest.approx(81.3, abs=0.1)
    assert mfu(1000.0, per_image, None) is None
    assert mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
