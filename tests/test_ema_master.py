"""The target follows the fp32 master weights at every ZeRO stage in bf16 (2 processes, gloo):
its EMA equals a float64 EMA of the masters to 1e-6, it computes in bf16, a gated
(non-finite) step leaves it untouched, and the update's only traffic is the target's own
all-gather (ZeRO-1/2) or none (ZeRO-3, whose engine gathers on use)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_target_is_an_ema_of_the_fp32_masters(tmp_path, stage):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(HERE, "dist_ema_master.py"),
                        str(stage), str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=cpu_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["worst"] < 1e-6, res  # fp32 EMA vs float64 EMA of the masters, 4 updates
        assert res["dtypes"] == ["torch.bfloat16"], res  # the target runs in bf16
        assert res["rounding"] == 0.0, res  # bf16 weights = the fp32 EMA rounded once
        if stage == 3:
            assert res["ema"] == "ShardedEMA" and res["per_update"] == [[]] * 4, res
            assert res["target_overlap_comm"] is False  # forced off for the EMA's writes
        else:
            assert res["ema"] == "PartitionedEMA", res
            gathers = {tuple(c) for c in res["per_update"]}
            # one all-gather per parameter group at ZeRO-1/2; ZeRO-0 holds whole masters
            assert gathers == ({()} if stage == 0 else
                               {("all_gather_into_tensor",) * len(res["per_update"][0])}), res
