"""Seeds as functions of integer keys: ``seed_for(seed, epoch)`` orders an epoch,
``seed_for(seed, epoch, index, view)`` draws a view, ``seed_for(seed, step, MASK_KEY)`` the
patch mask, so every random choice is reproducible across world sizes, devices and resumes."""
from __future__ import annotations

import numpy as np


def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))
