"""LightCap concept extractor, stage 2: region-to-concept alignment (``captioner train concepts-align``).

Needs ``clip`` and ``concepts-detector`` of the same profile in the store (newest by default, or ``--clip`` /
``--detector`` specs). Steps:

1. the concept vocabulary (``vocabulary`` section: the synthetic grammar's words + the 17 labels, or a file) is
   embedded once with the CLIP text tower as "a photo of a [object]" -> ``[V, D]``, stored with the model;
2. the frozen CLIP grid of every training image is computed once (CLIP never changes in this stage);
3. each step takes a batch of images, ROIAligns their ground-truth boxes (jittered by up to ``box_jitter`` of
   their size, since detector boxes are not exact) from the grid (``context``: plus the image's mean grid),
   maps them through the two linear blocks and
   trains those with the symmetric region-concept contrastive loss (``region_concept_loss``);
4. the full extractor (detector proposals -> regions -> concepts) is run on val; the ``min_score`` with the best
   concept micro-F1 there is kept in the published config; val and test figures go into the manifest.

Published as ``concepts`` (task ``concepts``, served by ``captioning.models.lightcap.runtime``): ``aligner.safetensors``,
``concept_embeddings.safetensors``, ``concepts.json``, ``loss_curve.png``, ``metrics.json``; parents: the exact
``clip`` and ``concepts-detector`` versions.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from captioning.config import load_config
from captioning.data import load_dataset
from captioning.errors import DataError, PrerequisiteError
from captioning.weights import load_state, save_state, torch_dtype
from training.runner import TrainRun, add_common_args

STAGE = "concepts-align"
MODEL = "concepts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--clip", default=None, help="clip model spec (default: newest clip of the profile)")
    parser.add_argument("--detector", default=None, help="detector spec (default: newest concepts-detector of the profile)")


def prerequisite(store, name: str, spec: str | None, profile: str, stage: str):
    if spec:
        return store.load(spec)
    version = store.latest(name, profile)
    if version is None:
        raise PrerequisiteError(
            f"no {name!r} model of profile {profile!r} in {store.root}: run `captioner train {stage} --profile {profile}` first"
        )
    return store.load(version.spec)


def run(args: argparse.Namespace) -> int:
    from captioning.config import manifest_config
    from captioning.config_schema import ClipConfig
    from captioning.models.lightcap.clip_encoder import ClipTokenizer, GridEncoder, build_clip, resize_batch
    from captioning.models.lightcap.concepts import (
        ALIGNER_FILE,
        ConceptExtractor,
        ConceptVocabulary,
        RegionAligner,
        concept_words,
        embed_concepts,
        pool_regions,
        region_concept_loss,
    )
    from captioning.models.lightcap.concepts_data import box_split
    from captioning.models.lightcap.runtime import CLIP_WEIGHTS, load_detector
    from captioning.store import ModelStore
    from training.eval_concepts import choose_min_score, evaluate_extractor

    config = load_config("concepts", args.profile, path=args.config, overrides=args.set)
    align_cfg = config.align
    corpus = load_dataset(args.data)
    if corpus.boxes is None:
        raise DataError("the dataset has no boxes.json: the aligner trains on its boxes", path=corpus.root)
    store = ModelStore(args.store)
    clip_version = prerequisite(store, "clip", args.clip, args.profile, "clip")
    detector_version = prerequisite(store, "concepts-detector", args.detector, args.profile, "concepts-detector")
    run = TrainRun(STAGE, args, config)

    # 1. CLIP (frozen) and the concept vocabulary, embedded once ---------------------------------------------
    clip_cfg = manifest_config(clip_version, ClipConfig)
    clip_cfg.checkpoint = None  # the published weights, not the file it was trained from
    clip = build_clip(clip_cfg)
    clip.load_state_dict(load_state(clip_version.file(CLIP_WEIGHTS)))
    clip.eval()
    tokenizer = ClipTokenizer.from_config(clip_cfg, clip_version.path)
    words, labels = concept_words(config.vocabulary)
    template = config.vocabulary.template
    vocab = ConceptVocabulary(words, labels, embed_concepts(clip, tokenizer, words, template), template)
    encoder = GridEncoder.from_clip(clip, clip_cfg).freeze().to(run.device)
    del clip

    # 2. ground-truth boxes and frozen grids ---------------------------------------------------------------
    image_size = config.image_size or encoder.image_size
    encoder_size = config.encoder_size or encoder.image_size
    train = box_split(corpus, "train", image_size, args.workers)
    missing = sorted({c for cs in train.concepts for c in cs} - set(vocab.words))
    if missing:
        raise DataError(f"box concepts not in the concept vocabulary: {missing[:10]}", path=corpus.root / "boxes.json")
    train_ids = [torch.tensor([vocab.index[c] for c in cs], dtype=torch.long) for cs in train.concepts]
    with torch.no_grad():
        grids = torch.cat([
            encoder(resize_batch(train.images[i : i + 64].float().div(255).to(run.device), encoder_size)).cpu()
            for i in range(0, len(train), 64)
        ])  # [N, C, h, w]
    vocab_emb = vocab.embeddings.to(run.device)

    # 3. the two linear blocks ------------------------------------------------------------------------------
    aligner = RegionAligner.from_config(encoder.channels, align_cfg, vocab.dim)
    model = run.wrap_model(aligner)
    core = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=align_cfg.lr, weight_decay=align_cfg.weight_decay)
    epochs, batch_size = align_cfg.epochs, align_cfg.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    run.load_checkpoint(model=model, optimizer=optimizer, scheduler=scheduler)
    with_boxes = torch.tensor([i for i in range(len(train)) if len(train_ids[i])])
    indices = torch.utils.data.TensorDataset(with_boxes)
    jitter, roi_size, context = align_cfg.box_jitter, align_cfg.roi_size, align_cfg.context
    for epoch in run.epochs(epochs):
        model.train()
        gen = torch.Generator().manual_seed(run.seed * 7919 + epoch)
        loader = run.loader(indices, batch_size=batch_size, shuffle=True)
        for (rows,) in run.progress(loader, desc=f"{STAGE} epoch {epoch + 1}/{epochs}", total=len(loader)):
            boxes = [jitter_boxes(train.boxes[int(r)], jitter, image_size, gen).to(run.device) for r in rows]
            regions = pool_regions(grids[rows].to(run.device), boxes, image_size, roi_size, context=context)  # [R, C or 2C]
            targets = torch.cat([train_ids[int(r)] for r in rows]).to(run.device)  # [R]
            loss = region_concept_loss(model(regions), targets, vocab_emb, core.scale())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log_step(loss=loss.item())
        scheduler.step()
        with torch.no_grad():
            scale = core.scale().item()
        run.end_epoch(extra={"logit_scale": scale}, model=model, optimizer=optimizer, scheduler=scheduler)

    # 4. the whole extractor on val: choose min_score, then report val and test ---------------------------------
    detector = load_detector(detector_version)
    published_cfg = config.model_copy(deep=True)
    extractor = ConceptExtractor(encoder.cpu(), detector, core.cpu().eval(), vocab, published_cfg)
    metrics: dict[str, Any] = {"vocabulary": len(vocab), "train_boxes": int(sum(len(t) for t in train_ids))}
    if corpus.split("val"):
        val = evaluate_extractor(extractor, corpus, "val", candidates=True)
        threshold, f1 = choose_min_score(val.pop("_candidates"), val.pop("_true_concepts"))
        published_cfg.extract.min_score = threshold
        extractor.min_score = threshold
        metrics["min_score"] = threshold
        metrics.update({f"val_{k}": v for k, v in evaluate_extractor(extractor, corpus, "val").items()})
    if corpus.split("test"):
        metrics.update({f"test_{k}": v for k, v in evaluate_extractor(extractor, corpus, "test").items()})

    if run.is_main:
        staging = run.staging_dir()
        save_state(core.state_dict(), staging / ALIGNER_FILE, config.weights_dtype)
        vocab.save(staging, dtype=torch_dtype(config.weights_dtype))
        parents = [
            {"name": clip_version.name, "version": clip_version.version},
            {"name": detector_version.name, "version": detector_version.version},
        ]
        run.publish_stage(MODEL, staging, task="concepts", metrics=metrics, data=corpus.manifest_record(), parents=parents,
            config=published_cfg,
        )
    run.close()
    return 0


def jitter_boxes(boxes: torch.Tensor, fraction: float, size: int, gen: torch.Generator) -> torch.Tensor:
    """Move each side of each box by up to ``fraction`` of the box's width/height (clamped to the image)."""
    if fraction <= 0 or not len(boxes):
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # [n, 4] (w, h, w, h)
    noise = (torch.rand(boxes.shape, generator=gen) * 2 - 1) * fraction * wh
    out = (boxes + noise).clamp(0, size)
    out[:, 2:] = torch.maximum(out[:, 2:], out[:, :2] + 1)
    return out
