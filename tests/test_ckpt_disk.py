"""Files on disk: a full disk during a checkpoint or weights-file save, and the weights file's
mode.

A full disk is real: a size-limited tmpfs mounted for the test where that is permitted
(root), and everywhere a real file-size limit (RLIMIT_FSIZE, ``ulimit -f``) set in the
training process from the chosen save on (tests/fsize_train.py): writes past it fail with
EFBIG, and torch's writer reports either as ``inline_container.cc ... unexpected pos``."""
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli

pytestmark = pytest.mark.slow  # launches processes


def train_args(demo_root, folder, steps, *extra):
    return ["--config", "configs/demo_cpu.yaml", "--deepspeed_config", "ds_configs/zero0_fp32.json",
            "--max-steps", str(steps), f"data.root_path={demo_root}", f"logging.folder={folder}",
            "criterion.batch_size=8", "data.num_workers=0", *extra]


def tree_size(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    """Two steps written under umask 022: the sizes to fill a disk with, and the weights
    that the checkpoint kept by a failed save must still give."""
    folder = str(tmp_path_factory.mktemp("reference"))
    run_cli("train.py", *train_args(demo_root, folder, 2), umask=0o022)
    weights = os.path.join(folder, "demo-target.safetensors")
    return {"folder": folder, "weights": load_file(weights),
            "weights_mode": os.stat(weights).st_mode,
            "checkpoint_bytes": tree_size(os.path.join(folder, "global_step2")),
            "weights_bytes": os.path.getsize(weights)}


@pytest.fixture(params=["tmpfs", "fsize"])
def full_disk(request, tmp_path, reference):
    """``(folder, how, reason)``: a folder with room for one checkpoint and the logs, but
    neither for a second checkpoint nor for the weights file; ``how(moment)`` is the command
    that trains there (with the file-size limit set from ``moment`` on, for ``fsize``), and
    ``reason`` what the message must say."""
    folder = tmp_path / "disk"
    folder.mkdir()
    ckpt, weights = reference["checkpoint_bytes"], reference["weights_bytes"]
    if request.param == "tmpfs":
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a size-limited tmpfs needs root; the fsize case covers it")
        size = ckpt + weights // 2
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)]))
        yield str(folder / "run"), lambda moment: ["train.py"], "no space left on the device"
    else:
        limit = weights // 2
        yield (str(folder / "run"), lambda moment: ["tests/fsize_train.py", str(limit), moment],
               f"the process's file-size limit (ulimit -f) of {limit / 2**20:.1f} MiB was reached")


def consolidated(folder, tmp_path):
    out = tmp_path / "kept.safetensors"
    run_cli("scripts/consolidate.py", folder, "--out", out)
    return load_file(out)


def test_full_disk_during_checkpoint(demo_root, reference, full_disk, tmp_path):
    """The save of step 4 fails: the message names the checkpoint, the space it needed and
    what is free; step 2's checkpoint stays, `latest` names it, the .partial is gone."""
    folder, how, reason = full_disk
    r = run_cli(*how("checkpoint:2"), *train_args(demo_root, folder, 4,
                                                  "logging.checkpoint_every_steps=2"), expect=1)
    err = r.stderr
    need = reference["checkpoint_bytes"] / 2**20
    assert (f"cannot save checkpoint {folder}/global_step4: {reason} (needs about {need:.1f} "
            "MiB, the size of global_step2; ") in err, err[-3000:]
    assert f"The previous checkpoint {folder}/global_step2 is intact" in err
    assert f"The partial save {folder}/global_step4.partial was removed" in err
    assert "unexpected pos" not in err  # torch's words for it, without the path or the cause
    assert sorted(n for n in os.listdir(folder) if n.startswith("global_step")) == ["global_step2"]
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step2"
    kept = consolidated(folder, tmp_path)  # bit-identical to the uninterrupted run's step 2
    assert kept.keys() == reference["weights"].keys()
    assert all(torch.equal(kept[k], reference["weights"][k]) for k in kept)


def test_full_disk_during_weights_file(demo_root, reference, full_disk, tmp_path):
    """The checkpoint fits, the weights file does not: it is not left half-written (no file,
    no temporary), the message says how much it needed and how to write it later."""
    folder, how, reason = full_disk
    r = run_cli(*how("weights"), *train_args(demo_root, folder, 2), expect=1)
    err = r.stderr
    weights = f"{folder}/demo-target.safetensors"
    need = sum(t.numel() * t.element_size() for t in reference["weights"].values()) / 2**20
    assert f"cannot write the weights file {weights}: {reason} (needs about {need:.1f} MiB; " \
        in err, err[-3000:]
    assert (f"The checkpoint {folder}/global_step2 is intact: once there is room, run "
            f"`python scripts/consolidate.py {folder}/global_step2 --out {weights}`") in err
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp") or n.endswith(".safetensors")]
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step2"


def test_consolidate_on_full_disk(reference, tmp_path):
    """scripts/consolidate.py: `error: ...` and exit 1 (the checkpoint is fine; the output
    is not writable for lack of space), nothing left behind."""
    if os.geteuid() != 0:
        pytest.skip("needs a size-limited tmpfs (root)")
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "w.pth"
        r = run_cli("scripts/consolidate.py", reference["folder"], "--out", out, expect=1)
        assert f"error: cannot write the weights file {out}: no space left on the device" \
            in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_weights_files_honour_umask(reference, tmp_path, umask, mode):
    """Weights are shared: the file gets 0666 less the umask (it was 0600 from mkstemp, and
    safetensors writes 0600 too), for .safetensors and .pth alike; and the run's own file."""
    assert reference["weights_mode"] & 0o777 == 0o644
    for name in ("w.safetensors", "w.pth"):
        run_cli("scripts/consolidate.py", reference["folder"], "--out", tmp_path / name,
                umask=umask)
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
