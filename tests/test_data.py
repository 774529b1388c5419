"""Data: world-size-invariant global batches, seeded views, unreadable images skipped."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from msn_ds.data import GlobalBatchSampler, MultiCropTransform, MultiViewImageFolder, collate_views


def batches(sampler):
    items = list(sampler)
    return [items[i:i + sampler.batch_size] for i in range(0, len(items), sampler.batch_size)]


def test_global_batches_do_not_depend_on_world_size():
    one = GlobalBatchSampler(103, 8, world_size=1, rank=0, seed=3)
    two = [GlobalBatchSampler(103, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(5)
    joined = [a + b for a, b in zip(*(batches(s) for s in two))]
    assert batches(one) == joined and len(joined) == 103 // 8
    one.set_epoch(6)
    assert batches(one) != joined  # a new order each epoch
    one.set_epoch(5, start_batch=4)
    assert batches(one) == joined[4:]  # resuming inside an epoch


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    (tmp_path / "train" / "c0" / "1.png").write_bytes(b"not a png")  # corrupt
    return str(tmp_path / "train")


def test_views_seeded_by_epoch_and_index(folder):
    ds = MultiViewImageFolder(folder, MultiCropTransform(16, 8, 1, 2), seed=0)
    a, _, _ = ds[(0, 0)]
    b, _, _ = ds[(0, 0)]
    c, _, _ = ds[(1, 0)]
    assert len(a) == 4 and a[0].shape == (3, 16, 16) and a[3].shape == (3, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # target and anchor are independent crops


def test_unreadable_image_is_skipped_and_counted(folder):
    ds = MultiViewImageFolder(folder, MultiCropTransform(16, 8, 1, 2), seed=0)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("c0/1.png")][0]
    views, label, skipped = ds[(0, bad)]
    assert skipped == 1 and label == ds.samples[bad + 1][1]
    v, labels, total = collate_views([ds[(0, 0)], ds[(0, bad)]])
    assert total == 1 and v[0].shape == (2, 3, 16, 16) and labels.tolist() == [0, 0]


def test_small_dev_shm_is_refused_with_the_fix(tmp_path):
    """Loader workers hand batches over through /dev/shm: one too small for the batches in
    flight is named before any work, with the fix; a large enough one, no workers, or DALI
    pass."""
    from msn_ds.data.loader import batch_bytes, shm_problem

    data = {"loader": "torch", "num_workers": 8, "rand_views": 1, "rand_size": 224,
            "focal_views": 10, "focal_size": 96}
    assert batch_bytes(data, 64) == 64 * 3 * 4 * (2 * 224 ** 2 + 10 * 96 ** 2)

    class Usage:  # shutil.disk_usage of a 64 MiB /dev/shm (Docker's default)
        free = 64 * 2 ** 20

    import shutil
    real = shutil.disk_usage
    shutil.disk_usage = lambda path: Usage
    try:
        problem = shm_problem(data, 64)
        assert "data.num_workers=8" in problem and "64 MiB free" in problem
        assert "--shm-size" in problem
        assert shm_problem({**data, "num_workers": 0}, 64) is None
        assert shm_problem({**data, "loader": "dali"}, 64) is None
        assert shm_problem({**data, "num_workers": 1, "rand_size": 32, "focal_size": 16}, 8) is None
    finally:
        shutil.disk_usage = real


def test_unlabelled_folder_is_one_source_of_label_0(tmp_path):
    """Images directly in the folder (and in sub-folders of any depth below it): one set,
    label 0; a folder of class sub-folders stays an ImageFolder."""
    from PIL import Image

    from msn_ds.data.source import FolderSource

    flat = tmp_path / "flat"
    (flat / "a" / "b").mkdir(parents=True)
    for i, where in enumerate(["", "", "a", "a/b"]):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(flat / where / f"img{i}.jpg")
    src = FolderSource(str(flat))
    assert sorted(os.path.relpath(p, flat) for p, _ in src.samples) == [
        "a/b/img3.jpg", "a/img2.jpg", "img0.jpg", "img1.jpg"]
    assert src.targets == [0, 0, 0, 0] and len(src.classes) == 1
    labelled = tmp_path / "labelled"
    for c in ("x", "y"):
        (labelled / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(labelled / c / "i.jpg")
    assert FolderSource(str(labelled)).targets == [0, 1]
