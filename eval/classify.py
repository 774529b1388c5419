"""The classification rules shared by the protocols: the weighted k-NN vote (:mod:`eval.knn`,
:mod:`eval.knn_monitor`) and top-k accuracy (:mod:`eval.knn`, :mod:`eval.linear`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def knn_classify(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[N_test, C]`` (float32): for each test row, the sum over its ``k``
    most cosine-similar train rows of ``exp(sim / temperature)``, per neighbour class.

    Rows are L2-normalised here. ``k`` is clamped to the train set size. The test set is
    processed ``chunk`` rows at a time, so memory is ``O(chunk * N_train)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tr = F.normalize(torch.as_tensor(train_x).float(), dim=1)
    te = torch.as_tensor(test_x).float()
    ytr = torch.as_tensor(train_y).long().to(tr.device)
    if len(tr) == 0:
        raise ValueError("empty train set")
    num_classes = num_classes if num_classes is not None else int(ytr.max()) + 1
    k = min(k, len(tr))
    scores = torch.zeros(len(te), num_classes, dtype=torch.float32)
    for i in range(0, len(te), chunk):
        q = F.normalize(te[i:i + chunk].to(tr.device), dim=1)
        sim, idx = (q @ tr.T).topk(k, dim=1)  # [b, k], largest first
        votes = (sim / temperature).exp()
        part = torch.zeros(len(q), num_classes, dtype=torch.float32, device=tr.device)
        part.scatter_add_(1, ytr[idx], votes)
        scores[i:i + chunk] = part.cpu()
    return scores


def topk_accuracy(scores: torch.Tensor, labels, ks=(1, 5)) -> dict:
    """``{"top1": %, "top5": %}``; top-k with k >= number of classes is 100 %."""
    labels = torch.as_tensor(labels).long()
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * float((top == labels[:, None]).any(dim=1).double().mean())
    return out


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None, chunk: int = 1024) -> dict:
    """``{"top1": %, "top5": %}`` of :func:`knn_classify` on ``test_y``."""
    if num_classes is None:
        num_classes = int(max(torch.as_tensor(train_y).max(), torch.as_tensor(test_y).max())) + 1
    scores = knn_classify(train_x, train_y, test_x, k, temperature, num_classes, chunk)
    return topk_accuracy(scores, test_y)
