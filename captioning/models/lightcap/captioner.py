"""The LightCap captioner: modulated CLIP grid + concept tokens -> TinyBERT prefix LM -> ensemble head.

Read top to bottom::

    grid     [B,C,h,w]   frozen CLIP ResNet trunk (GridEncoder), computed outside this module
    concepts             the concept extractor's top-K concepts of each image (ConceptInputs):
                         CLIP text embeddings [B,K,D] + scores [B,K] (modulator), word pieces [B,Kt] (tokens)
    grid     = modulator(grid, concepts)                      # channel-wise gate (optional)
    grid     = adaptive_avg_pool(grid, visual_grid)           # optional: fewer visual tokens (tiny profile)
    visual   = LayerNorm(W_v grid.flatten)                    # [B,h*w,H]  visual tokens
    concept  = word_embeddings(concept pieces)                # [B,Kt,H]   concept tokens (optional)
    hidden   = fusion([visual | concept | caption])           # prefix-LM BERT, [B,P+T,H]
    logits   = ensemble_head(hidden[:, P:])                   # [n_branches,B,T,V]

Architecture numbers live in one ``arch`` dict (saved as ``model.json`` next to the weights), so a stored
model is rebuilt exactly; ``build_arch(config.model, ...)`` makes it from a profile's typed ``model`` section
(``captioning.config_schema.CaptionerCfg``), and its ``fusion`` entry is read back as a ``FusionCfg``.
Teachers are the same class with a bigger ``fusion`` section and one head branch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from captioning.config_schema import CaptionerCfg, FusionCfg, expect_section
from captioning.errors import ConfigError
from captioning.models.lightcap.fusion import CAPTION_TYPE, PREFIX_TYPE, PrefixLMFusion
from captioning.models.lightcap.head import EnsembleHead
from captioning.models.lightcap.modulator import ConceptModulator
from captioning.models.lightcap.tokenizer import CaptionTokenizer

ARCH_KEYS = (
    "grid_channels", "concept_dim", "vocab_size", "fusion", "use_concepts", "use_modulator",
    "modulator_hidden", "head_branches", "max_concepts", "max_concept_tokens", "max_caption_length", "visual_grid",
)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class ConceptInputs:
    """The concepts of a batch of images, ready for the captioner."""

    embeds: torch.Tensor       # [B,K,D] CLIP text embeddings of the concepts (zeros where padded)
    scores: torch.Tensor       # [B,K]   extractor scores (0 where padded)
    token_ids: torch.Tensor    # [B,Kt]  word pieces of the concept words, best concept first
    token_valid: torch.Tensor  # [B,Kt]  bool

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, rows: torch.Tensor | slice) -> ConceptInputs:
        return ConceptInputs(self.embeds[rows], self.scores[rows], self.token_ids[rows], self.token_valid[rows])

    def to(self, device: torch.device | str) -> ConceptInputs:
        return ConceptInputs(
            self.embeds.to(device), self.scores.to(device), self.token_ids.to(device), self.token_valid.to(device)
        )

    @staticmethod
    def cat(parts: Sequence[ConceptInputs]) -> ConceptInputs:
        return ConceptInputs(*(torch.cat([getattr(p, f) for p in parts]) for f in ("embeds", "scores", "token_ids", "token_valid")))


class ConceptPacker:
    """Turns the concept extractor's padded output into ``ConceptInputs``.

    ``words``/``embeddings``: the extractor's concept vocabulary and its CLIP text embeddings ``[N_words, D]``
    (no text is encoded here). Input: ``concept_ids [B,K']`` (-1 = none) and ``scores [B,K']``, as
    ``ConceptExtractor.extract_tensors`` returns them. Concepts are taken best score first, at most
    ``max_concepts``, and their word pieces are concatenated up to ``max_concept_tokens``.
    """

    def __init__(
        self,
        words: Sequence[str],
        embeddings: torch.Tensor,
        tokenizer: CaptionTokenizer,
        *,
        max_concepts: int,
        max_concept_tokens: int,
    ) -> None:
        if len(words) != embeddings.shape[0]:
            raise ConfigError(f"concept vocabulary has {len(words)} words but {embeddings.shape[0]} embeddings")
        self.words = list(words)
        self.embeddings = embeddings.float()                                        # [N_words, D]
        self.max_concepts = int(max_concepts)
        self.max_concept_tokens = int(max_concept_tokens)
        self.pieces = [tokenizer.encode(w) for w in self.words]                     # word pieces per concept id

    def __call__(self, concept_ids: torch.Tensor, scores: torch.Tensor) -> ConceptInputs:
        B, K, Kt = concept_ids.shape[0], self.max_concepts, self.max_concept_tokens
        if concept_ids.numel() and int(concept_ids.max()) >= len(self.words):
            raise ConfigError(f"concept id {int(concept_ids.max())} is outside the vocabulary of {len(self.words)}")
        scores = torch.where(concept_ids >= 0, scores.float(), torch.full_like(scores.float(), -1.0))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :K]    # best first
        ids = concept_ids.gather(1, order)                                            # [B,<=K]
        top_scores = scores.gather(1, order).clamp_min(0.0)
        valid = ids >= 0
        out_scores = torch.zeros(B, K)
        out_scores[:, : ids.shape[1]] = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        embeds = torch.zeros(B, K, self.embeddings.shape[1])
        embeds[:, : ids.shape[1]] = self.embeddings[ids.clamp_min(0)] * valid[..., None]
        token_ids = torch.zeros(B, Kt, dtype=torch.long)
        token_valid = torch.zeros(B, Kt, dtype=torch.bool)
        for b in range(B):
            pieces = [p for cid in ids[b].tolist() if cid >= 0 for p in self.pieces[cid]][:Kt]
            if pieces:
                token_ids[b, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
                token_valid[b, : len(pieces)] = True
        return ConceptInputs(embeds, out_scores, token_ids, token_valid)


# ---------------------------------------------------------------------------------------------- model
def build_arch(model: CaptionerCfg, *, grid_channels: int, concept_dim: int, vocab_size: int) -> dict[str, Any]:
    """The architecture dict (``model.json``'s ``arch``) of a ``model`` / ``teacher`` config section, given the
    extractor's and tokenizer's sizes. ``arch["fusion"]`` is the section's ``fusion`` as given, less
    ``pretrained`` (a stored model rebuilds without the directory it started from)."""
    model = expect_section(model, CaptionerCfg, "build_arch(model)")
    return {
        "grid_channels": int(grid_channels),
        "concept_dim": int(concept_dim),
        "vocab_size": int(vocab_size),
        "fusion": _arch_fusion_dict(model.fusion),
        "use_concepts": model.use_concepts,
        "use_modulator": model.use_modulator,
        "modulator_hidden": model.modulator_hidden,
        "head_branches": model.head_branches,
        "max_concepts": model.max_concepts,
        "max_concept_tokens": model.max_concept_tokens,
        "max_caption_length": model.max_caption_length,
        "visual_grid": model.visual_grid or None,
    }


def _arch_fusion_dict(fusion: FusionCfg) -> dict[str, Any]:
    """The keys given, without ``pretrained``; ``vocab_size`` (set by ``build_captioner``) last, as always stored."""
    given = fusion.to_dict()
    out = {k: v for k, v in given.items() if k not in ("pretrained", "vocab_size")}
    if "vocab_size" in given:
        out["vocab_size"] = given["vocab_size"]
    return out


def arch_fusion(arch: dict[str, Any]) -> FusionCfg:
    """The typed ``fusion`` section of an architecture dict (``model.json``), checked by the config schema."""
    from pydantic import ValidationError

    try:
        return FusionCfg.model_validate(arch["fusion"])
    except ValidationError as exc:
        raise ConfigError(f"lightcap architecture: fusion does not fit the config schema: {exc}") from None


@dataclass
class LightCapOutput:
    branch_logits: torch.Tensor                  # [n,B,T,V] one slice per head branch (caption positions)
    hidden_states: tuple[torch.Tensor, ...] | None  # (embeddings, layer 1, ..., layer N), each [B,P+T,H]
    attentions: tuple[torch.Tensor, ...] | None     # per layer [B,heads,P+T,P+T]
    sequence_valid: torch.Tensor                  # [B,P+T] bool
    prefix_length: int


class LightCapCaptioner(nn.Module):
    def __init__(self, arch: dict[str, Any], *, pretrained_dir: str | None = None) -> None:
        super().__init__()
        missing = [k for k in ARCH_KEYS if k not in arch]
        if missing:
            raise ConfigError(f"lightcap architecture is missing {missing}")
        self.arch = dict(arch)
        self.fusion = PrefixLMFusion(arch_fusion(arch), arch["vocab_size"], pretrained_dir=pretrained_dir)
        hidden = self.fusion.hidden_size
        self.modulator = (
            ConceptModulator(arch["concept_dim"], arch["grid_channels"], arch["modulator_hidden"])
            if arch["use_modulator"]
            else None
        )
        self.visual_proj = nn.Linear(arch["grid_channels"], hidden)
        self.visual_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.head = EnsembleHead(self.fusion.word_embeddings, arch["head_branches"])

    # ------------------------------------------------------------------ pieces
    @property
    def use_concepts(self) -> bool:
        return bool(self.arch["use_concepts"])

    def num_parameters(self) -> int:
        """Trainable parameters of the captioner (tied embeddings counted once; the frozen CLIP trunk and the
        concept extractor are separate models)."""
        return sum(p.numel() for p in self.parameters())

    def prefix(self, grid: torch.Tensor, concepts: ConceptInputs | None) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [B,C,h,w] + concepts -> prefix embeddings [B,P,H] and validity [B,P]."""
        if grid.shape[1] != self.arch["grid_channels"]:
            raise ConfigError(f"grid has {grid.shape[1]} channels, the captioner expects {self.arch['grid_channels']}")
        if self.modulator is not None:
            if concepts is None:
                raise ConfigError("this captioner's modulator needs concepts")
            grid = self.modulator(grid, concepts.embeds, concepts.scores)                  # [B,C,h,w]
        if self.arch["visual_grid"]:
            grid = F.adaptive_avg_pool2d(grid, self.arch["visual_grid"])                     # [B,C,g,g]
        visual = self.visual_norm(self.visual_proj(grid.flatten(2).transpose(1, 2)))      # [B,hw,H]
        visual_valid = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        if not self.use_concepts:
            return visual, visual_valid
        if concepts is None:
            raise ConfigError("this captioner uses concept tokens but got no concepts")
        concept_tokens = self.fusion.word_embeddings(concepts.token_ids)                  # [B,Kt,H]
        return (
            torch.cat([visual, concept_tokens], dim=1),
            torch.cat([visual_valid, concepts.token_valid], dim=1),
        )

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        grid: torch.Tensor,
        concepts: ConceptInputs | None,
        caption_in: torch.Tensor,        # [B,T] ids starting with [CLS]
        caption_valid: torch.Tensor,     # [B,T] bool
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> LightCapOutput:
        prefix_embeds, prefix_valid = self.prefix(grid, concepts)
        out = self.fusion(
            prefix_embeds, prefix_valid, caption_in, caption_valid,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        P = prefix_embeds.shape[1]
        caption_hidden = out.last_hidden_state[:, P:]                                    # [B,T,H]
        return LightCapOutput(
            branch_logits=self.head.branch_logits(caption_hidden),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
            sequence_valid=torch.cat([prefix_valid, caption_valid], dim=1),
            prefix_length=P,
        )

    # ------------------------------------------------------------------ decoding
    def decoder(self, *, use_cache: bool = True) -> LightCapDecoder:
        return LightCapDecoder(self, use_cache=use_cache)

    @torch.no_grad()
    def generate(
        self,
        grid: torch.Tensor,
        concepts: ConceptInputs | None,
        options,
        *,
        bos_id: int,
        eos_id: int,
        use_cache: bool = True,
        fast: bool = False,
        compiled: bool = True,
        kept: FastLightCapDecoder | None = None,
    ):
        """Greedy / beam search (``captioning.decoding``) -> one ``Hypothesis`` per image.

        ``fast``: ``FastLightCapDecoder`` (shared prefix, preallocated cache) and ``decoding.beam_search``; on
        the CPU, unless ``compiled=False``, the same search and steps run as one compiled loop
        (``compiled_search``: same outputs, a fraction of the per-operator overhead). Else ``LightCapDecoder``
        (``use_cache`` picks its HF ``DynamicCache`` or the uncached reference) and the reference beam search loop.
        ``kept``: a fast decoder that a caller whose weights no longer change built once (the served pipeline:
        its published decoding's), used when its ``max_steps`` fits ``options``; a decoder holds fused copies of
        some weights and views of the others, about 0.3 ms to build and pack for the compiled search, so it is
        only for frozen weights. Any other length, and every call without one (training's validation, whose
        weights move), builds one for the call (one kept per request-chosen length would grow memory with each)."""
        from captioning.decoding import decode
        from captioning.models.lightcap import compiled_search

        if not fast:
            decoder = self.decoder(use_cache=use_cache)
        else:  # a decoder is read-only: callers on other threads may share a kept one
            steps = options.max_length + 1
            decoder = kept if kept is not None and kept.max_steps == steps else FastLightCapDecoder(self, steps)
            if compiled and grid.device.type == "cpu":
                return compiled_search.search(decoder, (grid, concepts), options, bos_id=bos_id, eos_id=eos_id)
        return decode(
            decoder, (grid, concepts), options, bos_id=bos_id, eos_id=eos_id, batch_size=grid.shape[0], reference=not fast
        )


def caption_loss(branch_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smoothing: float = 0.0):
    """Mean over branches of each branch's token cross-entropy. targets/valid [B,T]."""
    n, B, T, V = branch_logits.shape
    per_token = F.cross_entropy(
        branch_logits.reshape(n * B * T, V), targets.repeat(n, 1, 1).reshape(-1),
        reduction="none", label_smoothing=float(smoothing),
    ).view(n, B, T)
    weights = valid.float()
    return (per_token * weights).sum() / (weights.sum() * n).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- decoding
class LightCapDecoder:
    """``captioning.decoding.StepModel`` for a LightCapCaptioner.

    Cached (default): ``init_state`` runs the prefix once into a ``DynamicCache``; each ``step`` feeds one token
    against it (O(1) new tokens per step). Uncached: each step re-runs the whole sequence so far; kept as the
    reference the cache is tested against.
    """

    def __init__(self, model: LightCapCaptioner, *, use_cache: bool = True) -> None:
        self.model = model
        self.use_cache = use_cache

    def init_state(self, batch: tuple[torch.Tensor, ConceptInputs | None]) -> dict[str, Any]:
        grid, concepts = batch
        prefix_embeds, prefix_valid = self.model.prefix(grid, concepts)
        if self.use_cache:
            return {"key_valid": prefix_valid, "cache": self.model.fusion.prefill(prefix_embeds, prefix_valid)}
        tokens = torch.zeros(prefix_valid.shape[0], 0, dtype=torch.long, device=prefix_valid.device)
        return {"prefix_valid": prefix_valid, "prefix_embeds": prefix_embeds, "tokens": tokens}

    def step(self, last_tokens: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.use_cache:
            key_valid = torch.cat([state["key_valid"], torch.ones_like(state["key_valid"][:, :1])], dim=1)
            hidden = self.model.fusion.step(last_tokens, state["cache"], key_valid)          # [N,H]
            return self.model.head(hidden), {"key_valid": key_valid, "cache": state["cache"]}
        tokens = torch.cat([state["tokens"], last_tokens[:, None]], dim=1)                   # [N,t+1]
        out = self.model.fusion(
            state["prefix_embeds"], state["prefix_valid"], tokens, torch.ones_like(tokens, dtype=torch.bool)
        )
        hidden = out.last_hidden_state[:, -1]                                                 # [N,H]
        return self.model.head(hidden), {**state, "tokens": tokens}

    def reorder(self, state: dict[str, Any], indices: torch.Tensor) -> dict[str, Any]:
        if self.use_cache:
            state["cache"].reorder_cache(indices)
            return {"key_valid": state["key_valid"][indices], "cache": state["cache"]}
        return {k: v[indices] for k, v in state.items()}



class FastLightCapDecoder:
    """``captioning.decoding.StepModel`` for a LightCapCaptioner, written for speed; same outputs as
    ``LightCapDecoder`` (to float32 rounding: tests/test_fast_inference.py).

    * the prefix (visual + concept tokens) is run once per *image*; its keys/values ``[B,heads,P,d]`` are shared
      by that image's beams (rows ``b*G .. b*G+G-1``), never copied per beam;
    * the caption tokens' keys/values live in a preallocated time-major buffer ``[T, layers, 2, N, heads, d]``:
      a step writes slot ``t`` in place (no ``cat``), and a beam reorder is one ``index_select`` of the filled
      slots for all layers at once into a second buffer (ping-pong);
    * the BERT layers and the ensemble head run on the model's own weights with fused QKV and fused branch
      projections, without the per-call overhead of ``transformers``' generic modules.

    ``max_steps``: the most tokens that will be fed (``max_length + 1``). Rows are input-major: a reorder must keep
    each row with its image (as greedy and beam search in ``captioning.decoding`` do); it is checked.
    """

    def __init__(self, model: LightCapCaptioner, max_steps: int) -> None:
        self.model = model
        bert = model.fusion.bert
        cfg = bert.config
        self.max_steps = int(max_steps)
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.head_dim = self.hidden // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        emb = bert.embeddings
        self.word = emb.word_embeddings.weight
        self.positions = emb.position_embeddings.weight
        self.types = emb.token_type_embeddings.weight
        self.emb_norm = (emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        self.layers = []
        for layer in bert.encoder.layer:
            att = layer.attention
            self.layers.append(
                {
                    "qkv_w": torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight]),
                    "qkv_b": torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]),
                    "out_w": att.output.dense.weight, "out_b": att.output.dense.bias,
                    "norm1": (att.output.LayerNorm.weight, att.output.LayerNorm.bias, att.output.LayerNorm.eps),
                    "in_w": layer.intermediate.dense.weight, "in_b": layer.intermediate.dense.bias,
                    "ffn_w": layer.output.dense.weight, "ffn_b": layer.output.dense.bias,
                    "norm2": (layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, layer.output.LayerNorm.eps),
                }
            )
        act = getattr(cfg, "hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"the fast LightCap decoder supports BERT's 'gelu' activation, not {act!r}")
        head = model.head
        self.n_branches = head.num_branches
        self.branch_w = torch.cat([b.dense.weight for b in head.branches])                    # [n*H,H]
        self.branch_b = torch.cat([b.dense.bias for b in head.branches])                      # [n*H]
        self.branch_gamma = torch.stack([b.norm.weight for b in head.branches])               # [n,H]
        self.branch_beta = torch.stack([b.norm.bias for b in head.branches])                  # [n,H]
        self.branch_eps = head.branches[0].norm.eps
        self.vocab_bias = head.bias
        self.log_n = math.log(self.n_branches)

    # ------------------------------------------------------------------ pieces
    def _layer_norm(self, x: torch.Tensor, norm: tuple) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), norm[0], norm[1], norm[2])

    def _ffn(self, x: torch.Tensor, layer: dict[str, Any]) -> torch.Tensor:
        inner = F.gelu(F.linear(x, layer["in_w"], layer["in_b"]))
        return self._layer_norm(F.linear(inner, layer["ffn_w"], layer["ffn_b"]) + x, layer["norm2"])

    def head_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N,H] -> ensemble log-probabilities [N,V] (``EnsembleHead.forward``)."""
        N = hidden.shape[0]
        y = F.gelu(F.linear(hidden, self.branch_w, self.branch_b)).view(N, self.n_branches, self.hidden)
        y = F.layer_norm(y, (self.hidden,), None, None, self.branch_eps) * self.branch_gamma + self.branch_beta
        logits = F.linear(y, self.word, self.vocab_bias)                                      # [N,n,V]
        return torch.logsumexp(logits.log_softmax(dim=-1), dim=1) - self.log_n

    # ------------------------------------------------------------------ StepModel
    @torch.no_grad()
    def init_state(self, batch: tuple[torch.Tensor, ConceptInputs | None]) -> dict[str, Any]:
        grid, concepts = batch
        prefix_embeds, prefix_valid = self.model.prefix(grid, concepts)                      # [B,P,H], [B,P]
        B, P, H = prefix_embeds.shape
        h, d = self.heads, self.head_dim
        if P + self.max_steps > self.positions.shape[0]:
            raise ConfigError(f"prefix {P} + {self.max_steps} caption tokens exceed {self.positions.shape[0]} positions")
        x = prefix_embeds + self.types[PREFIX_TYPE] + self.positions[:P]
        x = self._layer_norm(x, self.emb_norm)
        mask = torch.zeros(B, 1, 1, P, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~prefix_valid[:, None, None, :], torch.finfo(x.dtype).min)  # [B,1,1,P]
        keys, values = [], []
        for layer in self.layers:
            q, k, v = F.linear(x, layer["qkv_w"], layer["qkv_b"]).view(B, P, 3, h, d).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                   # [B,h,P,d]
            keys.append(k * self.scale)  # pre-scaled: a step's scores are then q . k
            values.append(v)
            att = F.linear(ctx.transpose(1, 2).reshape(B, P, H), layer["out_w"], layer["out_b"])
            x = self._ffn(self._layer_norm(att + x, layer["norm1"]), layer)
        caption_base = self.types[CAPTION_TYPE] + self.positions[P : P + self.max_steps]   # [T,H]
        return {
            "prefix_k": keys, "prefix_v": values, "mask": mask, "B": B, "P": P, "G": 1, "t": 0,
            "cache": None, "spare": None, "caption_base": caption_base,
        }

    def _buffers(self, state: dict[str, Any], rows: int) -> torch.Tensor:
        ref = state["prefix_k"][0]
        return ref.new_empty(self.max_steps, len(self.layers), 2, rows, self.heads, self.head_dim)

    @torch.no_grad()
    def step(self, last_tokens: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        B, G, t = state["B"], state["G"], state["t"]
        N = B * G
        if last_tokens.shape[0] != N:
            raise ValueError(f"step got {last_tokens.shape[0]} rows, the state has {N}")
        if t >= self.max_steps:
            raise ValueError(f"the cache holds {self.max_steps} caption tokens; step {t + 1} is one too many")
        if state["cache"] is None:
            state["cache"], state["spare"] = self._buffers(state, N), self._buffers(state, N)
        cache = state["cache"]
        h, d, H = self.heads, self.head_dim, self.hidden
        x = self._layer_norm(self.word[last_tokens] + state["caption_base"][t], self.emb_norm)  # [N,H]
        for i, layer in enumerate(self.layers):
            q, k, v = F.linear(x, layer["qkv_w"], layer["qkv_b"]).view(N, 3, h, d).unbind(1)   # [N,h,d]
            cache[t, i, 0] = k * self.scale
            cache[t, i, 1] = v
            # prefix part: the image's keys, shared by its G rows: [B,h,G,d] @ [B,h,d,P] -> [B,h,G,P]
            q_img = q.view(B, G, h, d).transpose(1, 2)
            s_prefix = torch.matmul(q_img, state["prefix_k"][i].transpose(-1, -2)) + state["mask"]
            # caption part, per row: [N,h,1,d] @ [N,h,d,t+1] -> [N,h,1,t+1]
            own_k = cache[: t + 1, i, 0].permute(1, 2, 3, 0)                                  # [N,h,d,t+1]
            s_own = torch.matmul(q.unsqueeze(2), own_k).view(B, G, h, t + 1).transpose(1, 2)  # [B,h,G,t+1]
            probs = torch.cat([s_prefix, s_own], dim=-1).softmax(dim=-1)
            P = s_prefix.shape[-1]
            ctx = torch.matmul(probs[..., :P], state["prefix_v"][i])                         # [B,h,G,d]
            own_v = cache[: t + 1, i, 1].permute(1, 2, 0, 3)                                  # [N,h,t+1,d]
            p_own = probs[..., P:].transpose(1, 2).reshape(N, h, 1, t + 1)
            ctx = ctx.transpose(1, 2).reshape(N, h, d) + torch.matmul(p_own, own_v).view(N, h, d)
            att = F.linear(ctx.reshape(N, H), layer["out_w"], layer["out_b"])
            x = self._ffn(self._layer_norm(att + x, layer["norm1"]), layer)
        state["t"] = t + 1
        return self.head_log_probs(x), state

    def reorder(self, state: dict[str, Any], indices: torch.Tensor) -> dict[str, Any]:
        B, G, t = state["B"], state["G"], state["t"]
        rows = indices.shape[0]
        if rows % B:
            raise ValueError(f"reorder to {rows} rows: not a multiple of the {B} images")
        new_g = rows // B
        owner = torch.div(indices, G, rounding_mode="floor")
        expected = torch.arange(rows, device=indices.device) // new_g
        if not bool((owner == expected).all()):
            raise ValueError("reorder moved a row to another image: the fast decoder shares prefixes per image")
        if state["cache"] is not None:
            if new_g != G:
                state["spare"] = self._buffers(state, rows)
            if t:
                torch.index_select(state["cache"][:t], 3, indices, out=state["spare"][:t])
            state["cache"], state["spare"] = state["spare"], (state["cache"] if new_g == G else self._buffers(state, rows))
        state["G"] = new_g
        return state
