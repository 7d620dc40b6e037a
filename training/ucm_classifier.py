"""UCM stage 2: the multi-label ResNet classifier (``captioner train ucm-classifier``).

A torchvision ResNet trunk (paper: ResNet-50, optionally from a local ImageNet state dict given with
``--pretrained``; tiny: a smaller ResNet from scratch) with a 17-label head and BCE, trained in the seed's two
steps: the whole network at a low learning rate, then the head alone (trunk and its batch-norm statistics
frozen). The decision threshold is the one with the best micro-F1 on val; it is stored with the model
(``classifier.json``) and used for the reported test metrics (micro / macro F1, precision, recall).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from captioning.config import load_config
from captioning.data import LABELS
from captioning.errors import ConfigError
from captioning.models.ucm.data import augment, label_split, normalize, open_dataset
from captioning.models.ucm.evaluate import choose_threshold, label_scores
from captioning.models.ucm.model import MultiLabelClassifier
from captioning.models.ucm.store_io import WEIGHTS
from captioning.weights import save_state
from training.runner import TrainRun, add_common_args

STAGE = "ucm-classifier"
CLASSIFIER_JSON = "classifier.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument(
        "--pretrained", type=Path, default=None,
        help="ImageNet ResNet state dict (torchvision layout, e.g. resnet50.pth) to start the trunk from",
    )


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.pretrained is not None:
        overrides.append(f"image.pretrained={args.pretrained}")
    config = load_config("ucm", args.profile, path=args.config, overrides=overrides)
    image_cfg, cfg = config.image, config.classifier
    corpus = open_dataset(args.data, need_labels=True, splits=("train", "val"))
    run = TrainRun(STAGE, args, config)

    size = image_cfg.input_size
    train_images, train_labels = label_split(corpus, "train", size, args.workers)
    val_images, val_labels = label_split(corpus, "val", size, args.workers)

    model = MultiLabelClassifier(image_cfg, len(LABELS))
    if image_cfg.pretrained:
        model.trunk.load_pretrained(image_cfg.pretrained)
    model = run.wrap_model(model, find_unused_parameters=True)
    core = getattr(model, "module", model)
    fine_tune = torch.optim.Adam(model.parameters(), lr=cfg.fine_tune_lr, weight_decay=cfg.weight_decay)
    head_only = torch.optim.Adam(core.head.parameters(), lr=cfg.head_lr)
    steps = cfg.fine_tune_epochs, cfg.head_epochs
    indices = torch.utils.data.TensorDataset(torch.arange(len(train_images)))
    per_epoch = len(run.loader(indices, batch_size=cfg.batch_size, shuffle=False))
    schedule = lr_schedule(fine_tune, cfg.schedule, steps[0] * per_epoch, cfg.warmup_epochs * per_epoch)
    run.load_checkpoint(model=model, fine_tune_optimizer=fine_tune, head_optimizer=head_only, schedule=schedule)
    for epoch in run.epochs(sum(steps)):
        head_phase = epoch >= steps[0]
        optimizer = head_only if head_phase else fine_tune
        model.train()
        if head_phase:
            core.trunk.eval()  # frozen batch-norm statistics too
        loader = run.loader(indices, batch_size=cfg.batch_size, shuffle=True)
        phase = "head" if head_phase else "fine-tune"
        for (rows,) in run.progress(loader, desc=f"{STAGE} {phase} epoch {epoch + 1}/{sum(steps)}", total=len(loader)):
            images = normalize(augment(train_images[rows]) if image_cfg.augment else train_images[rows])
            images, targets = images.to(run.device), train_labels[rows].to(run.device)
            if head_phase and not run.distributed:
                with torch.no_grad():
                    features = core.features(images)
                logits = core.head(core.dropout(features))
            else:  # under DDP every forward goes through the wrapper so the head's gradients are averaged
                logits = model(images)
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not head_phase:
                schedule.step()
            run.log_step(loss=loss.item())
        val_probs = predict(core, val_images, run.device)
        val_loss = float(F.binary_cross_entropy(val_probs, val_labels))
        val_f1 = label_scores(val_probs, val_labels, 0.5)["micro_f1"]
        run.end_epoch(
            extra={"val_loss": val_loss, "val_micro_f1_at_0.5": val_f1, "phase": phase},
            model=model, fine_tune_optimizer=fine_tune, head_optimizer=head_only, schedule=schedule,
        )

    val_probs = predict(core, val_images, run.device)
    threshold = choose_threshold(val_probs, val_labels)
    metrics = {"threshold": threshold, **{f"val_{k}": v for k, v in label_scores(val_probs, val_labels, threshold).items()}}
    if corpus.split("test"):
        test_images, test_labels = label_split(corpus, "test", size, args.workers)
        test = label_scores(predict(core, test_images, run.device), test_labels, threshold)
        metrics.update({f"test_{k}": v for k, v in test.items()})

    if run.is_main:
        staging = run.staging_dir()
        save_state(core.state_dict(), staging / WEIGHTS, config.weights_dtype)
        (staging / CLASSIFIER_JSON).write_text(
            json.dumps({"labels": list(LABELS), "threshold": threshold, "input_size": size}, indent=1) + "\n"
        )
        run.publish_stage(STAGE, staging, task="ucm-classifier", metrics=metrics, data=corpus.manifest_record())
    run.close()
    return 0


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
    """Per-step learning-rate factor: ``constant``, or ``cosine`` (linear warm-up, then cosine to zero)."""
    import math

    if kind not in ("constant", "cosine"):
        raise ConfigError(f"schedule must be 'constant' or 'cosine', got {kind!r}")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(model: MultiLabelClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> probabilities [N, 17] (eval mode, no augmentation)."""
    model.eval()
    out = [torch.sigmoid(model(normalize(images[i : i + batch_size]).to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(LABELS))
