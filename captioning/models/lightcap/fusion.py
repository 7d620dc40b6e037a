"""Multi-modal fusion: a TinyBERT-shaped ``transformers.BertModel`` run as a prefix language model.

One sequence per image, ``L = P + T`` tokens::

    [ visual tokens (projected CLIP grid, h*w) | concept tokens (Kt word pieces) | caption tokens (T) ]
      <---------------------------- prefix, P ------------------------------>
    token type 1                                                              token type 0
    positions 0 .. P-1                                                        positions P .. P+T-1

Attention (the prefix-LM mask, additive, ``[B,1,L,L]``; BERT takes a prepared 4-D mask as is):

* prefix queries see every valid prefix key, never a caption key (so the prefix's keys/values do not depend on
  the caption and are computed once per image);
* caption query t sees every valid prefix key and caption keys 0..t (causal).

Decoding caches keys/values: ``prefill`` runs the prefix once into a ``transformers.DynamicCache``; ``step``
feeds one caption token per call against the cache. Both give exactly the hidden states of the full forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captioning.config_schema import FusionCfg, expect_section
from captioning.errors import ConfigError

PREFIX_TYPE, CAPTION_TYPE = 1, 0


def bert_config(fusion: FusionCfg, vocab_size: int):
    """``BertConfig`` from a ``fusion`` config section (the schema checked that heads divide hidden)."""
    from transformers import BertConfig

    fusion = expect_section(fusion, FusionCfg, "bert_config(fusion)")
    return BertConfig(
        vocab_size=int(vocab_size),
        hidden_size=fusion.hidden,
        num_hidden_layers=fusion.layers,
        num_attention_heads=fusion.heads,
        intermediate_size=fusion.intermediate,
        max_position_embeddings=fusion.max_positions,
        type_vocab_size=2,
        hidden_dropout_prob=fusion.dropout,
        attention_probs_dropout_prob=fusion.attention_dropout,
        pad_token_id=0,
    )


def prefix_lm_mask(prefix_valid: torch.Tensor, caption_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """prefix_valid [B,P], caption_valid [B,T] (bool) -> additive mask [B,1,P+T,P+T] (0 = attend)."""
    B, P = prefix_valid.shape
    T = caption_valid.shape[1]
    L = P + T
    device = prefix_valid.device
    key_valid = torch.cat([prefix_valid, caption_valid], dim=1)                      # [B,L]
    q = torch.arange(L, device=device)[:, None]                                      # [L,1]
    k = torch.arange(L, device=device)[None, :]                                      # [1,L]
    allowed = (k < P) | ((q >= P) & (k <= q))                                         # [L,L]: prefix keys, or causal
    allowed = allowed[None, :, :] & key_valid[:, None, :]                            # [B,L,L]
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def key_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """key_valid [B,S] -> additive mask [B,1,1,S] for one new query token that may see every valid key."""
    mask = torch.zeros(key_valid.shape[0], 1, 1, key_valid.shape[1], dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~key_valid[:, None, None, :], torch.finfo(dtype).min)


class PrefixLMFusion(nn.Module):
    def __init__(self, fusion: FusionCfg, vocab_size: int, *, pretrained_dir: str | Path | None = None) -> None:
        super().__init__()
        from transformers import BertModel

        fusion = expect_section(fusion, FusionCfg, "PrefixLMFusion(fusion)")
        if pretrained_dir:
            pretrained_dir = Path(pretrained_dir)
            if not (pretrained_dir / "config.json").is_file():
                raise ConfigError(f"fusion.pretrained: {pretrained_dir} has no config.json (a BERT directory expected)")
            self.bert = BertModel.from_pretrained(
                str(pretrained_dir), add_pooling_layer=False, local_files_only=True
            )
            if self.bert.config.vocab_size < vocab_size:
                raise ConfigError(
                    f"fusion.pretrained: {pretrained_dir} has {self.bert.config.vocab_size} word embeddings, "
                    f"the tokenizer needs {vocab_size}"
                )
        else:
            self.bert = BertModel(bert_config(fusion, vocab_size), add_pooling_layer=False)
        self.bert.set_attn_implementation(fusion.attention)

    # ------------------------------------------------------------------ shapes
    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.bert.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.bert.config.vocab_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def use_attention(self, implementation: str) -> None:
        """``eager`` (returns attention maps, needed for attention distillation) or ``sdpa`` (faster)."""
        if self.bert.config._attn_implementation != implementation:
            self.bert.set_attn_implementation(implementation)

    # ------------------------------------------------------------------ full sequence (training)
    def forward(
        self,
        prefix_embeds: torch.Tensor,      # [B,P,H]
        prefix_valid: torch.Tensor,       # [B,P] bool
        caption_ids: torch.Tensor,        # [B,T]
        caption_valid: torch.Tensor,      # [B,T] bool
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        B, P, _ = prefix_embeds.shape
        T = caption_ids.shape[1]
        caption_embeds = self.word_embeddings(caption_ids)                           # [B,T,H]
        inputs = torch.cat([prefix_embeds, caption_embeds], dim=1)                    # [B,L,H]
        types = torch.cat(
            [
                torch.full((B, P), PREFIX_TYPE, dtype=torch.long, device=inputs.device),
                torch.full((B, T), CAPTION_TYPE, dtype=torch.long, device=inputs.device),
            ],
            dim=1,
        )
        positions = torch.arange(P + T, device=inputs.device)[None].expand(B, -1)
        if output_attentions:
            self.use_attention("eager")
        return self.bert(
            inputs_embeds=inputs,
            attention_mask=prefix_lm_mask(prefix_valid, caption_valid, inputs.dtype),
            token_type_ids=types,
            position_ids=positions,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    # ------------------------------------------------------------------ cached decoding
    def prefill(self, prefix_embeds: torch.Tensor, prefix_valid: torch.Tensor):
        """Run the prefix once; returns the ``DynamicCache`` holding every layer's prefix keys/values."""
        from transformers.cache_utils import DynamicCache

        B, P, _ = prefix_embeds.shape
        cache = DynamicCache(config=self.bert.config)
        no_caption = torch.zeros(B, 0, dtype=torch.bool, device=prefix_embeds.device)
        self.bert(
            inputs_embeds=prefix_embeds,
            attention_mask=prefix_lm_mask(prefix_valid, no_caption, prefix_embeds.dtype),
            token_type_ids=torch.full((B, P), PREFIX_TYPE, dtype=torch.long, device=prefix_embeds.device),
            position_ids=torch.arange(P, device=prefix_embeds.device)[None].expand(B, -1),
            past_key_values=cache,
        )
        return cache

    def step(self, token_ids: torch.Tensor, cache, key_valid: torch.Tensor) -> torch.Tensor:
        """token_ids [B] at position ``cache length``; key_valid [B,S+1] covers cached keys and this token.

        Appends this token's keys/values to ``cache`` and returns its last hidden state [B,H].
        """
        B = token_ids.shape[0]
        position = cache.get_seq_length()
        embeds = self.word_embeddings(token_ids[:, None])                            # [B,1,H]
        out = self.bert(
            inputs_embeds=embeds,
            attention_mask=key_mask(key_valid, embeds.dtype),
            token_type_ids=torch.full((B, 1), CAPTION_TYPE, dtype=torch.long, device=embeds.device),
            position_ids=torch.full((B, 1), position, dtype=torch.long, device=embeds.device),
            past_key_values=cache,
        )
        return out.last_hidden_state[:, 0]
