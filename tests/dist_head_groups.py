"""Run under torchrun by tests/test_head_groups.py: the anchor encoder's output on this
rank's slice of every view, BatchNorm statistics global over processes."""
import os
import sys

import torch
import torch.distributed as dist

from test_head_groups import MASK, SEED, make_encoder


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(os.path.join(sys.argv[1], "inputs.pt"), weights_only=True)
    enc = make_encoder()
    enc.load_state_dict(inputs["state"])
    b = inputs["views"][0].shape[0] // world
    views = [v[rank * b:(rank + 1) * b] for v in inputs["views"]]
    with torch.no_grad():
        z = enc(views, masked_views=2, mask_ratio=MASK,
                generator=torch.Generator().manual_seed(SEED))
    torch.save(z, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
