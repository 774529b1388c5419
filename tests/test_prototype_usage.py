"""TensorBoard's ``train/prototype_usage``: the loss's per-prototype target argmax hits
(``proto_hits``), summed on the device over a log interval and written as a histogram at
log steps only; never in the progress line or ``metrics.jsonl``. In process."""
import json

import torch

from msn_ds.loss import MSNLoss
from msn_ds.monitor.progress import Monitor

HPARAMS = {"lr": 1e-3, "wd": 0.04, "momentum": 0.996, "T": 0.25}
META = torch.device("meta")


def step_stats(seed: int, batch: int = 8, num_proto: int = 6):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_proto, 4, generator=g)
    loss, stats = MSNLoss(use_sinkhorn=False)(torch.randn(2 * batch, 4, generator=g),
                                              torch.randn(batch, 4, generator=g), protos)
    return dict(stats, loss=loss.detach(), skipped=torch.zeros(()))


def test_hits_are_argmax_counts():
    stats = step_stats(0)
    hits = stats["proto_hits"]
    assert hits.shape == (6,) and hits.sum().item() == 8  # one hit per image
    assert (hits > 0).sum().item() == stats["np"].item()


def test_histogram_written_at_log_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (HISTOGRAMS,
                                                                        EventAccumulator)

    monitor = Monitor(str(tmp_path), total_steps=4, global_batch=8, log_every=2)
    steps = [step_stats(s) for s in range(4)]
    for step, stats in enumerate(steps, 1):
        monitor.update(stats)
        if monitor.due(step):
            monitor.log(step, 0, HPARAMS)
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    assert "train/prototype_usage" in acc.Tags()["histograms"]
    events = acc.Histograms("train/prototype_usage")
    assert [e.step for e in events] == [2, 4]  # log steps only
    for e, interval in zip(events, (steps[:2], steps[2:])):
        want = sum(s["proto_hits"] for s in interval)  # summed over the interval's steps
        h = e.histogram_value
        assert h.num == 6 and h.sum == want.sum().item() == 16
        assert h.min == want.min().item() and h.max == want.max().item()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("proto_hits" not in x and "np" in x for x in lines)  # np stays a scalar


def test_update_reads_nothing_and_needs_no_writer(tmp_path):
    """On the ``meta`` device (any read of a value raises) the interval sum stays on the
    device; without TensorBoard the vector is not even kept."""
    stats = {"proto_hits": torch.zeros(6, device=META), "loss": torch.zeros((), device=META)}
    monitor = Monitor(str(tmp_path / "a"), 10, 8, log_every=5, device=META)
    monitor.update(stats)
    monitor.update(stats)
    assert monitor._vectors["proto_hits"].device == META
    monitor.close()
    quiet = Monitor(str(tmp_path / "b"), 10, 8, log_every=5, tensorboard=False, device=META)
    quiet.update(stats)
    assert quiet._vectors == {} and set(quiet._sums) == {"loss"}
