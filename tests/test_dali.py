"""DALI loader vs the torchvision loader: same parameters, same statistics, same skips.

The DALI loader replays the torch path's random draws (msn_ds/data/replay.py), so the two
should agree view by view, not only in distribution. Measured on synthetic smooth images
(this machine): mean |difference| 0.002 (in [0, 1] pixel units) for views without colour
jitter, 0.03 with it (hue is a rotation in DALI, an HSV shift in torchvision); output
mean/std per channel within 0.01.
"""
import gc
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from msn_ds.config import ConfigError, defaults, load_config
from msn_ds.data import (IMAGENET_MEAN, IMAGENET_STD, GlobalBatchSampler, MultiCropTransform,
                         MultiViewImageFolder, collate_views)
from msn_ds.data.loader import build_pretrain_data, resolve_loader
from msn_ds.data.replay import replay
from msn_ds.data.transforms import view_transform
from helpers import loader_source, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def smooth_image(rng, h, w):
    base = Image.fromarray((rng.random((h // 8 + 2, w // 8 + 2, 3)) * 255).astype(np.uint8))
    return base.resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 small images of random sizes and aspect ratios, half JPEG, half PNG."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    rng = np.random.default_rng(0)
    for i in range(64):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(40, 120, 2)
        smooth_image(rng, int(h), int(w)).save(d / f"{i}.{'jpg' if i % 2 else 'png'}", quality=95)
    return str(root)


def apply_params(img, p, size):
    """Apply replayed parameters with torchvision's functional ops, in the torch path's order."""
    x = F.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], antialias=True)
    if p.flip:
        x = F.horizontal_flip(x)
    x = F.to_image(x)
    if p.jitter is not None:
        ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        keys = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
        for k in p.jitter["fn_idx"].tolist():
            if p.jitter[keys[k]] is not None:
                x = ops[k](x, p.jitter[keys[k]])
    if p.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.sigma is not None:
        x = F.gaussian_blur(x, [p.kernel, p.kernel], [p.sigma, p.sigma])
    return F.normalize(F.to_dtype(x, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.slow
def test_replay_reproduces_torchvision_bit_for_bit():
    rng = np.random.default_rng(1)
    img = Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8))
    t = view_transform(24, (0.3, 1.0))
    for seed in range(200):
        torch.manual_seed(seed)
        expected = t(img)
        after_transform = torch.rand(1)
        torch.manual_seed(seed)
        p = replay(t, 50, 70)
        assert torch.rand(1) == after_transform  # the same number of draws
        assert torch.equal(apply_params(img, p, 24), expected), seed


def test_loader_config_key(tmp_path):
    assert defaults()["data"]["loader"] == "torch"  # until the DALI GPU path has run on a GPU
    with pytest.raises(ConfigError, match=r"data\.loader.*dali, torch|data\.loader must be one"):
        load_config(None, ["data.loader=fast"], check_paths=False)
    from msn_ds.data.dali import dali_available

    gpu_dali = torch.cuda.is_available() and dali_available()
    assert resolve_loader("auto") == ("dali" if gpu_dali else "torch")


class Recording:
    """Wraps a view transform's random steps to record what the torch path really applies."""

    def __init__(self, transform):
        self.crops, self.flips, self.jitters, self.grays, self.sigmas = [], 0, 0, 0, []
        self.calls = 0
        for t in transform.transforms:
            name = type(t).__name__
            if name == "RandomResizedCrop":
                t.make_params = self._wrap(t.make_params, self.crops.append)
            elif name == "RandomHorizontalFlip":
                t.transform = self._count(t.transform, "flips")
            elif name == "RandomGrayscale":
                t.transform = self._count(t.transform, "grays")
            elif name == "RandomApply":
                inner = t.transforms[0]
                if type(inner).__name__ == "ColorJitter":
                    inner.make_params = self._wrap(inner.make_params,
                                                   lambda _: self._inc("jitters"))
                else:
                    inner.make_params = self._wrap(inner.make_params,
                                                   lambda r: self.sigmas.append(r["sigma"][0]))

    def _inc(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def _wrap(self, fn, record):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            record(out)
            return out
        return wrapped

    def _count(self, fn, name):
        def wrapped(inpt, params):
            if not params.get("_counted"):
                self._inc(name)
            return fn(inpt, params)
        return wrapped


def run_both(folder, transform_args, batch, epochs):
    """Both loaders over the same images and seeds; the torch path's transforms recorded,
    the DALI path's per-view argument vectors and image sizes captured as fed."""
    from msn_ds.data.dali import DaliMultiCropLoader

    tf_torch, tf_dali = MultiCropTransform(*transform_args), MultiCropTransform(*transform_args)
    rec = Recording(tf_torch.rand), Recording(tf_torch.focal)
    ds_torch = MultiViewImageFolder(folder, tf_torch, seed=0)
    ds_dali = MultiViewImageFolder(folder, tf_dali, seed=0)
    s_torch = GlobalBatchSampler(len(ds_torch), batch, seed=0)
    s_dali = GlobalBatchSampler(len(ds_dali), batch, seed=0)
    dali = DaliMultiCropLoader(ds_dali, s_dali, num_threads=2)
    fed, sizes = [], []
    host_batch = dali.host.batch

    def recording_host_batch(items):
        out = host_batch(items)
        fed.append(np.stack([np.stack(v) for v in out[2]]))  # (views, B, params)
        sizes.append(np.stack([dali.host.shape[i] for _, i in items]))
        return out

    dali.host.batch = recording_host_batch
    torch_loader = torch.utils.data.DataLoader(ds_torch, batch_size=batch, sampler=s_torch,
                                               collate_fn=collate_views)
    d_out, t_out = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; tiny ops crawl with 2 threads here
    try:
        for epoch in range(epochs):
            s_dali.set_epoch(epoch)
            s_torch.set_epoch(epoch)
            d_out += list(dali)
            t_out += list(torch_loader)
    finally:
        torch.set_num_threads(threads)
    return rec, np.concatenate(fed, axis=1), np.concatenate(sizes), d_out, t_out


@pytest.mark.slow
def test_dali_matches_torchvision_statistics(folder):
    pytest.importorskip("nvidia.dali")
    batch, epochs = 32, 40  # 2 560 samples x 6 views
    rec, fed, sizes, d_out, t_out = run_both(folder, (32, 16, 1, 4), batch, epochs)
    n = len(d_out) * batch
    assert n == 2560 and len(t_out) == len(d_out) and len(sizes) == n
    for (dv, dl, ds), (tv, tl, ts) in zip(d_out, t_out):
        assert torch.equal(dl, tl) and ds == ts == 0

    # parameters: the torch path's (recorded inside torchvision, sample-major) vs those fed
    # to DALI (view-major)
    area = (sizes[:, 0] * sizes[:, 1]).astype(float)
    for name, r, f, scale in [("rand", rec[0], fed[:2], (0.3, 1.0)),
                              ("focal", rec[1], fed[2:], (0.05, 0.3))]:
        k = f.shape[0]
        f = f.transpose(1, 0, 2).reshape(-1, 11)
        views = len(f)
        assert len(r.crops) == views
        t_h = np.array([c["height"] for c in r.crops], float)
        t_w = np.array([c["width"] for c in r.crops], float)
        d_h, d_w = f[:, 2] - f[:, 0], f[:, 3] - f[:, 1]
        assert np.array_equal(t_h, d_h) and np.array_equal(t_w, d_w)  # replayed exactly
        img_area = np.repeat(area, k)
        for t_x, d_x, lo, hi in [(t_h * t_w / img_area, d_h * d_w / img_area, *scale),
                                 (np.log(t_w / t_h), np.log(d_w / d_h), -0.288, 0.288)]:
            bins = np.linspace(lo, hi, 11)
            th, _ = np.histogram(t_x, bins)
            dh, _ = np.histogram(d_x, bins)
            assert 0.5 * np.abs(th - dh).sum() / views < 0.02, (name, th, dh)
            assert th.sum() > 0.95 * views, (name, th)  # inside the configured range
        # rates: torch as applied, DALI as fed; both near the nominal probabilities
        sd = lambda p: 4 * np.sqrt(p * (1 - p) / views)  # noqa: E731
        jittered = np.abs(f[:, [5, 6, 8]] - [1, 1, 0]).sum(1) > 0  # s=0 is also gray
        rates = {"flip": (r.flips / views, (f[:, 4] == 1).mean(), 0.5),
                 "jitter": (r.jitters / views, jittered.mean(), 0.8),
                 "gray": (r.grays / views, (f[:, 7] == 0).mean(), 0.2),
                 "blur": (len(r.sigmas) / views, (f[:, 10] > 1).mean(), 0.5)}
        for key, (t_rate, d_rate, p) in rates.items():
            assert abs(t_rate - d_rate) < 0.01, (name, key, t_rate, d_rate)
            assert abs(t_rate - p) < sd(p), (name, key, t_rate, p)
        sig = f[f[:, 10] > 1, 9]
        assert 0.1 <= sig.min() and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05
        assert abs(np.mean(r.sigmas) - sig.mean()) < 1e-3

    # pixels, view by view (de-normalised to [0, 1])
    diffs, flips_ok, gray_d, gray_t = [], [], [], []
    for v in range(6):
        dv = torch.cat([b[0][v] for b in d_out]) * STD + MEAN
        tv = torch.cat([b[0][v] for b in t_out]) * STD + MEAN
        err = (dv - tv).abs().mean((1, 2, 3))
        diffs.append(err)
        flips_ok.append(err < (dv - tv.flip(-1)).abs().mean((1, 2, 3)))
        gray_d.append((dv.amax(1) - dv.amin(1)).amax((1, 2)) < 3 / 255)
        gray_t.append((tv.amax(1) - tv.amin(1)).amax((1, 2)) < 3 / 255)
        for c in range(3):
            assert abs(dv[:, c].mean() - tv[:, c].mean()) < 0.01, (v, c)
            assert abs(dv[:, c].std() - tv[:, c].std()) < 0.01, (v, c)
    err = torch.stack(diffs).flatten()
    no_jitter = torch.from_numpy(np.abs(fed[..., [5, 6, 8]] - [1, 1, 0]).sum(-1) == 0).flatten()
    no_blur = torch.from_numpy(fed[..., 10] == 1).flatten()
    plain = no_jitter & no_blur
    assert plain.sum() > 1000
    assert err[plain].mean() < 0.005 and err[plain].quantile(0.99) < 0.02, err[plain].mean()
    assert err[no_jitter].mean() < 0.006, err[no_jitter].mean()
    assert err.mean() < 0.04 and err.quantile(0.99) < 0.12, (err.mean(), err.quantile(0.99))
    assert torch.cat(flips_ok).float().mean() > 0.98  # each view flipped the same way
    gd, gt = torch.cat(gray_d).float().mean(), torch.cat(gray_t).float().mean()
    assert abs(gd - gt) < 0.01 and abs(gd - 0.2) < 0.04, (gd, gt)


def write_bad_folder(root):
    """Good images plus every kind of awkward file; returns the names that must be skipped."""
    d = root / "c0"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = smooth_image(rng, 48, 64)
    for i in range(4):
        smooth_image(rng, 40 + 8 * i, 60).save(d / f"good{i}.jpg", quality=95)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    png = buf.getvalue()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(3000))
    (d / "notimage.png").write_bytes(b"not an image\n" * 50)
    (d / "readme.txt").write_text("ignored: not an image extension")
    rgb.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    rgb.convert("L").save(d / "gray.jpg", quality=95)
    rgb.convert("L").save(d / "gray.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(d / "gray16.png")
    rgb.convert("P").save(d / "palette.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    import struct
    import zlib

    a = np.asarray(rgb).astype(">u2") * 257
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))

    def chunk(t, b):
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b))

    (d / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b""))
    return {"truncated.jpg", "truncated.png", "zero.jpg", "corrupt.jpg", "notimage.png"}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_bad_files_skipped_and_counted(tmp_path, loader, source, caplog):
    """Also from tar shards written from the folder (data.shards): the same samples skipped
    (named shard.tar:key, mapped back to the folder's names here)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    bad = write_bad_folder(tmp_path / "train")
    shards, path_of = loader_source(source, tmp_path / "train", tmp_path / "shards")
    data = dict(defaults()["data"], num_workers=0 if loader == "torch" else 1, rand_size=32,
                focal_size=16, focal_views=2, color_jitter_strength=0.0, **shards)
    built = build_pretrain_data(data, str(tmp_path / "train"), 8, 0, loader=loader)
    ds, sampler, it = built.dataset, built.sampler, built.loader
    names = [os.path.basename(path_of(p)) for p, _ in ds.samples]
    assert len(names) == 16 and "readme.txt" not in names
    # expected count: each bad index is replaced by the next readable one in folder order
    runs = 0
    for i in range(16):
        k = 0
        while names[(i + k) % 16] in bad:
            k += 1
        runs += k
    sampler.set_epoch(0)
    skipped = sum(s for _, _, s in it)
    assert skipped == runs == 8  # truncated.jpg, truncated.png, zero.jpg are consecutive
    assert sorted(os.path.basename(path_of(p)) for p in built.unreadable()) == sorted(bad)
    if loader == "dali":
        assert sorted(os.path.basename(path_of(p)) for p in it.bad_files) == sorted(bad)
        for v in it:  # a second epoch: bad files are known, still counted
            pass
    assert any("unreadable" in r.getMessage() for r in caplog.records) or loader == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_dali_decodes_odd_formats_like_pil(tmp_path, source):
    """CMYK, grayscale, 16-bit and palette images reach DALI with the torch path's pixels;
    a file DALI cannot decode although the probe passed it is re-checked and skipped. Also
    from tar shards written from the folder (data.shards): DALI fed the shards' bytes."""
    pytest.importorskip("nvidia.dali")
    write_bad_folder(tmp_path / "train")
    shards, path_of = loader_source(source, tmp_path / "train", tmp_path / "shards")
    data = dict(defaults()["data"], num_workers=1, rand_size=32, focal_size=16, focal_views=2,
                color_jitter_strength=0.0, **shards)
    built = build_pretrain_data(data, str(tmp_path / "train"), 16, 0, loader="dali")
    ds, sampler, dali = built.dataset, built.sampler, built.loader
    sampler.set_epoch(0)
    notimage = [i for i, (p, _) in enumerate(ds.samples)
                if path_of(p).endswith("notimage.png")][0]
    dali.host.status[notimage], dali.host.shape[notimage] = 1, (10, 10)  # probe miss: DALI fails
    (dv, dl, dsk), = list(dali)
    (tv, tl, tsk), = list(torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler,
                                                      collate_fn=collate_views))
    assert dsk == tsk == 8 and torch.equal(dl, tl)
    assert dali.host.status[notimage] == 3
    for a, b in zip(dv, tv):  # no jitter: blur, gray and resize differences only
        err = ((a - b) * STD).abs().mean((1, 2, 3))
        assert err.max() < 0.02, err


@pytest.mark.slow
def test_check_dataset_script(tmp_path):
    bad = write_bad_folder(tmp_path / "train")
    out = run_cli("scripts/check_dataset.py", tmp_path / "train", "--workers", 1, check=False)
    assert out.returncode == 1, out.stderr
    listed = {os.path.basename(line.split("\t")[0]) for line in out.stdout.splitlines()
              if "\t" in line}
    assert listed == bad and "5 unreadable of 16 images" in out.stdout


def test_views_grid_greys_the_dropped_patches(folder):
    from msn_ds.data.loader import PretrainData
    from msn_ds.monitor.views_grid import anchor_masks, views_grid
    from msn_ds.masking import keep_indices, mask_generator

    ds = MultiViewImageFolder(folder, MultiCropTransform(32, 16, 1, 2), seed=0)
    views = PretrainData(ds, None, None, "torch").preview(3)
    masks = anchor_masks(views, 2, 8, 0.5, batch_size=16, per_sample=False, seed=0)
    keep = keep_indices(16, 0.5, 16, False, mask_generator(0, 0), "cpu")
    assert masks[0].shape == (3, 4, 4) and int(masks[0][0].sum()) == 16 - 8
    assert not masks[0][0].flatten()[keep].any()  # the kept tokens are those the model keeps
    grid = views_grid(views, 2, masks, patch_size=8)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 3 * 34 + 2, 4 * 34 + 2)
    anchor = grid[:, 2:34, 36:68].float() / 255  # first sample's anchor cell
    patches = anchor.unfold(1, 8, 8).unfold(2, 8, 8)  # (3, 4, 4, 8, 8)
    grey = (patches - 128 / 255).abs().amax((0, 3, 4)) < 1e-6
    assert torch.equal(grey, masks[0][0])
    if pytest.importorskip("nvidia.dali"):
        dali_views = PretrainData(ds, None, None, "dali").preview(3)
        for a, b in zip(views, dali_views):
            assert ((a - b) * STD).abs().mean() < 0.05


def dali_loader(root, batch, host_workers, pipelines=1):
    """A CPU DALI loader over ``write_bad_folder``'s files whose probe is told that
    notimage.png is a plain JPEG/PNG, so that DALI fails on it and ``_recover`` runs."""
    from msn_ds.data.dali import DaliMultiCropLoader

    ds = MultiViewImageFolder(root, MultiCropTransform(32, 16, 1, 2), seed=0)
    loader = DaliMultiCropLoader(ds, GlobalBatchSampler(len(ds), batch, seed=0),
                                 num_threads=pipelines, host_workers=host_workers,
                                 pipelines=pipelines)
    assert loader.pipelines == pipelines
    notimage = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("notimage.png")][0]
    loader.host.status[notimage], loader.host.shape[notimage] = 1, (10, 10)  # probe miss: _recover
    return loader


def epoch(loader, e, start_batch=0, stop=None):
    loader.set_epoch(e, start_batch)
    out = []
    for views, labels, skipped in loader:
        out.append(([v.clone() for v in views], labels, skipped))
        if len(out) == stop:
            break  # leave the epoch early
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=60):
    """True once none of ``pids`` runs (by pid: the pool's own thread reaps them)."""
    deadline = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


@pytest.mark.slow
def test_host_workers_yield_the_same_batches(tmp_path):
    """Worker processes change where the host work runs, not a bit of what is fed: the same
    views, labels, skip counts and bad-file list as in the consumer's thread, through a DALI
    decode failure (_recover), a mid-epoch resume and an epoch left early."""
    pytest.importorskip("nvidia.dali")
    bad = write_bad_folder(tmp_path / "train")
    root = str(tmp_path / "train")
    ref, par = dali_loader(root, 4, 0), dali_loader(root, 4, 2)
    plan = [(0, 0, None), (1, 2, None), (2, 0, 1), (3, 0, None)]  # (epoch, start, stop)
    skipped = 0
    for e, start, stop in plan:
        a, b = epoch(ref, e, start, stop), epoch(par, e, start, stop)
        assert len(a) == len(b) == (stop or 4 - start), e
        for (av, al, ask), (bv, bl, bsk) in zip(a, b):
            assert all(torch.equal(x, y) for x, y in zip(av, bv)), e
            assert torch.equal(al, bl) and ask == bsk, e
            skipped += bsk
        assert not par.host.inflight  # nothing computed ahead survives the epoch
    assert skipped > 0
    assert ref.bad_files == par.bad_files  # the same files, logged in the same order
    assert sorted(os.path.basename(p) for p in par.bad_files) == sorted(bad)
    assert np.array_equal(ref.host.status, par.host.status)
    pids = list(par.host.pool._processes)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    par.close()
    assert not any(alive(p) for p in pids)


@pytest.mark.slow
def test_host_workers_stop_with_the_loader(tmp_path):
    """An epoch left early, then the loader dropped: its workers exit."""
    pytest.importorskip("nvidia.dali")
    write_bad_folder(tmp_path / "train")
    loader = dali_loader(str(tmp_path / "train"), 4, 1)
    assert len(epoch(loader, 0, stop=1)) == 1
    pids = list(loader.host.pool._processes)
    assert len(pids) == 1 and alive(pids[0])
    del loader
    gc.collect()
    assert wait_gone(pids)


@pytest.mark.slow
def test_host_workers_do_not_hold_up_exit(tmp_path):
    """An interpreter that ends with a live loader mid-epoch exits, and so do its workers."""
    pytest.importorskip("nvidia.dali")
    write_bad_folder(tmp_path / "train")
    script = f"""
from test_dali import dali_loader, epoch
if __name__ == "__main__":
    loader = dali_loader({str(tmp_path / "train")!r}, 4, 2)
    epoch(loader, 0, stop=1)
    it = iter(loader)
    next(it)  # a suspended epoch with batches in flight
    print(*loader.host.pool._processes, flush=True)
"""
    # in tests/ (the script imports test_dali), not the repository root run_cli uses
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and wait_gone(pids, 30)


@pytest.mark.slow
@pytest.mark.parametrize("pipelines,host_workers", [(2, 0), (3, 2)])
def test_pipelines_yield_the_same_batches(tmp_path, pipelines, host_workers):
    """Batches dealt in turn to several DALI pipelines come out as one pipeline gives them:
    through a DALI decode failure (_recover, which rebuilds them all), epochs whose batch
    count is not a multiple of the pipelines, a mid-epoch resume and an epoch left early."""
    pytest.importorskip("nvidia.dali")
    write_bad_folder(tmp_path / "train")
    root = str(tmp_path / "train")
    ref, par = dali_loader(root, 2, 0), dali_loader(root, 2, host_workers, pipelines)
    plan = [(0, 0, None), (1, 3, None), (2, 0, 4), (3, 1, None), (4, 7, None)]
    for e, start, stop in plan:  # 8 batches an epoch: 8, 5, 4 (left), 7, 1
        a, b = epoch(ref, e, start, stop), epoch(par, e, start, stop)
        assert len(a) == len(b) == (stop or 8 - start), e
        for (av, al, ask), (bv, bl, bsk) in zip(a, b):
            assert all(torch.equal(x, y) for x, y in zip(av, bv)), e
            assert torch.equal(al, bl) and ask == bsk, e
        assert not par.host.inflight  # nothing computed ahead survives the epoch
        if stop is None:  # a whole epoch dealt every batch it computed, and yielded it
            assert not any(par._ready) and not par._pending
    # the same files; found in another order, as the host reads further ahead of DALI
    assert sorted(ref.bad_files) == sorted(par.bad_files) and len(par.bad_files) == 5
    assert np.array_equal(ref.host.status, par.host.status)
    par.close()


def test_pipelines_default_by_device(tmp_path):
    """Two CPU pipelines (never more than the threads), one on a GPU."""
    from msn_ds.data.dali import DaliMultiCropLoader

    (tmp_path / "c").mkdir()
    smooth_image(np.random.default_rng(0), 40, 40).save(tmp_path / "c" / "a.png")
    ds = MultiViewImageFolder(str(tmp_path), MultiCropTransform(32, 16, 1, 2), seed=0)
    sampler = GlobalBatchSampler(len(ds), 1, seed=0)
    assert DaliMultiCropLoader(ds, sampler, num_threads=4).pipelines == 2
    assert DaliMultiCropLoader(ds, sampler, num_threads=1).pipelines == 1
    assert DaliMultiCropLoader(ds, sampler, num_threads=4, device_id=0).pipelines == 1
