"""Cross-modal modulator: the retrieved concepts re-weight the CLIP grid channel-wise.

The concepts of an image (their CLIP text embeddings ``"a photo of a [object]"``, with the extractor's scores)
are pooled into one vector, which an MLP turns into one gate per grid channel::

    c    = sum_k s_k e_k / sum_k s_k                  # [B, D_concept]   score-weighted mean of valid concepts
    gate = 2 * sigmoid(W2 gelu(W1 c))                 # [B, C]           in (0, 2); W2 starts at 0 -> gate 1
    grid = grid * gate[:, :, None, None]              # [B, C, h, w]

The last layer starts at zero, so an untrained modulator is the identity and training moves it away only as far
as it helps. An image with no concepts gets c = 0.
"""

from __future__ import annotations

import torch
from torch import nn


class ConceptModulator(nn.Module):
    def __init__(self, concept_dim: int, grid_channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(concept_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, grid_channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def gate(self, concept_embeds: torch.Tensor, concept_scores: torch.Tensor) -> torch.Tensor:
        """concept_embeds [B,K,D], concept_scores [B,K] (0 for padding) -> gate [B,C]."""
        weights = concept_scores.clamp_min(0).unsqueeze(-1)                       # [B,K,1]
        pooled = (weights * concept_embeds).sum(1) / weights.sum(1).clamp_min(1e-6)  # [B,D]
        return 2.0 * torch.sigmoid(self.fc2(self.act(self.fc1(pooled))))          # [B,C]

    def forward(
        self, grid: torch.Tensor, concept_embeds: torch.Tensor, concept_scores: torch.Tensor
    ) -> torch.Tensor:
        """grid [B,C,h,w] -> modulated grid [B,C,h,w]."""
        return grid * self.gate(concept_embeds, concept_scores)[:, :, None, None]
