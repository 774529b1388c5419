"""Run under torchrun by tests/test_knn_monitor.py: the k-NN monitor with 2 processes."""
import json
import sys

import torch
import torch.distributed as dist

from eval.knn_monitor import KNNMonitor
from test_knn_monitor import encoder


def main():
    dist.init_process_group("gloo")
    spec = json.load(open(sys.argv[1]))
    enc = encoder()
    enc.load_state_dict(torch.load(spec["state"], weights_only=True))
    monitor = KNNMonitor(spec["train"], spec["val"], train_root=spec["train_root"], k=5,
                         crop=32, resize=32, batch_size=16)
    result = monitor(enc, torch.device("cpu"), torch.float32)
    if dist.get_rank() == 0:
        json.dump(result, open(spec["out"], "w"))
    else:
        assert result is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
