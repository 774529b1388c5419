"""Frozen features for linear evaluation.

The reference (``logistic_eval.py`` -> ``deit.forward_blocks(x, 1)``) takes the class token of
the last block *before* the final LayerNorm; ``before_norm=False`` gives the token after it,
the representation the projection head sees in pretraining. Both come from
:meth:`MSNEncoder.tokens`, run with the final norm swapped for an identity when needed, so that
patch embedding, position-embedding resampling and blocks are exactly the training code's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from msn_ds.models import MSNEncoder


@contextlib.contextmanager
def without_final_norm(encoder: MSNEncoder) -> Iterator[MSNEncoder]:
    """Temporarily replace ``backbone.norm`` by an identity (restored on exit)."""
    norm = encoder.backbone.norm
    encoder.backbone.norm = nn.Identity()
    try:
        yield encoder
    finally:
        encoder.backbone.norm = norm


def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False)


@torch.inference_mode()
def extract_features(encoder: MSNEncoder, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", before_norm: bool = True,
                     num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float32, labels [N] int64)``: the class token of the last block,
    in dataset order, with the encoder frozen (eval mode, no grad; bf16 autocast on CUDA)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    feats, labels = [], []
    norm_ctx = without_final_norm(encoder) if before_norm else contextlib.nullcontext()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with norm_ctx, autocast:
            for x, y in _loader(dataset, batch_size, num_workers, device):
                h = encoder.tokens(x.to(device, non_blocking=True))[:, 0]
                feats.append(h.float().cpu())
                labels.append(torch.as_tensor(y))
    finally:
        encoder.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


def pixel_features(dataset: Dataset, batch_size: int = 256,
                   num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(flattened images [N, C*H*W] float32, labels [N])``: the no-learning floor that any
    representation has to beat under the same classifier."""
    feats, labels = [], []
    for x, y in _loader(dataset, batch_size, num_workers, torch.device("cpu")):
        feats.append(x.flatten(1).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()
