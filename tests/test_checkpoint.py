"""Checkpoints: bit-identical resume, a kill during a save, SIGTERM, consolidation into a
timm-loadable file, errors that name the file."""
import os
import signal

import pytest
import timm
import torch
from safetensors.torch import load_file

from msn_ds.io.weights import read_weights
from helpers import run_cli, source_args

pytestmark = pytest.mark.slow  # launches processes


def args(demo_root, folder, steps, ds="zero0_fp32.json", *extra):
    return ["--config", "configs/demo_cpu.yaml", "--deepspeed_config", f"ds_configs/{ds}",
            "--max-steps", str(steps), f"data.root_path={demo_root}", f"logging.folder={folder}",
            "criterion.batch_size=8", "data.num_workers=0", "logging.log_every=1", *extra]


def weights(folder):
    return load_file(os.path.join(folder, "demo-target.safetensors"))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, diff


@pytest.fixture(scope="module")
def straight(demo_root, tmp_path_factory):
    """6 steps without interruption: the reference for every resume below."""
    folder = str(tmp_path_factory.mktemp("straight"))
    run_cli("train.py", *args(demo_root, folder, 6))
    return folder


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_resume_is_bit_identical(demo_root, demo_shards, straight, tmp_path, source):
    """3 steps, then resumed mid-epoch to 6: bit-identical to 6 straight steps on the folder.
    Also on the folder's tar shards (data.shards): the resume point in the sampler's order
    is the folder's, so even the source may differ from the straight run's."""
    folder = str(tmp_path / "run")
    data = source_args(source, demo_shards)
    run_cli("train.py", *args(demo_root, folder, 3, "zero0_fp32.json", *data))
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step3"
    run_cli("train.py", *args(demo_root, folder, 6, "zero0_fp32.json", *data), "--resume")
    assert_identical(weights(straight), weights(folder))
    if source == "shards":
        return  # the rest does not read the data
    # the same --max-steps given again stops at once: nothing left to do
    r = run_cli("train.py", *args(demo_root, folder, 6), "--resume")
    assert "resumed at step 6" in r.stderr + r.stdout


def test_kill_during_save_keeps_previous_checkpoint(demo_root, straight, tmp_path):
    folder = str(tmp_path / "run")
    run_cli("tests/train_with_faults.py", "kill-in-save", "4",
                *args(demo_root, folder, 6, "zero0_fp32.json", "logging.checkpoint_every_steps=2"),
                expect=-signal.SIGKILL)
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step2"  # the pointer still names the last complete save
    assert os.path.isdir(os.path.join(folder, "global_step4.partial"))
    assert not os.path.exists(os.path.join(folder, "global_step4"))
    run_cli("train.py", *args(demo_root, folder, 6, "zero0_fp32.json",
                              "logging.checkpoint_every_steps=2"), "--resume")
    assert_identical(weights(straight), weights(folder))
    assert not os.path.exists(os.path.join(folder, "global_step4.partial"))


def test_sigterm_saves_and_exits_zero(demo_root, tmp_path):
    folder = str(tmp_path / "run")
    r = run_cli("tests/train_with_faults.py", "sigterm-at", "2", *args(demo_root, folder, 50))
    assert "stop requested (SIGTERM): saving at step 3" in r.stderr + r.stdout
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step3"


@pytest.mark.parametrize("ds", ["zero0_fp32.json", "zero1_fp32.json", "zero3_bf16.json"])
def test_consolidate_loads_into_timm(demo_root, tmp_path, ds):
    folder = str(tmp_path / "run")
    run_cli("train.py", *args(demo_root, folder, 2, ds))
    out = str(tmp_path / "w.safetensors")
    run_cli("scripts/consolidate.py", folder, "--out", out)
    tensors, meta = read_weights(out)
    assert meta["arch"] == "vit_pico_4" and meta["step"] == "2"
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    vit.load_state_dict({k[len("target_encoder."):]: v for k, v in tensors.items()
                         if k.startswith("target_encoder.")}, strict=True)
    assert_identical(weights(folder), tensors)  # same as the file the run wrote itself
    run_cli("scripts/consolidate.py", folder, "--out", str(tmp_path / "w.pth"))
    assert_identical(tensors, read_weights(str(tmp_path / "w.pth"))[0])


def test_bad_checkpoints_name_the_problem(demo_root, tmp_path):
    folder = str(tmp_path / "run")
    run_cli("train.py", *args(demo_root, folder, 1))
    r = run_cli("train.py", *args(demo_root, folder, 2, "zero0_fp32.json",
                                  "meta.model_name=vit_pico_8"), "--resume", expect=2)
    assert "saved with meta.model_name='vit_pico_4', this run has 'vit_pico_8'" in r.stderr
    r = run_cli("train.py", *args(demo_root, str(tmp_path / "nothing"), 2), "--resume",
                str(tmp_path / "nope"), expect=2)
    assert "checkpoint not found" in r.stderr and "nope" in r.stderr
    states = os.path.join(folder, "global_step1", "mp_rank_00_model_states.pt")
    with open(states, "r+b") as f:
        f.truncate(100)
    r = run_cli("scripts/consolidate.py", folder, "--out", str(tmp_path / "x.safetensors"),
                expect=2)
    assert "mp_rank_00_model_states.pt: unreadable or truncated" in r.stderr
