"""No code from a checkpoint: every checkpoint file, DeepSpeed's reads included, goes through
torch's weights-only unpickler with the allow-list of the types genuine checkpoints hold.

The crafted checkpoint is a genuine one whose optimizer-state file is replaced by a pickle
whose ``__reduce__`` runs ``os.system("touch MARKER")``: before the fix, consolidating it or
resuming from it created MARKER."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli

pytestmark = pytest.mark.slow  # launches processes


def train_args(demo_root, folder, ds, batch, steps, *extra):
    return ["--config", "configs/demo_cpu.yaml", "--deepspeed_config", f"ds_configs/{ds}.json",
            "--max-steps", str(steps), f"data.root_path={demo_root}", f"logging.folder={folder}",
            f"criterion.batch_size={batch}", "data.num_workers=0", *extra]


class Evil:
    """Unpickled in full, this runs a shell command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def craft(genuine_run, dst, marker):
    """A copy of a genuine run whose (last) optimizer-state file carries the payload, beside
    the real state, so that everything else about it is plausible (ds_config with ZeRO-1,
    param_shapes, every other file untouched). Returns the poisoned file."""
    shutil.copytree(genuine_run, dst)
    with open(os.path.join(dst, "latest")) as f:
        tag_dir = os.path.join(dst, f.read().strip())
    name = sorted(n for n in os.listdir(tag_dir) if n.endswith("optim_states.pt"))[-1]
    path = os.path.join(tag_dir, name)
    state = torch.load(path, weights_only=False)  # our own genuine file
    state["optimizer_state_dict"]["loss_scaler"] = Evil(f"touch {marker}")
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def zero1_run(demo_root, tmp_path_factory):
    """One process, ZeRO-1 fp32, one step: the genuine checkpoint the crafted one copies."""
    folder = str(tmp_path_factory.mktemp("zero1"))
    run_cli("train.py", *train_args(demo_root, folder, "zero1_fp32", 8, 1))
    return folder


def assert_refused(r, poisoned):
    assert f"{poisoned}: refused to load: it names posix.system" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_crafted_checkpoint_is_refused_by_consolidate_and_resume(demo_root, zero1_run, tmp_path):
    marker = tmp_path / "MARKER"
    crafted = str(tmp_path / "crafted")
    poisoned = craft(zero1_run, crafted, marker)
    with open(os.path.join(crafted, "global_step1", "mp_rank_00_model_states.pt"), "rb") as f:
        assert b"zero_optimization" in f.read()  # plausible: a genuine ZeRO-1 ds_config

    r = run_cli("scripts/consolidate.py", crafted, "--out", tmp_path / "w.safetensors", expect=2)
    assert_refused(r, poisoned)
    assert r.stderr.startswith("error: ") or "\nerror: " in r.stderr
    assert not (tmp_path / "w.safetensors").exists()

    r = run_cli("train.py", *train_args(demo_root, tmp_path / "resumed", "zero1_fp32", 8, 2),
                "--resume", os.path.join(crafted, "global_step1"), expect=2)
    assert_refused(r, poisoned)
    assert not marker.exists()


RUNTIME_GUARD = r"""
import os, sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
import torch
from msn_ds.io.safe_load import CheckpointError, restricted_loads

crafted, poisoned = sys.argv[1:3]
results = []
for name, load in [
        ("engine", lambda: TorchCheckpointEngine().load(poisoned, map_location="cpu")),
        ("zero_to_fp32", lambda: get_fp32_state_dict_from_zero_checkpoint(crafted, tag="global_step1")),
        ("torch.serialization.load", lambda: torch.serialization.load(poisoned, weights_only=False))]:
    try:
        with restricted_loads():
            load()
        results.append(f"{name}: LOADED")
    except CheckpointError as e:
        results.append(f"{name}: " + ("refused" if str(e).startswith(poisoned) else str(e)))
try:  # DeepSpeed swallowing the refusal does not let the load pass
    with restricted_loads():
        try:
            torch.load(poisoned, weights_only=False)
        except Exception:
            pass
    results.append("swallowed: LOADED")
except CheckpointError:
    results.append("swallowed: refused")
assert torch.load.__module__ == "torch.serialization" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
print("|".join(results))
"""


def test_deepspeed_reads_are_restricted(zero1_run, tmp_path):
    """The loads themselves, not only the scan before them: DeepSpeed's checkpoint engine,
    zero_to_fp32, and the universal conversion refuse the file and run nothing."""
    marker = tmp_path / "MARKER"
    crafted = str(tmp_path / "crafted")
    poisoned = craft(zero1_run, crafted, marker)
    r = run_cli("-c", RUNTIME_GUARD, crafted, poisoned)
    assert r.stdout.strip().splitlines()[-1] == ("engine: refused|zero_to_fp32: refused|"
                                                 "torch.serialization.load: refused|"
                                                 "swallowed: refused")
    r = run_cli("-m", "msn_ds.io.to_universal", "--input_folder",
                os.path.join(crafted, "global_step1"), "--output_folder", tmp_path / "universal",
                "--inject_missing_state", expect=2)
    assert_refused(r, poisoned)
    assert not marker.exists()


@pytest.fixture(scope="module")
def genuine(demo_root, tmp_path_factory):
    """Genuine two-process checkpoints of the configurations not already resumed elsewhere:
    bf16, and CPU offload at ZeRO-2 and ZeRO-3 (2 steps, global batch 8)."""
    runs = {}
    for ds in ["zero1_bf16", "zero2_offload_bf16", "zero3_offload_bf16"]:
        runs[ds] = str(tmp_path_factory.mktemp(ds))
        run_cli("train.py", *train_args(demo_root, runs[ds], ds, 4, 2), nproc=2)
    return runs


def test_allow_list_is_what_genuine_checkpoints_hold(genuine):
    """Every global outside torch's own list that these checkpoints reference is on ours,
    and ours holds nothing they (or fp16's loss scaler) do not use."""
    from msn_ds.io.safe_load import allowed_globals, checkpoint_files

    found = set()
    for folder in genuine.values():
        for f in checkpoint_files(folder):
            found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    assert found == {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"}
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    assert names == found | {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}


def test_fp16_loss_scaler_loads(tmp_path):
    """fp16 needs a GPU to train; its optimizer state holds a DynamicLossScaler, which the
    restricted loader rebuilds (attributes and the fp16 dtype included)."""
    run_cli("-c", r"""
import sys, torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from msn_ds.io.safe_load import safe_load
s = DynamicLossScaler(2.0**16, 1000, 1, 2, False)
torch.save({"optimizer_state_dict": {"loss_scaler": s, "dynamic_loss_scale": True}}, sys.argv[1])
got = safe_load(sys.argv[1])["optimizer_state_dict"]["loss_scaler"]
assert type(got) is DynamicLossScaler and got.__dict__ == s.__dict__, got.__dict__
""", tmp_path / "fp16.pt")


@pytest.mark.parametrize("ds", ["zero1_bf16", "zero2_offload_bf16", "zero3_offload_bf16"])
def test_genuine_checkpoints_consolidate(genuine, tmp_path, ds):
    """Consolidation reads every shard (zero_to_fp32) under the restriction: the same
    tensors as the file the run wrote at its end."""
    out = tmp_path / "w.safetensors"
    run_cli("scripts/consolidate.py", genuine[ds], "--out", out)
    a, b = load_file(out), load_file(os.path.join(genuine[ds], "demo-target.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ds,nproc,batch", [("zero2_offload_bf16", 2, 4),     # engine load
                                            ("zero3_offload_bf16", 1, 8)])    # universal
def test_genuine_checkpoints_resume(demo_root, genuine, tmp_path, ds, nproc, batch):
    """Resume under the restriction: at the same world size DeepSpeed's engine reads the
    shards; at another, the restricted conversion to the universal format runs first."""
    folder = str(tmp_path / "run")
    shutil.copytree(genuine[ds], folder)
    r = run_cli("train.py", *train_args(demo_root, folder, ds, batch, 3), "--resume", nproc=nproc)
    assert "resumed at step 2" in r.stderr and "(2 processes)" in r.stderr, r.stderr[-3000:]
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step3"
    assert os.path.isdir(os.path.join(folder, "global_step2.universal")) == (nproc == 1)
