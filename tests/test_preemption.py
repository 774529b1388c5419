"""Pre-emption signals sent to the whole process group (SLURM's ``scancel`` and pre-emption,
Ctrl-C in a terminal) reach the loader's workers too: the workers live through them, and the
trainer saves at the end of the step and exits 0, as it does for a signal to itself alone."""
import os
import sys

import pytest

from helpers import run_cli
from test_checkpoint import args

pytestmark = pytest.mark.slow  # launches training


@pytest.mark.parametrize("sig,loader", [("SIGTERM", "torch"), ("SIGUSR1", "torch"),
                                        ("SIGINT", "torch"), ("SIGTERM", "dali"),
                                        ("SIGINT", "dali")])
def test_group_signal_saves_and_exits_zero(demo_root, tmp_path, sig, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    folder = str(tmp_path / "run")
    r = run_cli("tests/train_with_faults.py", "group-signal-at", f"2:{sig}",
                *args(demo_root, folder, 50), "data.num_workers=2", f"data.loader={loader}",
                launcher=["setsid", sys.executable], timeout=300)
    out = r.stderr + r.stdout
    assert f"stop requested ({sig}): saving at step 3" in out, out[-3000:]
    assert "Traceback" not in out and "killed by signal" not in out
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step3"
    assert os.path.isfile(os.path.join(folder, "demo-target.safetensors"))

