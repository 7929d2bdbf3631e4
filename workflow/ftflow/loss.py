"""Cross-entropy on labelled positions only: the training loss and the eval loss are one computation.

A packed row of N tokens in which only the answers carry labels needs the
LM head (vocab x hidden, the largest matmul of a small model) on the
positions that predict a label, not on all N: `logits_to_keep` takes the
positions, so prompts and system turns cost no logits. The trainer divides
the sum by the step's label count; the eval job sums over the whole split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoding import IGNORE


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, keep) of a one-row batch: position i predicts token i+1, kept where that token has a label."""
    targets = labels[0, 1:]
    return targets, (targets != IGNORE).nonzero().squeeze(-1)


def summed_label_loss(model, inputs: dict, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over the kept positions of the cross-entropy (nats), with logits in fp32.

    `inputs` are the model's arguments without labels (the model must not
    compute its own loss over every position). No KV cache: packed examples
    would attend to one another through it (see DESIGN, "Facts checked").
    """
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0].float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")
