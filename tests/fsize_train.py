"""train.py under a file-size limit (RLIMIT_FSIZE, as ``ulimit -f`` sets) from a chosen save on,
for tests/test_ckpt_disk.py: a real write failure (EFBIG) where mounting a small file system
needs privileges.

    python tests/fsize_train.py BYTES checkpoint:N <train.py args>   from the N-th checkpoint save
    python tests/fsize_train.py BYTES weights <train.py args>        from the weights file on
"""
import os
import resource
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from msn_ds.io import checkpoint


def limit(nbytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))


def main():
    nbytes, when, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if when.startswith("checkpoint:"):
        real, calls, n = checkpoint.save_training_checkpoint, [], int(when.split(":")[1])

        def save(*a, **k):
            calls.append(1)
            if len(calls) == n:
                limit(nbytes)
            return real(*a, **k)

        checkpoint.save_training_checkpoint = save
    elif when == "weights":
        real_consolidate = checkpoint.consolidate

        def consolidate(*a, **k):
            limit(nbytes)
            return real_consolidate(*a, **k)

        checkpoint.consolidate = consolidate
    else:
        raise SystemExit(f"unknown moment {when}")
    sys.argv = [os.path.join(ROOT, "train.py")] + argv
    runpy.run_path(sys.argv[0], run_name="__main__")  # train.py's own exit handling


if __name__ == "__main__":
    main()
