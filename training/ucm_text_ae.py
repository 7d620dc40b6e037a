"""UCM stage 1: the LSTM text autoencoder (``captioner train ucm-text-ae``).

A 2-layer LSTM encoder reads each training caption; its final cell state is the text code; a 2-layer LSTM
decoder started from the code reconstructs the caption (cross-entropy, teacher forcing as configured).
Reports reconstruction BLEU-1..4 (greedy decoding from the code) on train / val / test; the seed reached
about 0.96 BLEU-4. Publishes ``ucm-text-ae`` with the vocabulary every later UCM stage uses.
"""

from __future__ import annotations

import argparse
import math

import torch

from captioning.config import load_config
from captioning.data.datasets import CaptionTextDataset, collate_captions
from captioning.data.vocab import Vocabulary
from captioning.models.ucm.data import caption_batch, open_dataset
from captioning.models.ucm.evaluate import reconstruction_metrics
from captioning.models.ucm.model import TextAutoencoder, caption_loss
from captioning.models.ucm.store_io import VOCAB, WEIGHTS
from captioning.weights import save_state
from training.runner import TrainRun, add_common_args

STAGE = "ucm-text-ae"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)


def batch_tensors(ids: torch.Tensor, lengths: torch.Tensor):
    """Padded <bos> .. <eos> ids -> the encoder / decoder tensors (see data.caption_batch)."""
    return caption_batch([row[:n] for row, n in zip(ids, lengths.tolist(), strict=True)])


def run(args: argparse.Namespace) -> int:
    config = load_config("ucm", args.profile, path=args.config, overrides=args.set)
    corpus = open_dataset(args.data, splits=("train", "val"))
    text_cfg, cfg = config.text, config.text_ae
    run = TrainRun(STAGE, args, config)

    vocab = Vocabulary.build(corpus.token_lists("train"), min_freq=text_cfg.min_freq)
    max_words = text_cfg.max_words
    train = CaptionTextDataset(corpus, vocab, "train", max_words=max_words)
    val = CaptionTextDataset(corpus, vocab, "val", max_words=max_words)

    model = run.wrap_model(TextAutoencoder(len(vocab), text_cfg))
    core = getattr(model, "module", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.load_checkpoint(model=model, optimizer=optimizer)

    for epoch in run.epochs(cfg.epochs):
        model.train()
        loader = run.loader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_captions)
        for ids, lengths in run.progress(loader, desc=f"{STAGE} epoch {epoch + 1}/{cfg.epochs}", total=len(loader)):
            b = batch_tensors(ids, lengths).to(run.device)
            logits = model(b.enc_tokens, b.enc_lengths, b.inputs, teacher_forcing=cfg.teacher_forcing)
            loss = caption_loss(logits, b.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            run.log_step(loss=loss.item())
        run.end_epoch(extra={"val_loss": validation_loss(core, val, run.device)}, model=model, optimizer=optimizer)

    metrics = {"vocab_size": len(vocab)}
    for split in ("train", "val", "test"):
        records = corpus.split(split)
        if split == "train":
            records = records[:: max(1, len(records) // 200)]  # about 1000 captions, every class
        captions = [torch.tensor(vocab.encode(s.tokens[:max_words])) for rec in records for s in rec.sentences]
        references = [" ".join(s.tokens[:max_words]) for rec in records for s in rec.sentences]
        if captions:
            scores = reconstruction_metrics(core, vocab, captions, references, run.device, max_words)
            metrics.update({f"{split}_{k}": v for k, v in scores.items()})
    metrics["val_loss"] = run.history[-1]["val_loss"] if run.history else math.nan

    if run.is_main:
        staging = run.staging_dir()
        save_state(core.state_dict(), staging / WEIGHTS, config.weights_dtype)
        vocab.save(staging / VOCAB)
        run.publish_stage(STAGE, staging, task="ucm-text-ae", metrics=metrics, data=corpus.manifest_record())
    run.close()
    return 0


@torch.no_grad()
def validation_loss(model: TextAutoencoder, dataset: CaptionTextDataset, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, collate_fn=collate_captions)
    for ids, lengths in loader:
        b = batch_tensors(ids, lengths).to(device)
        logits = model(b.enc_tokens, b.enc_lengths, b.inputs)
        n = int((b.targets != 0).sum())
        total += float(caption_loss(logits, b.targets)) * n
        count += n
    return total / max(count, 1)
