"""UCM stage 4: the captioner (``captioner train ucm-captioner``).

The distilled image encoder (``ucm-distill``) feeds its code to the pre-trained text decoder (the
``ucm-text-ae`` the distillation started from, or ``--text-ae``) as the decoder's initial cell state; both
are fine-tuned with cross-entropy on every caption of each training image (the image is encoded once per
batch, its code shared by its captions). ``captioner.attention_dim > 0`` adds attention over the trunk's
spatial grid (the seed's future work), initialised so the decoder starts out as the pre-trained one.

Reports caption metrics on val and test with the profile's decoding (``decoding`` section: beam search and
the repetition guard), the repeat statistics, and the nearest-neighbour baseline on test.
"""

from __future__ import annotations

import argparse

import torch

from captioning.config import load_config
from captioning.data.vocab import Vocabulary
from captioning.models.ucm.data import (
    augment,
    caption_split,
    captions_of,
    normalize,
    open_dataset,
)
from captioning.models.ucm.evaluate import evaluate_captions
from captioning.models.ucm.model import Captioner, caption_loss
from captioning.models.ucm.store_io import (
    VOCAB,
    WEIGHTS,
    check_architecture,
    parent_record,
    prerequisite,
)
from captioning.weights import load_into, save_state
from training.runner import TrainRun, add_common_args

STAGE = "ucm-captioner"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--distill", default=None, metavar="SPEC", help="ucm-distill version (default: newest of the profile)")
    parser.add_argument(
        "--text-ae", default=None, metavar="SPEC",
        help="ucm-text-ae whose decoder to start from (default: the one the distillation used)",
    )


def run(args: argparse.Namespace) -> int:
    from captioning.store import ModelStore

    config = load_config("ucm", args.profile, path=args.config, overrides=args.set)
    text_cfg, image_cfg, cfg = config.text, config.image, config.captioner
    options = config.decoding.options()
    store = ModelStore(args.store)
    distill = prerequisite(store, "ucm-distill", args.distill, args.profile, "ucm-distill")
    text_spec = args.text_ae or next(
        (f"{p['name']}@{p['version']}" for p in distill.manifest.get("parents", []) if p["name"] == "ucm-text-ae"), None
    )
    text_ae = prerequisite(store, "ucm-text-ae", text_spec, args.profile, "ucm-text-ae")
    for version, section in ((distill, "text"), (distill, "image"), (text_ae, "text")):
        check_architecture(version, config, section)
    corpus = open_dataset(args.data, splits=("train", "val"))
    run = TrainRun(STAGE, args, config)

    vocab = Vocabulary.load(text_ae.file(VOCAB))
    if Vocabulary.load(distill.file(VOCAB)) != vocab:
        raise_mismatch(distill, text_ae)
    size, max_words = image_cfg.input_size, text_cfg.max_words
    train = caption_split(corpus, vocab, "train", size, max_words, args.workers)
    val = caption_split(corpus, vocab, "val", size, max_words, args.workers)

    captioner = Captioner(len(vocab), text_cfg, image_cfg, attention_dim=cfg.attention_dim)
    load_into(captioner.encoder, distill.file(WEIGHTS), prefix="image.")
    load_into(captioner.decoder, text_ae.file(WEIGHTS), prefix="decoder.", strict=captioner.decoder.attention is None)
    model = run.wrap_model(captioner)
    core = getattr(model, "module", model)
    optimizer = torch.optim.Adam(
        [
            {"params": list(core.encoder.parameters()), "lr": cfg.encoder_lr},
            {"params": list(core.decoder.parameters()), "lr": cfg.decoder_lr},
        ]
    )
    run.load_checkpoint(model=model, optimizer=optimizer)

    indices = torch.utils.data.TensorDataset(torch.arange(len(train)))
    for epoch in run.epochs(cfg.epochs):
        model.train()
        loader = run.loader(indices, batch_size=cfg.batch_size, shuffle=True)
        for (rows,) in run.progress(loader, desc=f"{STAGE} epoch {epoch + 1}/{cfg.epochs}", total=len(loader)):
            images = normalize(augment(train.images[rows]) if image_cfg.augment else train.images[rows])
            captions = captions_of(train, rows).to(run.device)
            logits = model(images.to(run.device), captions.inputs, captions.owner, cfg.teacher_forcing)
            loss = caption_loss(logits, captions.targets, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            run.log_step(loss=loss.item())
        run.end_epoch(extra={"val_loss": validation_loss(core, val, run.device)}, model=model, optimizer=optimizer)

    metrics = {"decoding": options.to_dict()}
    meteor = cfg.report_meteor  # METEOR runs Java: seconds per call; test split only
    metrics.update(prefixed("val", evaluate_captions(core, vocab, val, options, run.device, meteor=False)))
    if corpus.split("test"):
        test = caption_split(corpus, vocab, "test", size, max_words, args.workers)
        metrics.update(
            prefixed("test", evaluate_captions(core, vocab, test, options, run.device, train=train, meteor=meteor))
        )
    metrics["final_train_loss"] = run.history[-1]["loss"] if run.history else None
    metrics["final_val_loss"] = run.history[-1]["val_loss"] if run.history else None

    if run.is_main:
        staging = run.staging_dir()
        save_state(core.state_dict(), staging / WEIGHTS, config.weights_dtype)
        vocab.save(staging / VOCAB)
        run.publish_stage(STAGE, staging, task="ucm-captioner", metrics=metrics, data=corpus.manifest_record(),
            parents=[parent_record(distill), parent_record(text_ae)],
        )
    run.close()
    return 0


def prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in values.items()}


def raise_mismatch(distill, text_ae) -> None:
    from captioning.errors import PrerequisiteError

    raise PrerequisiteError(
        f"{distill.name}@{distill.version} and {text_ae.name}@{text_ae.version} have different vocabularies; "
        f"use the ucm-text-ae the distillation was trained from (leave out --text-ae)"
    )


@torch.no_grad()
def validation_loss(model: Captioner, split, device: torch.device, batch_size: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        captions = captions_of(split, rows).to(device)
        logits = model(normalize(split.images[rows]).to(device), captions.inputs, captions.owner)
        n = int((captions.targets != 0).sum())
        total += float(caption_loss(logits, captions.targets)) * n
        count += n
    return total / max(count, 1)

