"""Knowledge distillation of a LightCap student from LightCap teachers (same family, larger fusion module).

Three kinds, each switchable in the ``kd`` config section (the training job combines them):

(a) ``token_kd_loss``: KL(teacher || student) of the next-token distributions at temperature tau, times tau^2
    (Hinton et al.). With an ensemble head, ``branch_token_kd_loss`` gives branch i its own teacher i; a single
    head learns the mean of the teachers' distributions.
(b) ``RepresentationDistiller``: TinyBERT-style intermediate-layer distillation. Student layer l (0 = the
    embedding output) learns from teacher layer g(l) = round(l * L_t / L_s):
      hidden states: MSE(W_i h_s, h_t) with a learned projection W_i per teacher (identity when widths match);
      attention:     KL between the head-averaged attention distributions of each query (heads may differ).
    Averaged over the teachers, on valid positions only. The projections are training-only; they are not
    part of the published student.
(c) sequence-level KD (Kim & Rush): the student is also trained on the teachers' own captions of the training
    images -- a data change, done by the training job (``training/lightcap.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-8


def token_kd_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor, temperature: float
) -> torch.Tensor:
    """student_logits [B,T,V], teacher_probs [B,T,V] (already softened at ``temperature``), valid [B,T]."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher_probs * (torch.log(teacher_probs.clamp_min(EPS)) - log_student)).sum(-1)  # [B,T]
    weights = valid.float()
    return (kl * weights).sum() / weights.sum().clamp_min(1.0) * temperature**2


def teacher_soft_targets(teacher_logits: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    return [F.softmax(t / temperature, dim=-1) for t in teacher_logits]


def branch_token_kd_loss(
    student_branch_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    valid: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """student_branch_logits [n,B,T,V]; teacher_logits: m tensors [B,T,V].

    n == 1: the single head learns the mean of the m teachers' distributions. Otherwise branch i learns from
    teacher i mod m (the paper: three branches, three teachers, one each).
    """
    n = student_branch_logits.shape[0]
    soft = teacher_soft_targets(teacher_logits, temperature)
    if n == 1:
        return token_kd_loss(student_branch_logits[0], torch.stack(soft).mean(0), valid, temperature)
    losses = [token_kd_loss(student_branch_logits[i], soft[i % len(soft)], valid, temperature) for i in range(n)]
    return torch.stack(losses).mean()


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """For each student hidden state 0..L_s (0 = embeddings), the teacher hidden state it learns from."""
    return [round(layer * teacher_layers / student_layers) for layer in range(student_layers + 1)]


class RepresentationDistiller(nn.Module):
    def __init__(self, student_hidden: int, student_layers: int, teachers: Sequence[tuple[int, int]]) -> None:
        """``teachers``: (hidden size, number of layers) of each teacher."""
        super().__init__()
        self.student_layers = int(student_layers)
        self.maps = [layer_map(student_layers, layers) for _, layers in teachers]
        self.projections = nn.ModuleList(
            nn.Identity() if hidden == student_hidden else nn.Linear(student_hidden, hidden) for hidden, _ in teachers
        )

    def hidden_loss(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[Sequence[torch.Tensor]],
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """student_hidden: L_s+1 tensors [B,L,H_s]; teacher_hidden: per teacher L_t+1 tensors [B,L,H_t]."""
        weights = valid.float()[..., None]                                          # [B,L,1]
        losses = []
        for proj, mapping, hidden_t in zip(self.projections, self.maps, teacher_hidden, strict=True):
            for layer_s, layer_t in enumerate(mapping):
                diff = (proj(student_hidden[layer_s]) - hidden_t[layer_t]) ** 2          # [B,L,H_t]
                losses.append((diff * weights).sum() / (weights.sum() * diff.shape[-1]).clamp_min(1.0))
        return torch.stack(losses).mean()

    def attention_loss(
        self,
        student_attn: Sequence[torch.Tensor],
        teacher_attn: Sequence[Sequence[torch.Tensor]],
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """student_attn: L_s tensors [B,heads,L,L]; teacher_attn: per teacher L_t tensors; valid [B,L]."""
        weights = valid.float()                                                       # [B,L] query rows
        losses = []
        for mapping, attn_t in zip(self.maps, teacher_attn, strict=True):
            for layer_s in range(1, self.student_layers + 1):
                layer_t = max(1, mapping[layer_s])
                p_s = student_attn[layer_s - 1].mean(1)                                    # [B,L,L]
                p_t = attn_t[layer_t - 1].mean(1)                                          # [B,L,L]
                kl = (p_t * (torch.log(p_t.clamp_min(EPS)) - torch.log(p_s.clamp_min(EPS)))).sum(-1)  # [B,L]
                losses.append((kl * weights).sum() / weights.sum().clamp_min(1.0))
        return torch.stack(losses).mean()
