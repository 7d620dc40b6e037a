"""The UCM cross-modal distillation captioner (seed 000), read top to bottom.

Four pieces, trained in four stages (training/ucm_*.py):

1. ``TextEncoder`` + ``TextDecoder`` = ``TextAutoencoder``: a 2-layer LSTM reads a caption; its final *cell*
   state (num_layers x hidden, flattened) is the text code; the decoder LSTM starts from that code and
   reconstructs the caption with teacher forcing.
2. ``MultiLabelClassifier``: a torchvision ResNet trunk, average pooling and a 17-label head (BCE).
3. ``ImageEncoder``: the classifier's trunk with a new linear code head whose output has the text code's
   size; distillation pulls it onto the text codes of the image's captions.
4. ``Captioner``: image encoder -> code -> pre-trained text decoder, fine-tuned with cross-entropy. With
   ``attention_dim > 0`` the decoder also attends over the trunk's spatial grid at every step (the seed's
   future work); the context enters through a zero-initialised projection, so the attention decoder starts
   out as exactly the pre-trained one.

Sizes come from ``captioning/configs/ucm/<profile>.yaml``: one code path for the paper profile (ResNet-50,
300-d embeddings, 2 x 1024 LSTM -> 2048-d codes) and the tiny one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from captioning.config_schema import UCMImage, UCMText, expect_section
from captioning.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def code_dim(text: UCMText) -> int:
    """The text code is the final cell state of every LSTM layer: num_layers * hidden_dim."""
    text = expect_section(text, UCMText, "code_dim(text)")
    return text.num_layers * text.hidden_dim


def _lstm_dims(vocab_size: int, text: UCMText) -> dict[str, Any]:
    """The ``TextEncoder`` / ``TextDecoder`` sizes of a ``text`` section."""
    return dict(
        vocab_size=vocab_size,
        embed_dim=text.embed_dim,
        hidden_dim=text.hidden_dim,
        num_layers=text.num_layers,
        dropout=text.dropout,
    )


# ============================================================================================== text side
class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.code_dim = num_layers * hidden_dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (words + <eos>, padded), lengths [B] -> code [B, num_layers * hidden]."""
        embedded = self.embed(tokens)  # [B, T, E]
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (_, cell) = self.lstm(packed)  # cell [L, B, H]
        return cell.transpose(0, 1).reshape(tokens.shape[0], self.code_dim)


class GridAttention(nn.Module):
    """Additive (Bahdanau) attention of the decoder state over image grid features."""

    def __init__(self, query_dim: int, feature_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(query_dim, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, query: torch.Tensor, grid: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [N, Hq], grid [N, P, C], keys [N, P, A] -> context [N, C], weights [N, P]."""
        energy = self.score(torch.tanh(keys + self.query(query)[:, None, :])).squeeze(-1)  # [N, P]
        weights = energy.softmax(dim=-1)
        context = torch.bmm(weights[:, None, :], grid).squeeze(1)  # [N, C]
        return context, weights


class TextDecoder(nn.Module):
    """LSTM language model started from a code; optionally attends over an image grid each step.

    Decoding interface (captioning.decoding.StepModel): ``init_state(code | (code, grid))``, ``step``,
    ``reorder``; the state is a dict of tensors whose batch dimension ``reorder`` knows.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        dropout: float = 0.0,
        attention_dim: int = 0,
        feature_dim: int = 0,
    ):
        super().__init__()
        self.num_layers, self.hidden_dim = num_layers, hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.attention: GridAttention | None = None
        if attention_dim:
            if not feature_dim:
                raise ConfigError("an attention decoder needs the image grid's feature_dim")
            self.attention = GridAttention(hidden_dim, feature_dim, attention_dim)
            self.context_proj = nn.Linear(feature_dim, embed_dim)
            nn.init.zeros_(self.context_proj.weight)  # starts as the plain pre-trained decoder
            nn.init.zeros_(self.context_proj.bias)

    # -------------------------------------------------------------------------------- state
    def initial_state(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """code [B, L*H] -> (h0, c0) each [L, B, H]: the code is the cell state; h0 = tanh(c0)."""
        cell = code.reshape(code.shape[0], self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()
        return torch.tanh(cell), cell

    def init_state(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        code, grid = batch if isinstance(batch, tuple) else (batch, None)
        h, c = self.initial_state(code)
        state = {"h": h, "c": c}
        if self.attention is not None:
            if grid is None:
                raise ValueError("the attention decoder needs the image grid")
            state["grid"] = grid
            state["keys"] = self.attention.key(grid)
        return state

    def reorder(self, state: dict[str, torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.index_select(1 if k in ("h", "c") else 0, indices.to(v.device)) for k, v in state.items()}

    # -------------------------------------------------------------------------------- steps
    def step_logits(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """tokens [N] -> logits [N, V] for the next token, new state."""
        x = self.embed(tokens)  # [N, E]
        new_state = dict(state)
        if self.attention is not None:
            context, weights = self.attention(state["h"][-1], state["grid"], state["keys"])
            x = x + self.context_proj(context)
        output, (h, c) = self.lstm(x[:, None, :], (state["h"], state["c"]))
        new_state["h"], new_state["c"] = h, c
        return self.out(self.dropout(output[:, 0])), new_state

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits, state = self.step_logits(tokens, state)
        return logits.log_softmax(dim=-1), state

    def forward(
        self,
        code: torch.Tensor,
        inputs: torch.Tensor,
        grid: torch.Tensor | None = None,
        teacher_forcing: float = 1.0,
    ) -> torch.Tensor:
        """code [B, D], inputs [B, T] (<bos> + words) -> logits [B, T, V] for (words + <eos>).

        With ``teacher_forcing < 1`` each step feeds the model's own previous prediction instead of the
        ground-truth token with probability ``1 - teacher_forcing`` (per sequence and step).
        """
        if self.attention is None and teacher_forcing >= 1.0:
            h, c = self.initial_state(code)
            output, _ = self.lstm(self.embed(inputs), (h, c))  # [B, T, H]
            return self.out(self.dropout(output))
        state = self.init_state((code, grid))
        logits_per_step = []
        tokens = inputs[:, 0]
        for t in range(inputs.shape[1]):
            logits, state = self.step_logits(tokens, state)
            logits_per_step.append(logits)
            if t + 1 < inputs.shape[1]:
                tokens = inputs[:, t + 1]
                if teacher_forcing < 1.0:
                    own = logits.argmax(dim=-1)
                    use_own = torch.rand(tokens.shape, device=tokens.device) >= teacher_forcing
                    tokens = torch.where(use_own & (tokens != PAD_ID), own, tokens)
        return torch.stack(logits_per_step, dim=1)


class TextAutoencoder(nn.Module):
    def __init__(self, vocab_size: int, text: UCMText):
        super().__init__()
        dims = _lstm_dims(vocab_size, expect_section(text, UCMText, "TextAutoencoder(text)"))
        self.encoder = TextEncoder(**dims)
        self.decoder = TextDecoder(**dims)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, inputs: torch.Tensor, teacher_forcing: float = 1.0):
        """tokens/lengths: what the encoder reads; inputs: <bos> + words -> logits [B, T, V]."""
        return self.decoder(self.encoder(tokens, lengths), inputs, teacher_forcing=teacher_forcing)


# ============================================================================================= image side
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet up to stage ``stages`` (1-4), without pooling and fc.

    Submodules keep torchvision's names (conv1, bn1, layer1 ...) so an ImageNet state dict of the same
    architecture loads straight in (``load_pretrained``).
    """

    def __init__(self, image: UCMImage):
        super().__init__()
        image = expect_section(image, UCMImage, "ResNetTrunk(image)")
        # the schema checked block (basic / bottleneck), 4 stage depths and stages 1-4
        block = BLOCKS[image.block]
        stages = image.stages
        resnet = ResNet(block, list(image.layers))
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.stages = stages
        for i in range(1, stages + 1):
            setattr(self, f"layer{i}", getattr(resnet, f"layer{i}"))
        self.feature_dim = 64 * 2 ** (stages - 1) * block.expansion
        # speed only (shapes and weights are unchanged): NHWC convolutions and bf16/fp16 autocast
        self.channels_last = image.channels_last
        self.autocast_dtype = getattr(torch, image.autocast) if image.autocast else None
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def optimize_for_inference(self, dtype: torch.dtype = torch.float32, *, fold: bool = True, channels_last: bool = True) -> int:
        """Inference only: fold the batch norms into the convolutions (``fold``), keep the weights in ``dtype``
        (the input is cast to it in ``forward``) and lay them out channels-last. Returns the BNs folded."""
        from captioning.accel import fold_batch_norms

        folded = fold_batch_norms(self.eval()) if fold else 0
        self.to(dtype=dtype)
        if channels_last:
            self.channels_last = True
            self.to(memory_format=torch.channels_last)
        return folded

    accelerated = None  # an OpenVinoNet running this trunk (``use_openvino``), else torch runs it

    def use_openvino(self, precision: str, size: int) -> None:
        """Run this (folded) trunk on OpenVINO in ``precision`` for CPU batches of ``size`` x ``size`` pixels;
        other inputs keep torch. Inference only, after ``optimize_for_inference``."""
        from captioning.ov_runtime import OpenVinoNet

        self.accelerated = None  # convert the torch forward, not this one
        autocast, self.autocast_dtype = self.autocast_dtype, None
        try:
            net = OpenVinoNet(self, torch.zeros(1, 3, size, size), precision=precision, name="UCM ResNet trunk")
        finally:
            self.autocast_dtype = autocast
        self.accelerated = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> grid [B, C, S/2^(stages+1), S/2^(stages+1)] (float32)."""
        if self.accelerated is not None and self.accelerated.accepts(images):
            return self.accelerated(images)
        weight_dtype = self.conv1.weight.dtype
        if images.dtype != weight_dtype and self.autocast_dtype is None:
            images = images.to(weight_dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
            for i in range(1, self.stages + 1):
                x = getattr(self, f"layer{i}")(x)
        return x.float()

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Load an ImageNet state dict (torchvision layout; ``fc.*`` and later stages ignored).

        Returns the ignored keys; raises ConfigError naming the file when trunk weights are missing or
        have another shape.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: pretrained ResNet state dict not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
            raise ConfigError(f"{path}: not a readable torch state dict ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"{path}: expected a state dict (mapping of tensors), got {type(state).__name__}")
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(
                f"{path}: not a state dict of this ResNet ({len(missing)} trunk weights missing, e.g. {missing[:3]})"
            )
        wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise ConfigError(
                f"{path}: weight {k} has shape {tuple(state[k].shape)}, this ResNet needs {tuple(own[k].shape)} "
                f"(check image.block / image.layers)"
            )
        self.load_state_dict({k: state[k] for k in own})
        return sorted(k for k in state if k not in own)


class MultiLabelClassifier(nn.Module):
    def __init__(self, image: UCMImage, num_labels: int):
        super().__init__()
        image = expect_section(image, UCMImage, "MultiLabelClassifier(image)")
        self.trunk = ResNetTrunk(image)
        self.dropout = nn.Dropout(image.dropout)
        self.head = nn.Linear(self.trunk.feature_dim, num_labels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).mean(dim=(2, 3))  # [B, C] global average pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> label logits [B, num_labels]."""
        return self.head(self.dropout(self.features(images)))


class ImageEncoder(nn.Module):
    """Trunk + a linear code head sized like the text code."""

    def __init__(self, image: UCMImage, code_dim: int):
        super().__init__()
        self.trunk = ResNetTrunk(expect_section(image, UCMImage, "ImageEncoder(image)"))
        self.code_head = nn.Linear(self.trunk.feature_dim, code_dim)

    @property
    def feature_dim(self) -> int:
        return self.trunk.feature_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> code [B, D], grid [B, P, C] (P = grid cells)."""
        grid = self.trunk(images)  # [B, C, h, w]
        code = self.code_head(grid.mean(dim=(2, 3)))
        return code, grid.flatten(2).transpose(1, 2)


class DistillPair(nn.Module):
    """Stage 3: the image encoder (classifier trunk + new code head) and the pre-trained text encoder."""

    def __init__(self, vocab_size: int, text: UCMText, image: UCMImage):
        super().__init__()
        text = expect_section(text, UCMText, "DistillPair(text)")
        self.image = ImageEncoder(expect_section(image, UCMImage, "DistillPair(image)"), code_dim(text))
        self.text = TextEncoder(**_lstm_dims(vocab_size, text))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """-> image codes [B, D], text codes of the captions [M, D]."""
        return self.image(images)[0], self.text(tokens, lengths)


class Captioner(nn.Module):
    """Distilled image encoder + pre-trained text decoder; a ``StepModel`` over image batches."""

    def __init__(self, vocab_size: int, text: UCMText, image: UCMImage, attention_dim: int = 0):
        """``attention_dim``: the ``captioner.attention_dim`` of the config (0: the plain decoder)."""
        super().__init__()
        text = expect_section(text, UCMText, "Captioner(text)")
        self.encoder = ImageEncoder(expect_section(image, UCMImage, "Captioner(image)"), code_dim(text))
        self.decoder = TextDecoder(
            **_lstm_dims(vocab_size, text),
            attention_dim=int(attention_dim),
            feature_dim=self.encoder.feature_dim,
        )

    def forward(
        self,
        images: torch.Tensor,
        inputs: torch.Tensor,
        owner: torch.Tensor | None = None,
        teacher_forcing: float = 1.0,
    ) -> torch.Tensor:
        """images [B, 3, S, S], inputs [M, T] -> logits [M, T, V]; caption m describes image ``owner[m]``
        (default: one caption per image), so an image is encoded once for all its captions."""
        code, grid = self.encoder(images)
        if owner is not None:
            code, grid = code[owner], grid[owner]
        return self.decoder(code, inputs, grid=grid, teacher_forcing=teacher_forcing)

    # decoding.StepModel
    def init_state(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.init_state(self.encoder(images))

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        return self.decoder.step(tokens, state)

    def reorder(self, state: dict[str, torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.reorder(state, indices)


# ================================================================================================ losses
def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the non-pad targets. logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_ID, label_smoothing=label_smoothing
    )


def distill_loss(image_code: torch.Tensor, text_codes: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between each image code and the codes of its captions.

    image_code [B, D], text_codes [B, S, D] (S captions per image, padded), mask [B, S] (1 = a caption).
    ``mse``: mean squared error per element; ``cosine``: 1 - cosine similarity. Averaged over captions.
    """
    if kind == "mse":
        per_caption = ((text_codes - image_code[:, None, :]) ** 2).mean(dim=-1)  # [B, S]
    elif kind == "cosine":
        per_caption = 1.0 - F.cosine_similarity(text_codes, image_code[:, None, :].expand_as(text_codes), dim=-1)
    else:
        raise ConfigError(f"distill.loss must be 'mse' or 'cosine', got {kind!r}")
    mask = mask.to(per_caption.dtype)
    return (per_caption * mask).sum() / mask.sum().clamp_min(1.0)
