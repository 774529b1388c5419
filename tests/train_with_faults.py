"""train.py with an injected fault, for tests/test_checkpoint.py.

    python tests/train_with_faults.py kill-in-save STEP  <train.py args>
        SIGKILL this process half-way through writing the checkpoint of STEP
    python tests/train_with_faults.py sigterm-at STEP  <train.py args>
        send SIGTERM to this process during step STEP (as SLURM does before pre-emption)
    python tests/train_with_faults.py group-signal-at STEP:SIGNAL  <train.py args>
        send SIGNAL to this process's whole group during step STEP (SLURM's scancel and
        pre-emption, Ctrl-C in a terminal): start it as the leader of its own group (setsid)
    python tests/train_with_faults.py nan-from STEP:COUNT  <train.py args>
        the loss is NaN at steps STEP .. STEP+COUNT-1
"""
import os
import signal
import subprocess
import sys

import torch

from helpers import load_script
from msn_ds import trainer

train = load_script("train.py")


def main():
    fault, when, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    step = int(when.split(":")[0])
    if fault == "kill-in-save":
        real_save = torch.save

        def dying_save(obj, path, *a, **k):
            if f"global_step{step}.partial" in str(path):
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a checkpoint")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)

        torch.save = dying_save
    elif fault in ("sigterm-at", "group-signal-at"):
        real_step = trainer.MSNTrainer.step
        sig = getattr(signal, when.split(":")[1]) if ":" in when else signal.SIGTERM
        assert fault == "sigterm-at" or os.getpgid(0) == os.getpid(), "start it with setsid"

        def step_then_signal(self, views, s, **kw):
            if s == step and fault == "sigterm-at":
                os.kill(os.getpid(), sig)
            elif s == step:  # from another process, as SLURM's: a signal from a worker's
                # parent is torch's own way of ending that worker
                subprocess.run(["kill", "-s", sig.name[3:], "--", f"-{os.getpgid(0)}"],
                               start_new_session=True, check=True)
            return real_step(self, views, s, **kw)

        trainer.MSNTrainer.step = step_then_signal
    elif fault == "nan-from":
        from msn_ds.loss import MSNLoss

        count = int(when.split(":")[1])
        real_forward = MSNLoss.forward
        calls = {"n": 0}

        def nan_forward(self, *a, **k):
            loss, stats = real_forward(self, *a, **k)
            calls["n"] += 1  # one call per training step
            if step <= calls["n"] - 1 < step + count:
                loss = loss * float("nan")
            return loss, stats

        MSNLoss.forward = nan_forward
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
