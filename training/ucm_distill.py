"""UCM stage 3: cross-modal distillation (``captioner train ucm-distill``).

The classifier's trunk with a new linear code head (the image encoder) and the text autoencoder's encoder
are trained together to bring each image's code onto the text codes of its captions (MSE, or 1 - cosine),
with separate learning rates: image ``distill.image_lr``, text ``image_lr * distill.text_lr_ratio``
(default 1/100, the seed's best; 0 freezes the text encoder). Builds on ``ucm-text-ae`` and
``ucm-classifier`` of the same profile (newest, or ``--text-ae`` / ``--classifier``).

Reports the final train and val distillation loss, how far the text codes moved from the autoencoder's
(``text_code_drift``: mean squared change / mean squared code), and image->caption retrieval on val
(R@1, R@5: is one of the image's own captions among the nearest text codes).
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
    codes_per_image,
    normalize,
    open_dataset,
)
from captioning.models.ucm.evaluate import code_retrieval
from captioning.models.ucm.model import DistillPair, TextEncoder, distill_loss
from captioning.models.ucm.store_io import (
    VOCAB,
    WEIGHTS,
    check_architecture,
    parent_record,
    prerequisite,
)
from captioning.weights import load_into, save_state
from training.runner import TrainRun, add_common_args

STAGE = "ucm-distill"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--text-ae", default=None, metavar="SPEC", help="ucm-text-ae version (default: newest of the profile)")
    parser.add_argument("--classifier", default=None, metavar="SPEC", help="ucm-classifier version (default: newest of the profile)")


def run(args: argparse.Namespace) -> int:
    from captioning.store import ModelStore

    config = load_config("ucm", args.profile, path=args.config, overrides=args.set)
    text_cfg, image_cfg, cfg = config.text, config.image, config.distill
    store = ModelStore(args.store)
    text_ae = prerequisite(store, "ucm-text-ae", args.text_ae, args.profile, "ucm-text-ae")
    classifier = prerequisite(store, "ucm-classifier", args.classifier, args.profile, "ucm-classifier")
    check_architecture(text_ae, config, "text")
    check_architecture(classifier, config, "image")
    corpus = open_dataset(args.data, splits=("train", "val"))
    run = TrainRun(STAGE, args, config)

    vocab = Vocabulary.load(text_ae.file(VOCAB))
    size, max_words = image_cfg.input_size, text_cfg.max_words
    train = caption_split(corpus, vocab, "train", size, max_words, args.workers)
    val = caption_split(corpus, vocab, "val", size, max_words, args.workers)

    pair = DistillPair(len(vocab), text_cfg, image_cfg)
    load_into(pair.image.trunk, classifier.file(WEIGHTS), prefix="trunk.")
    load_into(pair.text, text_ae.file(WEIGHTS), prefix="encoder.")
    original_text = TextEncoder(len(vocab), text_cfg.embed_dim, text_cfg.hidden_dim, text_cfg.num_layers)
    load_into(original_text, text_ae.file(WEIGHTS), prefix="encoder.")

    image_lr = cfg.image_lr
    text_lr = image_lr * cfg.text_lr_ratio
    text_frozen = text_lr == 0.0
    groups = [{"params": list(pair.image.parameters()), "lr": image_lr}]
    if text_frozen:
        pair.text.requires_grad_(False)
    else:
        groups.append({"params": list(pair.text.parameters()), "lr": text_lr})
    model = run.wrap_model(pair)
    core = getattr(model, "module", model)
    optimizer = torch.optim.Adam(groups)
    run.load_checkpoint(model=model, optimizer=optimizer)
    kind = cfg.loss

    indices = torch.utils.data.TensorDataset(torch.arange(len(train)))
    for epoch in run.epochs(cfg.epochs):
        model.train()
        if text_frozen:
            core.text.eval()
        loader = run.loader(indices, batch_size=cfg.batch_size, shuffle=True)
        for (rows,) in run.progress(loader, desc=f"{STAGE} epoch {epoch + 1}/{cfg.epochs}", total=len(loader)):
            images = normalize(augment(train.images[rows]) if image_cfg.augment else train.images[rows])
            captions = captions_of(train, rows).to(run.device)
            loss = pair_loss(model, images.to(run.device), captions, len(rows), kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            run.log_step(loss=loss.item())
        run.end_epoch(extra={"val_loss": evaluate_loss(core, val, run.device, kind)}, model=model, optimizer=optimizer)

    image_codes, text_codes, owner = all_codes(core, val, run.device)
    original_codes = all_codes(original_text, val, run.device, image=False)[1]
    drift = float(((text_codes - original_codes) ** 2).mean() / (original_codes**2).mean().clamp_min(1e-12))
    metrics = {
        "final_train_loss": run.history[-1]["loss"] if run.history else None,
        "final_val_loss": run.history[-1]["val_loss"] if run.history else None,
        "loss": kind,
        "image_lr": image_lr,
        "text_lr": text_lr,
        "text_code_drift": drift,
        **{f"val_{k}": v for k, v in code_retrieval(image_codes, text_codes, owner, kind).items()},
    }

    if run.is_main:
        staging = run.staging_dir()
        save_state(core.state_dict(), staging / WEIGHTS, config.weights_dtype)
        vocab.save(staging / VOCAB)
        run.publish_stage(STAGE, staging, task="ucm-distill", metrics=metrics, data=corpus.manifest_record(),
            parents=[parent_record(text_ae), parent_record(classifier)],
        )
    run.close()
    return 0


def pair_loss(model: torch.nn.Module, images: torch.Tensor, captions, n_images: int, kind: str) -> torch.Tensor:
    image_code, text_codes = model(images, captions.enc_tokens, captions.enc_lengths)
    grouped, mask = codes_per_image(text_codes, captions.owner, n_images)
    return distill_loss(image_code, grouped, mask, kind)


@torch.no_grad()
def evaluate_loss(pair: DistillPair, split, device: torch.device, kind: str) -> float:
    image_codes, text_codes, owner = all_codes(pair, split, device)
    grouped, mask = codes_per_image(text_codes, owner, len(image_codes))
    return float(distill_loss(image_codes, grouped, mask, kind))


@torch.no_grad()
def all_codes(model: torch.nn.Module, split, device: torch.device, image: bool = True, batch_size: int = 64):
    """Image codes [N, D] (when ``image``), every caption's text code [M, D] and its image row [M]."""
    model.eval()
    text_encoder = model.text if hasattr(model, "text") else model
    image_codes, text_codes, owners = [], [], []
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        if image:
            image_codes.append(model.image(normalize(split.images[rows]).to(device))[0].cpu())
        captions = captions_of(split, rows).to(device)
        text_codes.append(text_encoder(captions.enc_tokens, captions.enc_lengths).cpu())
        owners.append(captions.owner.cpu() + start)
    return (torch.cat(image_codes) if image else None), torch.cat(text_codes), torch.cat(owners)
