"""Ensemble head: several cheap branches sharing one output word-embedding matrix.

Each branch has its own hidden->hidden projection (paper: 312x312) with GELU and LayerNorm (BERT's prediction
head transform); all branches then score the vocabulary with the *same* matrix, the fusion module's input
word embedding (tied), plus one shared bias::

    h_b      = LayerNorm(gelu(W_b h + c_b))           # [B,T,H]  for branch b = 1..n
    logits_b = h_b @ E^T + bias                        # [B,T,V]  E = word embeddings [V,H]
    p        = mean_b softmax(logits_b)                # [B,T,V]  the prediction

So n branches cost n*(H*H + 3H) parameters on top of one head, not n vocabulary matrices. ``branches: 1`` is the
single head of the ablation. During distillation each branch gets its own teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class HeadBranch(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class EnsembleHead(nn.Module):
    def __init__(self, word_embeddings: nn.Embedding, branches: int) -> None:
        super().__init__()
        if branches < 1:
            raise ValueError(f"ensemble head needs at least one branch, got {branches}")
        vocab, hidden = word_embeddings.weight.shape
        self.word_embeddings = word_embeddings  # shared with the fusion module (tied, not a copy)
        self.branches = nn.ModuleList(HeadBranch(hidden) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(vocab))

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def branch_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., H] -> logits [n, ..., V], one slice per branch."""
        weight = self.word_embeddings.weight                                      # [V,H]
        return torch.stack([F.linear(branch(hidden_states), weight, self.bias) for branch in self.branches])

    @staticmethod
    def ensemble_log_probs(branch_logits: torch.Tensor) -> torch.Tensor:
        """[n, ..., V] logits -> log of the mean of the branches' probabilities [..., V]."""
        n = branch_logits.shape[0]
        return torch.logsumexp(F.log_softmax(branch_logits, dim=-1), dim=0) - math.log(n)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The prediction: log mean probability over branches, [..., V]."""
        return self.ensemble_log_probs(self.branch_logits(hidden_states))
