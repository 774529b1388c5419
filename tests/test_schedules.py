"""Schedules: end points, the reference's off-by-one, purity."""
import pytest

from msn_ds.schedules import Schedules


@pytest.fixture
def s():
    return Schedules(steps_per_epoch=100, epochs=20, warmup_epochs=2)


def test_end_points(s):
    assert s.total_steps == 2000 and s.horizon == 2500 and s.warmup_steps == 200
    # lr: the reference's scheduler steps before the optimiser, so step 0 already moved once
    assert s.lr(0) == pytest.approx(2e-4 + (1e-3 - 2e-4) / 200)
    assert s.lr(199) == pytest.approx(1e-3)
    assert s.lr(2499) == pytest.approx(1e-6)
    assert s.lr(10 ** 6) == pytest.approx(1e-6)
    # weight decay rises from 0.04 to 0.4 on the 1.25x horizon
    assert s.wd(-1) == pytest.approx(0.04)
    assert s.wd(2499) == pytest.approx(0.4)
    # momentum 0.996 -> 1 and sharpening linear on the same horizon
    assert s.momentum(0) == pytest.approx(0.996)
    assert s.momentum(2500) == pytest.approx(1.0)
    assert s.momentum(2000) == pytest.approx(0.996 + 0.004 * 0.8)
    assert s.sharpen(0) == 0.25 and s.sharpen(2500) == 0.25


def test_training_stops_at_80_percent_of_cosine(s):
    last = s.total_steps - 1
    progress = (last + 1 - s.warmup_steps) / (s.horizon - s.warmup_steps)
    import math
    want = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
    assert s.lr(last) == pytest.approx(want)
    assert s.lr(last) > 1e-4  # still well above final_lr


def test_sharpen_schedule_and_purity():
    s = Schedules(steps_per_epoch=10, epochs=4, start_sharpen=0.25, final_sharpen=0.1)
    assert s.sharpen(25) == pytest.approx(0.25 + (0.1 - 0.25) * 0.5)
    assert [s.at(7) for _ in range(3)] == [s.at(7)] * 3  # a function of the step only
    assert s.lr(3) < s.lr(4)  # warm-up rises
