"""LightCap stage 0: the CLIP image and text towers (``captioner train clip``).

LightCap freezes a pretrained CLIP. Nothing can be downloaded here, so the tiny profile first learns one: open_clip's
own ``CLIP`` model (a small ModifiedResNet image tower and text transformer, ``captioning/configs/clip/tiny.yaml``)
trained contrastively with ``open_clip.loss.ClipLoss`` on the dataset's image-caption pairs (each epoch, every
training image with one of its captions, drawn from (seed, epoch, image)). Validation: image->text and
text->image recall@1/5 over the val split's images and all their captions.

``train.concept_prompt_prob``: the share of pairs whose text is "a photo of a [word]" for one of the image's
concept words (its boxes' words and its label words) instead of a caption. LightCap embeds its concept
vocabulary with exactly that prompt; a real CLIP has seen such alt-text by the million, a CLIP trained on the
synthetic captions alone never sees "photo" and embeds all prompts nearly alike (measured: mean pairwise
cosine 0.75, up to 0.98 between "tank" and "tree" after 3 epochs without it).

``--extra-train DIR`` (repeatable): the train split of another dataset joins the training pairs (after --data's
own, in the order given); validation stays on --data's val split. CLIP is the one stage that may learn from more
pictures than the captioners do (the paper's CLIP saw 400 M web pairs); the manifest's data record lists them.

Paper profile: ``--set checkpoint=/path/RN50.pt`` (OpenAI or open_clip RN50 file) is loaded and published without
training (its retrieval figures on the val split are still measured when ``--data`` is given).

Published as ``clip``: ``model.safetensors`` (the whole CLIP, ``weights_dtype``), ``tokenizer.json`` (word-level
tokenizer), ``loss_curve.png``, ``metrics.json``; the manifest's config is the resolved open_clip model config.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from captioning.config import load_config
from captioning.config_schema import ClipConfig, ClipTrain
from captioning.data import load_dataset
from captioning.errors import ConfigError, DataError
from captioning.weights import save_state
from training.runner import TrainRun, add_common_args

STAGE = "clip"
WEIGHTS = "model.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument(
        "--extra-train",
        action="append",
        default=[],
        metavar="DIR",
        help="another dataset whose train split joins the training pairs (repeatable; val stays --data's)",
    )


def run(args: argparse.Namespace) -> int:
    from captioning.models.lightcap.clip_encoder import ClipTokenizer, build_clip, clip_model_config
    from captioning.models.lightcap.concepts_data import CaptionPairs, caption_pairs, load_images_uint8

    config = load_config("clip", args.profile, path=args.config, overrides=args.set)
    corpus = load_dataset(args.data)
    train = caption_pairs(corpus, "train")
    val = caption_pairs(corpus, "val")
    extra = [load_dataset(folder) for folder in args.extra_train]
    for other in extra:
        more = caption_pairs(other, "train")
        if not more.records:
            raise DataError("--extra-train: no training images with captions in split 'train'", path=other.root)
        train = CaptionPairs(train.records + more.records, train.captions + more.captions, train.concepts + more.concepts)
    if not train.records and not config.checkpoint:
        raise DataError("no training images with captions in split 'train'", path=corpus.root)
    run = TrainRun(STAGE, args, config)

    # tokenizer and the resolved open_clip model config -----------------------------------------------------
    if config.tokenizer.type == "word-level":
        if config.checkpoint:
            raise ConfigError("clip config: a word-level tokenizer cannot go with a pretrained checkpoint")
        texts = [c for caps in train.captions for c in caps] + concept_prompts(args.profile)
        tokenizer = ClipTokenizer.train_word_level(texts, config.tokenizer.context_length, config.tokenizer.min_freq)
    else:
        tokenizer = ClipTokenizer.from_config(config)
    resolved = resolve_model(config, clip_model_config(config.model), tokenizer.text_cfg_overrides())
    clip = build_clip(resolved)
    image_size = resolved.model.vision_cfg.image_size
    norm = _normaliser(config)
    val_batch = config.train.val_batch_size

    val_images = load_images_uint8(val.records, image_size, args.workers) if val.records else None
    if not config.checkpoint:
        train_images = load_images_uint8(train.records, image_size, args.workers)
        _train(run, clip, tokenizer, train, train_images, val, val_images, norm, config.train)

    metrics: dict[str, Any] = {"parameters": sum(p.numel() for p in clip.parameters())}
    if val_images is not None:
        scores = retrieval(clip, tokenizer, val_images, val.captions, norm, run.device, batch_size=val_batch)
        metrics.update({f"val_{k}": v for k, v in scores.items()})
    if run.is_main:
        staging = run.staging_dir()
        save_state(clip.state_dict(), staging / WEIGHTS, config.weights_dtype)
        tokenizer.save(staging)
        run.publish_stage(STAGE, staging, task="clip", metrics=metrics, data=_data_record(corpus, extra), config=resolved)
    run.close()
    return 0


def resolve_model(config: ClipConfig, model_cfg: dict[str, Any], text_overrides: dict[str, Any]) -> ClipConfig:
    """The config as published: ``model`` is the resolved open_clip model config (``model.name`` expanded),
    its ``text_cfg`` agreeing with the tokenizer; checked against the same schema as the YAML files."""
    model_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], **text_overrides}}
    try:
        return ClipConfig.model_validate({**config.to_dict(), "model": model_cfg})
    except ValueError as exc:  # a pydantic ValidationError: the open_clip config has keys the schema lacks
        raise ConfigError(f"clip config: the resolved open_clip model config does not fit the schema: {exc}") from None


def _data_record(corpus: Any, extra: list[Any]) -> dict[str, Any]:
    record = corpus.manifest_record()
    if extra:
        record["extra_train"] = [other.manifest_record() for other in extra]
    return record


def concept_prompts(profile: str) -> list[str]:
    """The concept prompts the concepts stage will embed, so the word-level tokenizer knows their words."""
    from captioning.models.lightcap.concepts import concept_words

    cfg = load_config("concepts", profile)
    template = cfg.vocabulary.template
    return [template.format(w) for w in concept_words(cfg.vocabulary)[0]]


def _normaliser(config: ClipConfig):
    mean = torch.tensor(config.image.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image.std).view(1, 3, 1, 1)
    return lambda uint8: (uint8.float() / 255.0 - mean.to(uint8.device)) / std.to(uint8.device)


def _train(run, clip, tokenizer, train, train_images, val, val_images, norm, cfg: ClipTrain) -> None:
    import open_clip

    from captioning.models.lightcap.concepts_data import augment_views

    model = run.wrap_model(clip)
    core = getattr(model, "module", model)
    decay = [p for n, p in core.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in core.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    epochs, batch_size = cfg.epochs, cfg.batch_size
    steps_per_epoch = math.ceil(len(train.records) / run.world_size / batch_size)
    total, warmup = epochs * steps_per_epoch, cfg.warmup_steps

    def lr_lambda(step: int) -> float:  # linear warm-up, cosine decay (open_clip's schedule)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    loss_fn = open_clip.loss.ClipLoss(rank=run.rank, world_size=run.world_size)
    run.load_checkpoint(model=model, optimizer=optimizer, scheduler=scheduler)
    indices = torch.utils.data.TensorDataset(torch.arange(len(train.records)))
    prompt_prob = cfg.concept_prompt_prob
    template = cfg.concept_template
    for epoch in run.epochs(epochs):
        model.train()
        gen = torch.Generator().manual_seed(run.seed * 7919 + epoch)
        loader = run.loader(indices, batch_size=batch_size, shuffle=True, drop_last=run.distributed)
        for (rows,) in run.progress(loader, desc=f"{STAGE} epoch {epoch + 1}/{epochs}", total=len(loader)):
            texts = [train.caption_for(int(r), run.seed, epoch, prompt_prob=prompt_prob, template=template) for r in rows]
            images = train_images[rows]
            if cfg.augment:
                images = augment_views(images, gen)
            images, tokens = norm(images.to(run.device)), tokenizer(texts).to(run.device)
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                core.logit_scale.clamp_(0, math.log(100))
            run.log_step(loss=loss.item())
        extra: dict[str, Any] = {"logit_scale": core.logit_scale.detach().exp().item()}
        if val_images is not None:
            scores = retrieval(core, tokenizer, val_images, val.captions, norm, run.device, batch_size=cfg.val_batch_size)
            extra.update(val_i2t_r1=scores["i2t_r1"], val_t2i_r1=scores["t2i_r1"])
        run.end_epoch(extra=extra, model=model, optimizer=optimizer, scheduler=scheduler)


@torch.no_grad()
def retrieval(clip, tokenizer, images, captions, norm, device, batch_size: int = 128) -> dict[str, float]:
    """Image<->text recall@1/5 over a split: every image against all captions of the split, and back."""
    was_training = clip.training
    clip.eval()
    image_emb = torch.cat(
        [clip.encode_image(norm(images[i : i + batch_size].to(device)), normalize=True).float().cpu()
         for i in range(0, len(images), batch_size)]
    )  # [N, D]
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])  # caption -> image
    text_emb = torch.cat(
        [clip.encode_text(tokenizer(texts[i : i + batch_size]).to(device), normalize=True).float().cpu()
         for i in range(0, len(texts), batch_size)]
    )  # [T, D]
    clip.train(was_training)
    sims = image_emb @ text_emb.T  # [N, T]
    out = {}
    for k in (1, 5):
        top_texts = sims.topk(min(k, sims.shape[1]), dim=1).indices  # [N, k]
        out[f"i2t_r{k}"] = float((owner[top_texts] == torch.arange(len(images))[:, None]).any(1).float().mean())
        top_images = sims.T.topk(min(k, sims.shape[0]), dim=1).indices  # [T, k]
        out[f"t2i_r{k}"] = float((top_images == owner[:, None]).any(1).float().mean())
    return {k: round(v, 4) for k, v in out.items()}

