"""The GPT of lesson 3 as a sequence of layers, so that a pipeline can cut it into stages.

    gpt_as_sequential(model) = Sequential(Embedding, Block 0, ..., Block n−1, Head)

The pieces share the model's own modules and parameters (nothing is copied), so a stage built from
them trains the model itself. One catch is weight tying: the output layer reuses the token embedding
(``lm_head.weight is wte.weight``). Cut into stages, the first stage (Embedding) and the last (Head) each
hold that matrix; each computes only its own use's share of the gradient, and the true gradient is their
sum. Megatron-LM keeps both copies and all-reduces their gradients between the first and last pipeline
stage after every backward; :func:`sum_tied_gradients` does exactly that with one exchange of messages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit import comm

__all__ = ["Embedding", "Head", "gpt_as_sequential", "gpt_loss", "sum_tied_gradients"]


class Embedding(nn.Module):
    """token ids (B, T) → token + position embedding (B, T, C): the GPT's input layer."""

    def __init__(self, model):
        super().__init__()
        self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class Head(nn.Module):
    """(B, T, C) → logits (B, T, vocab): the final LayerNorm and the (tied) output layer."""

    def __init__(self, model):
        super().__init__()
        self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def forward(self, x):
        return self.lm_head(self.ln_f(x))


def gpt_as_sequential(model) -> nn.Sequential:
    """``model`` (a :class:`labkit.models.GPT`) as n_layer + 2 layers: Embedding, the blocks, Head."""
    return nn.Sequential(Embedding(model), *model.blocks, Head(model))


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position, as ``GPT.forward(idx, targets)`` computes it."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def sum_tied_gradients(param: torch.Tensor, peer: int) -> None:
    """Add ``peer``'s gradient of a tied weight to this rank's (and ``peer`` adds ours): the first and the
    last pipeline stage each call this after the backward, naming the other. Afterwards both hold the
    full gradient, and their copies stay equal through identical optimizer steps."""
    mine = param.grad.detach().clone()
    theirs = torch.empty_like(mine)
    comm.exchange(mine, peer, theirs, peer)
    param.grad += theirs
