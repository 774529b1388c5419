"""Projection head and prototypes of MSN (docs/method.md section 1)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .norm import BatchNorm1d


class ProjectionHead(nn.Sequential):
    """Linear(D, h) -> BN -> GELU -> Linear(h, h) -> BN -> GELU -> Linear(h, out).

    BatchNorm runs on batch statistics of the global batch (``models.norm``). Submodule names (``fc1``, ``bn1``, ``fc2``, ``bn2``, ``fc3``) are the reference's, so its
    ``fc.*`` weights map one to one.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, output_dim: int = 256,
                 use_bn: bool = True):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["fc1"] = nn.Linear(in_dim, hidden_dim)
        if use_bn:
            layers["bn1"] = BatchNorm1d(hidden_dim)
        layers["gelu1"] = nn.GELU()
        layers["fc2"] = nn.Linear(hidden_dim, hidden_dim)
        if use_bn:
            layers["bn2"] = BatchNorm1d(hidden_dim)
        layers["gelu2"] = nn.GELU()
        layers["fc3"] = nn.Linear(hidden_dim, output_dim)
        super().__init__(layers)


def init_prototypes(num_proto: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K vectors uniform in +-1/sqrt(dim), as in the reference."""
    bound = dim ** -0.5
    return torch.empty(num_proto, dim).uniform_(-bound, bound, generator=generator)


class Prototypes(nn.Module):
    """The K learnable prototype vectors. A module of their own so that ZeRO-3 gathers them
    around ``forward`` like any layer's weights; ``forward`` returns a fresh tensor, which
    stays valid after the parameter is re-partitioned."""

    def __init__(self, num_proto: int, dim: int, trainable: bool = True):
        super().__init__()
        self.weight = nn.Parameter(init_prototypes(num_proto, dim), requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        return self.weight.clone()


class MSNModel(nn.Module):
    """What the optimiser trains: the anchor encoder and the prototypes.

    One module so that a single DeepSpeed engine holds every trained parameter;
    ``forward`` returns ``(anchor_z, prototypes)``.
    """

    def __init__(self, encoder: nn.Module, num_proto: int, output_dim: int,
                 freeze_proto: bool = False):
        super().__init__()
        self.encoder = encoder
        self.prototypes = Prototypes(num_proto, output_dim, trainable=not freeze_proto)

    def forward(self, views, part: str = "all", **mask):
        """``part``: ``"all"`` (the encoder), or the gradient cache's halves
        (``msn_ds/accumulate.py``): ``"features"`` returns the backbone's outputs per group of
        views only, ``"head"`` takes them as ``views`` and returns ``(anchor_z, prototypes)``.
        Through this forward, so that DeepSpeed's hooks see each half as a forward."""
        if part == "features":
            return self.encoder.features(views, **mask)
        if part == "head":
            return self.encoder.heads(views), self.prototypes()
        return self.encoder(views, **mask), self.prototypes()
