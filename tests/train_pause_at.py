"""train.py in which one process stops before a given step on the first attempt of a
torchrun job, for the elastic-restart test in tests/test_multinode.py (which then SIGKILLs it).

    torchrun ... tests/train_pause_at.py RANK STEP MARKER <train.py args>

The process of global rank RANK writes its pid to MARKER when it reaches step STEP (0-based:
the checkpoints of the steps before it are complete) and sleeps there, so the kill lands at
a known point. Restarted attempts (TORCHELASTIC_RESTART_COUNT > 0) run train.py unchanged.
"""
import os
import sys
import time

from helpers import load_script
from msn_ds import trainer

train = load_script("train.py")


def main():
    rank, step, marker, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first and int(os.environ.get("RANK", "0")) == rank:
        real_step = trainer.MSNTrainer.step

        def pause(self, views, s, **kw):
            if s == step:
                with open(marker + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(marker + ".tmp", marker)
                time.sleep(600)
            return real_step(self, views, s, **kw)

        trainer.MSNTrainer.step = pause
    sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
