"""Next-token cross-entropy: the one definition that training (`pruning/model.py`), the importance pass
(`pruning/importance.py`) and evaluation (`evaluation.py`) share, so their losses are the same number."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def next_token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(loss of each predicted token [B, S-1] in fp32, mask of the tokens that count) for logits [B, S, V]
    and labels [B, S]: position t predicts label t+1; labels equal to `IGNORE_INDEX` count for nothing."""
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)  # fmt: skip
    return token_loss, targets != IGNORE_INDEX
