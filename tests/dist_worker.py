"""Run under torchrun (gloo, CPU) by tests/test_distributed.py: computes the MSN loss, its
gradients and the global BatchNorm on this rank's slice of fixed inputs and saves them."""
import os
import sys

import torch
import torch.distributed as dist

from msn_ds.loss import MSNLoss
from msn_ds.models.norm import BatchNorm1d


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(sys.argv[1], weights_only=True)
    out_dir = sys.argv[2]
    M, B = inputs["M"], inputs["B"]
    b = B // world
    sl = slice(rank * b, (rank + 1) * b)

    anchor = inputs["anchor"].view(M, B, -1)[:, sl].reshape(M * b, -1).clone().requires_grad_()
    protos = inputs["protos"].clone().requires_grad_()
    crit = MSNLoss(entropy_weight=0.2, label_smoothing=inputs["eps"],
                   use_sinkhorn=inputs["sinkhorn"])
    loss, stats = crit(anchor, inputs["target"][sl], protos, 0.25)
    loss.backward()
    proto_grad = protos.grad.clone()
    dist.all_reduce(proto_grad)
    proto_grad /= world  # what a data-parallel engine does

    bn = BatchNorm1d(inputs["bn_x"].shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(inputs["bn_w"])
        bn.bias.copy_(inputs["bn_b"])
    x = inputs["bn_x"][sl].clone().requires_grad_()
    y = bn(x)
    (y * inputs["bn_probe"][sl]).sum().backward()
    bn_wgrad = bn.weight.grad.clone()
    dist.all_reduce(bn_wgrad)

    torch.save({"loss": loss.detach(), "stats": {k: v.detach() for k, v in stats.items()},
                "anchor_grad": anchor.grad, "proto_grad": proto_grad, "bn_y": y.detach(),
                "bn_xgrad": x.grad, "bn_wgrad": bn_wgrad, "bn_running_mean": bn.running_mean},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
